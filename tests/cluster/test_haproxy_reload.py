"""A WebSocket outlives an HAProxy reload.

HAProxy reloads (starts a new process) whenever the set of ingress
replicas changes: at start and at every scale-up or -down. The old process
keeps the connections it carries, until Ray's default hard stop kills it
120 s later, and with it every session it carried, without a close frame.
Here a live session must still be answered well past that, after a reload
set off by deploying a second application, with the hard stop that Diglett
starts Ray with (serve_app/serve_env.py), not a developer's own.

It holds a session open for over two minutes, so it runs in `make test`'s
second pytest process, beside the multi-node test, where no other Serve
instance holds HAProxy's fixed ports.
"""

from __future__ import annotations

import json
import os
import time

import psutil
import pytest
from websockets.sync.client import connect

from conftest import model_dir

pytestmark = pytest.mark.serve

RAY_DEFAULT_HARD_STOP_S = 120.0
HOLD_S = RAY_DEFAULT_HARD_STOP_S + 15.0
OWN_ENV = {
    # BENCHMARK ONLY embedder: this test needs sessions, not embeddings.
    "DIGLETT_EMBEDDER": "noop",
    "DIGLETT_SESSION_POOL": "1",
}
SERVE_DEFAULTS = ("RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S", "RAY_SERVE_PORT_QUARANTINE_S")


def haproxy_pids() -> set[int]:
    return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "haproxy"}


def format_ok(ws) -> None:
    """One request and its answer on the session (a `format` before audio)."""
    ws.send(
        json.dumps({"type": "format", "sample_rate": 16000, "encoding": "pcm_s16le"})
    )
    msg = json.loads(ws.recv(timeout=10))
    assert msg["type"] == "format_ok", msg


@pytest.fixture(scope="module")
def local_serve():
    """The app on a local Ray instance, as `diglett serve` runs it; yields
    its port. Environment changes are undone afterwards."""
    import ray
    from ray import serve

    from serve_app.serve_env import start_local_serve, wait_until_healthy

    saved = {k: os.environ.get(k) for k in (*OWN_ENV, *SERVE_DEFAULTS)}
    for key in SERVE_DEFAULTS:
        os.environ.pop(key, None)
    os.environ.update(OWN_ENV)
    mdir = model_dir()
    if mdir is not None:
        os.environ.setdefault("DIGLETT_MODEL_DIR", str(mdir))
    try:
        port = start_local_serve(num_cpus=2, object_store_memory=300 * 2**20)
        from serve_app.app import build_app

        serve.run(build_app(), name="diglett", route_prefix="/")
        assert wait_until_healthy(f"http://127.0.0.1:{port}")
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_a_session_is_answered_past_rays_hard_stop_after_a_reload(local_serve):
    from ray import serve

    url = f"ws://127.0.0.1:{local_serve}/v1/stream"
    with connect(url, open_timeout=30) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "ready"
        format_ok(ws)
        before = haproxy_pids()

        @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
        def another_app(request) -> str:
            return "ok"

        serve.run(another_app.bind(), name="another", route_prefix="/another")
        deadline = time.monotonic() + 30
        while not haproxy_pids() - before:
            assert time.monotonic() < deadline, "HAProxy did not reload"
            time.sleep(0.2)
        reloaded = time.monotonic()
        # The process that carries this session is the one reloaded out.
        assert before & haproxy_pids(), "no HAProxy process outlived the reload"

        while time.monotonic() - reloaded < HOLD_S:
            format_ok(ws)
            time.sleep(5)
        format_ok(ws)

    # New sessions take the new process.
    with connect(url, open_timeout=30) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "ready"
        format_ok(ws)
