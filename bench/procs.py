"""The server's processes on this machine, by role: CPU, memory, SessionActors.

The benchmarks that run a server attribute what it costs to what each
process does (its Ray process title); this is the one table of those roles.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import psutil

from actors.fork_server import with_forked_workers

# (name, what its command line holds), the first match wins; Ray's process
# titles are `ray::<Actor class>`, its binaries raylet and gcs_server. HAProxy
# (Serve's, started by its HAProxyManager actor) carries every WebSocket
# message; every node runs a dashboard agent and a runtime-env agent.
ROLES = (
    ("model", "EmbeddingDeployment"),
    ("ingress", "Ingress"),
    ("proxy", "ProxyActor"),
    ("sessions", "SessionActor"),
    ("batcher", "EmbedBatcher"),
    ("controller", "ServeController"),
    ("raylet", "raylet"),
    ("gcs", "gcs_server"),
    ("haproxy", "haproxy"),
    ("agents", "Agent"),
)
TITLES = dict(ROLES)


def cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def role(command: str) -> str:
    """The role of a process with this command line, or "other". A worker
    still starting (`default_worker.py --raylet-…`) is not the raylet."""
    name = next((name for name, key in ROLES if key in command), "other")
    if name == "raylet" and "raylet" not in command.split(" ", 1)[0]:
        return "other"
    return name


def server_procs() -> list[psutil.Process]:
    """The local server's processes: everything this process started (Ray's
    GCS, raylet, agents, workers) and the SessionActors the fork server
    forked (not our descendants); with none (a server reached by URL),
    every Ray process on the machine."""
    procs = psutil.Process().children(recursive=True)
    if procs:
        return with_forked_workers(procs)
    return [
        p
        for p in psutil.process_iter()
        if any(k in cmdline(p) for k in ("ray::", "raylet", "gcs_server"))
    ]


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent outside its idle loop so far
    (every process's, not only the server's; time stolen by the host is
    not counted)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)


def cpu_by_pid() -> dict[int, tuple[str, float]]:
    """{pid: (role, CPU seconds so far)} of the server's processes."""
    out = {}
    for p in server_procs():
        try:
            out[p.pid] = (role(" ".join(p.cmdline())), sum(p.cpu_times()[:2]))
        except psutil.Error:
            pass
    return out


def cpu_by_role(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds per role between two `cpu_by_pid` snapshots (a worker
    that took up a role meanwhile counts under it)."""
    roles: dict[str, float] = {}
    for pid, (name, cpu) in after.items():
        roles[name] = roles.get(name, 0.0) + cpu - before.get(pid, (name, 0.0))[1]
    return roles


async def track_cpu(
    seen: dict,
    every_s: float = 1.0,
    snapshot: Callable[[], dict[int, tuple[str, float]]] = cpu_by_pid,
) -> None:
    """Keep `seen` ({pid: (role, CPU s)}) at each server process's latest
    reading (`snapshot`'s), so that processes which end before the
    measurement does (a session's SessionActor ends with it) still count,
    less their last second."""
    while True:
        seen.update(snapshot())
        await asyncio.sleep(every_s)


def memory_by_role(procs: list | None = None) -> dict[str, dict[str, float]]:
    """{role: {rss_mib, uss_mib, count}} of `procs` (the server's
    processes by default), and their "total"."""
    out: dict[str, dict[str, float]] = {}
    for p in server_procs() if procs is None else procs:
        try:
            command = cmdline(p) or p.name()
            info = p.memory_full_info()
        except psutil.Error:
            continue
        row = out.setdefault(
            role(command), {"rss_mib": 0.0, "uss_mib": 0.0, "count": 0}
        )
        row["rss_mib"] += info.rss / 2**20
        row["uss_mib"] += info.uss / 2**20
        row["count"] += 1
    total = {"rss_mib": 0.0, "uss_mib": 0.0, "count": 0}
    for row in out.values():
        for k in total:
            total[k] += row[k]
    out["total"] = total
    return out


def session_pids() -> list[int]:
    """PIDs of the SessionActors on this machine (pooled ones included)."""
    return [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if " ".join(p.info["cmdline"] or []).startswith("ray::SessionActor")
    ]


def wait_for_pool(timeout_s: float = 300.0) -> float:
    """Wait until the ingress's warm pool of SessionActors has filled, as on
    a server that has been up a while; returns the seconds it took."""
    from diglett.settings import Settings

    pool = Settings.from_env().session_pool
    t0 = time.monotonic()
    while len(session_pids()) < pool and time.monotonic() - t0 < timeout_s:
        time.sleep(0.5)
    return time.monotonic() - t0


def bare_actor() -> tuple[object, float]:
    """A Ray actor that does nothing, on the running local Ray instance, and
    its private memory in MiB: the floor under a SessionActor's. It lives
    while its handle is kept."""
    import os

    import ray

    @ray.remote(num_cpus=0)
    class Bare:
        def pid(self) -> int:
            return os.getpid()

    bare = Bare.remote()
    uss = psutil.Process(ray.get(bare.pid.remote())).memory_full_info().uss
    return bare, uss / 2**20


# The processes a session costs: its SessionActor and, when forked, the shim
# Ray started for it (actors/fork_shim.py); the node's fork server is shared.
SESSION_ROLES = (
    ("actor", lambda cmd: cmd.startswith("ray::SessionActor")),
    ("shim", lambda cmd: "fork_shim.py" in cmd),
    ("server", lambda cmd: "actors.fork_server" in cmd),
)


def session_memory() -> dict[str, list[tuple[float, float]]]:
    """{SESSION_ROLES name: [(USS, PSS) in MiB of each process]}, in one
    pass and one smaps read per process. PSS splits each shared page among
    the processes that map it."""
    out: dict[str, list[tuple[float, float]]] = {r: [] for r, _ in SESSION_ROLES}
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        name = next((r for r, match in SESSION_ROLES if match(cmd)), None)
        if name is None:
            continue
        try:
            info = p.memory_full_info()
        except psutil.Error:
            continue
        out[name].append((info.uss / 2**20, info.pss / 2**20))
    return out
