"""The prepared GPU benchmark (bench/gpu_embed.py) runs, here on the CPU.

Its one chance on a lent GPU machine must not be spent finding that it
cannot start. So it runs here as it would there: its own local Ray, no
HAProxy binary (the GPU machine has none; a path that does not exist makes
Ray refuse to find one), the random-weight ECAPA, fixed batch shapes, and
every window it offers must come back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.serve


def test_gpu_benchmark_runs_without_haproxy_and_reports_every_step(tmp_path):
    from serve_app.serve_env import SERVE_ENV

    out = tmp_path / "gpu_embed.json"
    env = {
        **os.environ,
        # Serve's data-path settings already in the driver's environment
        # (as after `diglett serve` or another test): its handles then
        # need an event loop, which a plain script has not.
        **SERVE_ENV,
        "RAY_SERVE_HAPROXY_BINARY_PATH": "/nonexistent/haproxy",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        sys.executable,
        "-m",
        "bench.gpu_embed",
        "--embedder=ecapa-random",
        "--device=cpu",
        "--batch-size=4",
        "--batch-shapes=2,4",
        "--steps=1,2",
        "--seconds=2",
        "--warm-up-s=0",
        "--keep-going",
        "--loaders=1",
        "--batchers=1",
        f"--out={out}",
    ]
    proc = subprocess.run(
        cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    replica = result["replica"]
    assert replica["device"] == "cpu" and replica["batch_shapes"] == [2, 4]
    assert replica["warm_up_s"] > 0 and replica["model_threads"] == 1
    assert [s["sessions"] for s in result["steps"]] == [1, 2]
    for step in result["steps"]:
        assert step["errors"] == 0, step["first_error"]
        # Every window offered came back (the step waits for its stragglers).
        assert step["windows_done"] == step["windows_offered"] > 0
        assert step["latency_ms_p50"] > 0
