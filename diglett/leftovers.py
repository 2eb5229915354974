"""What an earlier server left behind on this machine, found before a start.

Ray Serve runs HAProxy as a child of its `HAProxyManager` actor. When that
actor's process is killed rather than stopped (the server got SIGTERM or
SIGKILL instead of Ctrl-C), HAProxy lives on as an orphan and keeps the
Serve port: the next `diglett serve` then cannot start its own HAProxy
("Some protocols failed to start their listeners"), and the orphan answers
every request with 500, since the replicas it knew are gone.

Linux only (reads /proc); elsewhere it finds nothing.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

PROC = Path("/proc")
HAPROXY_OWNER = "ray::HAProxyManager"  # Ray's process title for its parent
HAPROXY_CONFIG_DIR = "/haproxy-serve/"  # in every Serve HAProxy's config path


def port_free(host: str, port: int) -> bool:
    """Whether a listener could bind `host`:`port` now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _cmdline(pid: int | str) -> list[str]:
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _parent(pid: int | str) -> int | None:
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("PPid:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def orphaned_haproxies() -> list[int]:
    """PIDs of Serve's HAProxy processes (this user's) whose HAProxyManager
    is gone: their parent is not a process titled `ray::HAProxyManager`."""
    found = []
    for entry in PROC.iterdir() if PROC.is_dir() else ():
        if not entry.name.isdigit():
            continue
        argv = _cmdline(entry.name)
        if not argv or os.path.basename(argv[0]) != "haproxy":
            continue
        if not any(HAPROXY_CONFIG_DIR in a for a in argv[1:]):
            continue
        parent = _parent(entry.name)
        owner = _cmdline(parent) if parent else []
        if not (owner and owner[0].startswith(HAPROXY_OWNER)):
            found.append(int(entry.name))
    return sorted(found)


def stop(pids: list[int], wait_s: float = 5.0) -> list[int]:
    """SIGTERM `pids`; returns those still alive after `wait_s`."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + wait_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if (PROC / str(p)).exists() and not _zombie(p)]
    return alive


def _zombie(pid: int) -> bool:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "Z"  # the state after (comm)
