"""`diglett serve` end to end: ready on the direct route, and a stop by
SIGTERM to its process group (a service manager's stop, `kill -- -PGID`)
as clean as Ctrl-C: nothing left holding the port.

Killed by SIGTERM, `serve run` used to leave Serve's HAProxy running as an
orphan on the Serve port, and the next `diglett serve` could not start.

It starts Serve with HAProxy's fixed ports, so it runs in `make test`'s
second pytest process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from diglett.leftovers import orphaned_haproxies, port_free
from conftest import free_ports, model_dir, needs_model

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.serve, needs_model]


def test_serve_is_ready_on_the_direct_route_and_stops_cleanly_on_sigterm(tmp_path):

    [port] = free_ports(1)
    log = tmp_path / "serve.log"
    env = {
        **os.environ,
        "DIGLETT_PORT": str(port),
        "DIGLETT_HOST": "127.0.0.1",
        "DIGLETT_MODEL_DIR": str(model_dir()),
        # The real model and the default warm pool: with the no-op model and
        # a pool of one, the old `serve run` happened to stop before its
        # HAProxy was orphaned, and this test passed on the old code.
    }
    env.pop("RAY_ADDRESS", None)
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "diglett.cli", "serve"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, to signal whole
        )
    try:
        deadline = time.monotonic() + 240
        while "diglett: ready" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz") as r:
            assert json.loads(r.read()) == {"status": "ok", "route": "direct"}

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(90)
        deadline = time.monotonic() + 15
        while not port_free("127.0.0.1", port):
            assert time.monotonic() < deadline, "the Serve port is still held"
            time.sleep(0.5)
        assert orphaned_haproxies() == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
