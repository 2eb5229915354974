#!/usr/bin/env bash
# Here, before a GPU session's one run: fill .whl/ (git-ignored) with every
# wheel the lent GPU machine lacks, to bring along with `carry: [".whl"]`
# (then run bench/gpu_device.sh there).
#
# The machine has Python 3.12, torch, numpy, aiohttp, grpcio and many ML
# packages, no network (../shared/device/README.md). Its README's wheel set
# covers Ray Serve and SpeechBrain; a rehearsal in a bare Python 3.12 with
# only that set and Ray's own requirements found what Diglett's code and
# FastAPI import beyond it: annotated-doc, soxr and psutil (small).
#
#   bash bench/gpu_prepare.sh [wheels dir, default ../shared/device/wheels]
set -euo pipefail
cd "$(dirname "$0")/.."
src="${1:-../shared/device/wheels}"
rm -rf .whl
mkdir -p .whl
cp "$src"/*.whl .whl/
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl \
  --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 --platform any \
  annotated-doc==0.0.7 soxr==1.1.0 psutil==7.2.2
ls .whl | wc -l
du -sh .whl
