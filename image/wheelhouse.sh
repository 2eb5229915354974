#!/usr/bin/env bash
# Download every wheel the image installs into image/wheels/<variant>/, on the
# host, so that the image build installs with `pip --no-index` and needs no
# package index (pip inside a container build sees neither this machine's
# pip configuration nor, offline, any index at all).
#
#   image/wheelhouse.sh [cuda|cpu]     (default: cuda; PIP=... picks the pip)
#
# cuda: requirements.lock as it is: torch from PyPI, built for CUDA 13, with
#       the nvidia-* runtime wheels (~3.5 GB). Also runs on CPU-only hosts.
# cpu:  the same pins, but torch/torchaudio +cpu from PyTorch's CPU index
#       (TORCH_CPU_INDEX) and no nvidia-*/cuda-*/triton (~1 GB less than 4).
#
# The folder gets requirements.txt (the exact pins of that variant, which
# the Dockerfile installs) and the build backend's wheels for the project's
# own editable install (image/build-requirements.txt). A stamp skips it all
# when neither input changed since the last successful run.
set -euo pipefail
cd "$(dirname "$0")/.."
VARIANT="${1:-${VARIANT:-cuda}}"
PIP="${PIP:-.venv/bin/pip}"
TORCH_CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
out="image/wheels/$VARIANT"
case "$VARIANT" in cuda | cpu) ;; *)
  echo "wheelhouse: variant must be cuda or cpu, not $VARIANT" >&2
  exit 2
  ;;
esac

stamp_of() {
  cat requirements.lock image/build-requirements.txt "$0" | sha256sum | cut -c1-16
  echo "$VARIANT $TORCH_CPU_INDEX"
}
stamp="$(stamp_of)"
if [[ -f "$out/.stamp" && "$(cat "$out/.stamp")" == "$stamp" ]]; then
  echo "wheelhouse: $out is up to date ($(du -sh "$out" | cut -f1))"
  exit 0
fi
mkdir -p "$out"
rm -f "$out/.stamp"
t0=$SECONDS

reqs="$out/requirements.txt"
if [[ "$VARIANT" == cuda ]]; then
  grep -v '^#' requirements.lock >"$reqs"
else
  # torch's CPU build has no CUDA runtime dependencies.
  grep -v -E '^(#|nvidia-|cuda-|triton==)' requirements.lock |
    sed -E 's/^(torch|torchaudio)==([^+]*)$/\1==\2+cpu/' >"$reqs"
fi

# Wheels only (--only-binary): nothing is compiled here or in the image.
# The host's own pip configuration (an index mirror, find-links) applies.
# The host must be Linux x86_64 with CPython 3.11, like the image (Debian
# bookworm's glibc 2.36 runs every manylinux wheel this machine takes).
common=(download --no-deps --only-binary=:all: --dest "$out")
if [[ "$VARIANT" == cpu ]]; then
  grep -E '^(torch|torchaudio)==' "$reqs" >"$out/.torch-cpu.txt"
  grep -v -E '^(torch|torchaudio)==' "$reqs" >"$out/.rest.txt"
  "$PIP" "${common[@]}" --index-url "$TORCH_CPU_INDEX" -r "$out/.torch-cpu.txt"
  "$PIP" "${common[@]}" -r "$out/.rest.txt"
  rm -f "$out/.torch-cpu.txt" "$out/.rest.txt"
else
  "$PIP" "${common[@]}" -r "$reqs"
fi
"$PIP" "${common[@]}" -r image/build-requirements.txt

# Wheels of earlier pins may stay in the folder; the image installs only
# the exact pins of requirements.txt (rm -r image/wheels to reclaim them).
echo "$stamp" >"$out/.stamp"
echo "wheelhouse: $out ready in $((SECONDS - t0)) s:" \
  "$(find "$out" -maxdepth 1 -name "*.whl" | wc -l) wheels, $(du -sh "$out" | cut -f1)"
