#!/usr/bin/env bash
# The one command of a GPU session, on the lent machine (prepare .whl/ here
# first with bench/gpu_prepare.sh, and bring it along: carry [".whl"]):
#
#   bash bench/gpu_device.sh          (~7 minutes; 9.5 at most)
#
# Installs the wheels, then measures the embedding tier under simulated
# sessions (bench/gpu_embed.py: random-weight ECAPA of the real shape, since
# the weights do not fit beside the wheels), in three phases side by side,
# each under its own time limit so that one that hangs costs no other its
# numbers:
#   eager1    fp16 eager, one model thread
#   eager2    fp16 eager, two model threads with a CUDA stream each (default)
#   compiled  torch.compile'd ECAPA at two fixed batch shapes, two threads
# Each ramps sessions (2 windows/s each) until p95 > 300 ms. Targets (issue
# #5): 8,000 windows/s at p95 <= 300 ms, then 16,000. Results in $OUT:
# <phase>.json and .log, nvidia-smi.txt, gpu_util.csv (the GPU's busy share
# every 0.5 s). DIGLETT_GPU_BENCH_ARGS is appended to every phase's
# arguments (to rehearse on a CPU: --device cpu and small steps).
# Label agreement (GPU fp16 against CPU fp32) needs the real weights, which
# do not fit beside .whl: a second call, carrying .agree (bench/gpu_agreement.py).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/diglett-gpu}"
mkdir -p "$out"
start=$SECONDS
if ! python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
  >"$out/pip.log" 2>&1; then
  tail -20 "$out/pip.log"
  exit 1
fi
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true
# The GPU's busy share every 0.5 s, to line up with the phases' times below
# (is the GPU the limit, or what feeds it?).
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv \
  -lms 500 >"$out/gpu_util.csv" 2>/dev/null &
util_pid=$!
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))'
echo "installed in $((SECONDS - start)) s"

read -r -a extra <<<"${DIGLETT_GPU_BENCH_ARGS:-}"
phase() { # name, time limit in s, gpu_embed.py arguments...
  local name=$1 limit=$2
  shift 2
  echo "== $name (at $((SECONDS - start)) s, $(date +%T))"
  timeout -k 10 "$limit" python3 -m bench.gpu_embed --out "$out/$name.json" "$@" \
    "${extra[@]}" >"$out/$name.log" 2>&1
  echo "exit $?"
  grep '^{' "$out/$name.log" || tail -20 "$out/$name.log"
  # What a run cut short left behind would hold the GPU and the cores.
  pkill -9 -f 'raylet|gcs_server|default_worker|ray::' 2>/dev/null
  sleep 2
}
common=(--batch-size 512 --seconds 12 --loaders 8 --batchers 4)
# Typical: ~100 s per eager phase (start, warm-up of 11 shapes, 4 steps),
# ~200 s compiled (two compiles, ~80 s the first); the limits sum to 540 s.
phase eager1 130 "${common[@]}" --streams 1 --steps 2000,3000,4000,5000
phase eager2 130 "${common[@]}" --streams 2 --steps 2000,3000,4000,5000
phase compiled 280 "${common[@]}" --streams 2 --compile --batch-shapes 256,512 \
  --steps 4000,6000,8000,10000
kill "$util_pid" 2>/dev/null
echo "done in $((SECONDS - start)) s ($(date +%T))"
