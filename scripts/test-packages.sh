#!/usr/bin/env bash
# The Debian packages `make test` needs, installed with apt-get where missing
# (as root, or through sudo); `make test` and .ci/run both run it.
#
# PortAudio headers and a compiler to build PyAudio; PulseAudio
# (tests/serve/test_client.py starts a private server with a null sink; its
# flags work as root) with the ALSA plugin PortAudio reaches it through;
# Chromium + chromedriver for the /demo page (tests/serve/test_demo.py); g++
# for the compiled int8 model's build (tests/serve/test_compiled_int8.py);
# redis-server for the GCS fault-tolerance test
# (tests/cluster/test_gcs_fault_tolerance.py); Python's headers if absent.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
missing=()
for pkg in gcc g++ libc6-dev portaudio19-dev pulseaudio pulseaudio-utils \
  libasound2-plugins chromium chromium-driver redis-server; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
py="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [[ ! -f "$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ]]; then
  dpkg -s python3-dev >/dev/null 2>&1 || missing+=(python3-dev)
fi
((${#missing[@]})) || exit 0
if ! command -v apt-get >/dev/null; then
  echo "make test needs these Debian packages: ${missing[*]}" >&2
  exit 1
fi
sudo=()
if [[ "$(id -u)" != 0 ]]; then
  sudo=(sudo)
fi
echo "installing ${missing[*]} (apt-get)"
"${sudo[@]}" apt-get update -q
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
