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

from diglett.leftovers import orphaned_haproxies, port_free, stop
from bench.local_cluster import free_ports
from conftest import model_dir, needs_model

ROOT = Path(__file__).resolve().parents[2]

SIGINT_QUIT = (signal.SIGINT, signal.SIGQUIT)


def _sig_mask(pid: int, field: str) -> int:
    """A signal set of /proc/PID/status (`SigIgn`, `SigCgt`): bit N-1 is
    signal N."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_serve_run_stops_on_sigint_when_diglett_runs_as_a_background_job():
    """A background shell job (`nohup make serve &`, a CI script) starts with
    SIGINT and SIGQUIT ignored, and an ignored signal stays ignored across
    exec: `serve run`, started as `diglett serve` starts it, must still take
    SIGINT, its clean stop, as a KeyboardInterrupt."""
    from serve_app.cli import start_serve_run

    child = (
        "import sys, time\n"
        "try:\n"
        "    print('up', flush=True)\n"
        "    time.sleep(60)\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(3)\n"
    )
    saved = {s: signal.signal(s, signal.SIG_IGN) for s in SIGINT_QUIT}
    try:
        proc = start_serve_run(
            [sys.executable, "-c", child], stdout=subprocess.PIPE, text=True
        )
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    try:
        assert proc.stdout.readline() == "up\n"
        for signum in SIGINT_QUIT:
            assert not _sig_mask(proc.pid, "SigIgn") & 1 << signum - 1, signum
        # Python's KeyboardInterrupt handler is in place, as in `serve run`.
        assert _sig_mask(proc.pid, "SigCgt") & 1 << signal.SIGINT - 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def _ignore_sigint_and_sigquit() -> None:
    for signum in SIGINT_QUIT:
        signal.signal(signum, signal.SIG_IGN)


def _children(pid: int) -> list[int]:
    try:
        return [
            int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        ]
    except OSError:
        return []


def _stop_leftovers(groups: list[int], port: int) -> None:
    """After a failed stop: end the process groups of `serve run` that
    outlived diglett (SIGTERM, then SIGKILL) and the HAProxy they orphan,
    so that the tests after this one find the port free."""
    left = False
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        left = True
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)
        else:
            os.killpg(pgid, signal.SIGKILL)
    # HAProxy is orphaned once its manager, a Ray actor, has ended too.
    deadline = time.monotonic() + (30 if left else 0)
    while True:
        stop(orphaned_haproxies())
        if port_free("127.0.0.1", port) or time.monotonic() > deadline:
            break
        time.sleep(1)


@pytest.mark.serve
@needs_model
def test_serve_is_ready_on_the_direct_route_and_stops_cleanly_on_sigterm(tmp_path):
    """Started as a background shell job starts it, with SIGINT and SIGQUIT
    ignored (`nohup make serve &`): `serve run` must still get the SIGINT
    that diglett passes on. Without a terminal, SIGTERM is how it is stopped."""

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
    serve_runs: list[int] = []
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "serve_app.cli", "serve"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, to signal whole
            preexec_fn=_ignore_sigint_and_sigquit,
        )
    try:
        deadline = time.monotonic() + 240
        while "diglett: ready" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        serve_runs = _children(proc.pid)  # `serve run`, in a session of its own
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
        _stop_leftovers(serve_runs, port)
