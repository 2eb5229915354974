"""Shared fixtures: paths to the real data and model, and a live Serve app."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from diglett.engine.audio import encode_s16

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SPEAKERS = SHARED / "data" / "speakers"
SHARED_MODEL = SHARED / "models" / "spkrec-ecapa-voxceleb"

API_TOKEN = "test-token-0123456789"
# The suite's replicas serve the traced int8 model: with the default, the
# first replica would build the compiled one in the background (~2 min of
# idle CPU) and the replicas started after it would load it, so what a test
# ran on would depend on timing. tests/serve/test_compiled_int8.py builds and
# serves it on purpose; DIGLETT_CPU_COMPILE=1 make test runs the suite on it.
os.environ.setdefault("DIGLETT_CPU_COMPILE", "0")
E2E_ENV = {
    "DIGLETT_API_TOKEN": API_TOKEN,
    "DIGLETT_SESSION_TTL_S": "4",
    "DIGLETT_MAX_SESSIONS": "8",
}


def pytest_runtest_setup(item) -> None:
    """Hide SpeechBrain's lazy modules from Hypothesis.

    Hypothesis scans `sys.modules` for constants, and touching one of
    SpeechBrain's lazy placeholders imports an optional package (k2) that is
    not installed, failing the test. The placeholders load nothing we use.
    """
    if getattr(getattr(item, "obj", None), "is_hypothesis_test", False):
        for name, mod in list(sys.modules.items()):
            if type(mod).__name__ in ("LazyModule", "DeprecatedModuleRedirect"):
                sys.modules.pop(name, None)


def model_dir() -> Path | None:
    """The model folder to test with: $DIGLETT_MODEL_DIR or the shared copy."""
    configured = os.environ.get("DIGLETT_MODEL_DIR")
    if configured:
        return Path(configured)
    return SHARED_MODEL if SHARED_MODEL.is_dir() else None


needs_model = pytest.mark.skipif(
    model_dir() is None,
    reason="no model: set DIGLETT_MODEL_DIR (or provide ../shared/models)",
)
needs_speakers = pytest.mark.skipif(
    not (SPEAKERS / "manifest.csv").is_file(), reason="no ../shared/data/speakers"
)


def utterances() -> dict[str, list[Path]]:
    """Dev-set utterances by speaker, longest first."""
    rows = list(csv.DictReader((SPEAKERS / "manifest.csv").open()))
    by: dict[str, list[tuple[float, Path]]] = {}
    for r in rows:
        by.setdefault(r["speaker"], []).append(
            (float(r["duration_s"]), SPEAKERS / r["file"])
        )
    return {k: [p for _, p in sorted(v, reverse=True)] for k, v in by.items()}


def load16(path: Path) -> np.ndarray:
    """A dev-set WAV as float32 at 16 kHz, shape (n,)."""
    x, rate = sf.read(path, dtype="float32")
    assert rate == 16000
    return x


to_s16 = encode_s16


def fresh_python(code: str, env: dict) -> str:
    """The last line `code` prints in a fresh interpreter with `env`, run
    from the repository root (for what a module reads at import time)."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def server():
    """The real Serve app on a local Ray instance; yields its base URLs."""
    mdir = model_dir()
    if mdir is None:
        pytest.skip("no model available")
    os.environ["DIGLETT_MODEL_DIR"] = str(mdir)
    os.environ.update(E2E_ENV)
    import ray
    from ray import serve

    from serve_app.serve_env import start_local_serve, wait_until_healthy

    port = start_local_serve(num_cpus=2, object_store_memory=400 * 2**20)
    from serve_app.app import build_app

    t0 = time.monotonic()
    serve.run(build_app(), name="diglett", route_prefix="/")
    startup_s = time.monotonic() - t0
    # As clients of `diglett serve` find it: HAProxy routing to the ingress.
    assert wait_until_healthy(f"http://127.0.0.1:{port}")
    yield {
        "http": f"http://127.0.0.1:{port}",
        "ws": f"ws://127.0.0.1:{port}/v1/stream",
        "startup_s": startup_s,
    }
    serve.shutdown()
    ray.shutdown()
    for key in E2E_ENV:
        os.environ.pop(key, None)
