#!/usr/bin/env python
"""Per-session cost: start-up time and private memory with N sessions at once.

Opens `--sessions` WebSockets at the same moment against a local server with
the BENCHMARK-ONLY no-op embedder (start-up and memory do not depend on the
model), and reports:

- start-up: time from opening the WebSocket to `ready` (the SessionActor is
  created or taken from the warm pool, and attached), p50/p95/max;
- memory: the USS (private memory) of every SessionActor process after each
  session enrolled two speakers and streamed `--stream-s` seconds of real
  speech, next to a bare Ray actor's USS on the same machine. With the fork
  server (`DIGLETT_SESSION_FORK=1`, opt-in) a session's private memory
  is its worker's USS plus its shim's (`session_uss_mean_mib`); the fork
  server itself is shared by all, and `pss_per_session_mib` counts it and
  every shared page, split among the processes that map it.

    python bench/sessions_start.py --sessions 100
    python bench/sessions_start.py --sessions 100 --pool 0   # no warm pool
    DIGLETT_SESSION_FORK=1 python bench/sessions_start.py    # forked workers
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.load import (
    SPEAKERS,
    _voices,
    enroll_all,
    session_pids,
    wait_for_pool,
)  # noqa: E402
from diglett.audio import encode_s16  # noqa: E402


async def _one(
    url: str, enrolls, conv: np.ndarray, stream_s: float, opened=None, hold=None
):
    """One session: open (timed), wait until all are open (`opened`, if
    given), enroll, stream, then wait for `hold` (if given) and `end`."""
    import websockets

    t0 = time.monotonic()
    async with websockets.connect(
        url, max_size=2**24, open_timeout=300, compression=None
    ) as ws:
        ready = json.loads(await ws.recv())
        start_s = time.monotonic() - t0
        if opened is not None:
            await opened()
        if ready["type"] != "ready":
            return start_s, ready.get("code", "refused")
        failed = await enroll_all(ws, enrolls)
        if failed:
            return start_s, failed
        await ws.send(json.dumps({"type": "stream"}))
        n = int(stream_s * 16000)
        for i in range(0, n, 16000):
            await ws.send(encode_s16(conv[i : i + 16000]))
        labels = 0
        while labels < n // 8000:
            labels += json.loads(await ws.recv())["type"] == "label"
        if hold is not None:
            await hold.wait()
        await ws.send(json.dumps({"type": "end"}))
        async for _ in ws:
            pass
    return start_s, ""


# The processes a session costs: its SessionActor and, when forked, the shim
# Ray started for it (actors/fork_shim.py); the node's fork server is shared.
ROLES = (
    ("actor", lambda cmd: cmd.startswith("ray::SessionActor")),
    ("shim", lambda cmd: "fork_shim.py" in cmd),
    ("server", lambda cmd: "actors.fork_server" in cmd),
)


def _session_memory() -> dict[str, list[tuple[float, float]]]:
    """{role: [(USS, PSS) in MiB of each process]}, in one pass and one
    smaps read per process. PSS splits each shared page among the processes
    that map it."""
    out: dict[str, list[tuple[float, float]]] = {role: [] for role, _ in ROLES}
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        role = next((r for r, match in ROLES if match(cmd)), None)
        if role is None:
            continue
        try:
            info = p.memory_full_info()
        except psutil.Error:
            continue
        out[role].append((info.uss / 2**20, info.pss / 2**20))
    return out


async def _idle_cpu(seconds: float) -> dict[str, float]:
    """With every session open, enrolled and silent: the machine's busy
    share and each SessionActor's (shim included) share of a core, over
    `seconds`. An idle Ray actor's main thread wakes every 10 ms to check
    for signals (Ray's CoreWorker, not configurable), which sets the floor."""
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(match(cmd) for role, match in ROLES if role != "server"):
            procs.append(p)

    def used() -> float:
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    machine0, own0, t0 = psutil.cpu_times(), used(), time.monotonic()
    await asyncio.sleep(seconds)
    machine1, own1, wall = psutil.cpu_times(), used(), time.monotonic() - t0
    span = sum(machine1) - sum(machine0)
    idle = (machine1.idle + machine1.iowait) - (machine0.idle + machine0.iowait)
    actors = sum(1 for p in procs if "SessionActor" in " ".join(p.cmdline()))
    return {
        "machine_busy_pct": round(100 * (1 - idle / span), 2),
        "session_core_pct": round(100 * (own1 - own0) / wall / max(1, actors), 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sessions", type=int, default=100)
    ap.add_argument("--stream-s", type=float, default=4.0)
    ap.add_argument("--pool", type=int, default=-1, help="warm pool (-1: default)")
    ap.add_argument("--data", type=Path, default=SPEAKERS)
    ap.add_argument(
        "--idle-s", type=float, default=20.0, help="idle CPU measured this long"
    )
    args = ap.parse_args()

    os.environ["DIGLETT_EMBEDDER"] = "noop"
    os.environ["DIGLETT_MAX_SESSIONS"] = str(max(500, args.sessions))
    if args.pool >= 0:
        os.environ["DIGLETT_SESSION_POOL"] = str(args.pool)
    import ray
    from ray import serve

    from diglett.settings import Settings
    from serve_app.app import build_app
    from serve_app.serve_env import start_local_serve, wait_until_healthy

    port = start_local_serve()  # Ray and Serve as `diglett serve` runs them
    serve.run(build_app(), name="diglett", route_prefix="/")
    wait_until_healthy(f"http://127.0.0.1:{port}")  # not via the fallback
    pool_fill_s = wait_for_pool()  # as on a server up for a while
    time.sleep(2.0)

    @ray.remote(num_cpus=0)
    class Bare:
        def pid(self) -> int:
            return os.getpid()

    bare = Bare.remote()
    bare_uss = psutil.Process(ray.get(bare.pid.remote())).memory_full_info().uss
    bare_uss /= 2**20
    enrolls, conv = _voices(args.data)
    url = f"ws://127.0.0.1:{port}/v1/stream"

    async def run():
        hold, all_open = asyncio.Event(), asyncio.Event()
        count = [0]

        async def opened():
            """Start-up is timed with no other session busy yet."""
            count[0] += 1
            if count[0] == args.sessions:
                all_open.set()
            await all_open.wait()

        tasks = [
            asyncio.create_task(_one(url, enrolls, conv, args.stream_s, opened, hold))
            for _ in range(args.sessions)
        ]
        # Every session streamed: measure while all are still open.
        while True:
            await asyncio.sleep(2.0)
            if all(t.done() for t in tasks):
                break
            pids = session_pids()
            if len(pids) >= args.sessions:
                await asyncio.sleep(args.stream_s + 10.0)
                break
        by_role = _session_memory()
        actors = by_role["actor"]
        mem = {
            "uss": [uss for uss, _ in actors],
            "shim_uss": [uss for uss, _ in by_role["shim"]],
            "server_uss": [uss for uss, _ in by_role["server"]],
            # Everything the sessions cost, shared pages included, per session.
            "pss_per_session": sum(
                pss for procs in by_role.values() for _, pss in procs
            )
            / max(1, len(actors)),
        }
        mem["idle"] = await _idle_cpu(args.idle_s)
        hold.set()
        return await asyncio.gather(*tasks), mem

    t0 = time.monotonic()
    results, mem = asyncio.run(run())
    uss, shim_uss = mem["uss"], mem["shim_uss"]
    wall = time.monotonic() - t0
    start = np.array([s for s, _ in results])
    errors = sorted({e for _, e in results if e})
    row = {
        "sessions": args.sessions,
        "pool": Settings.from_env().session_pool,
        "errors": errors,
        "start_p50_s": round(float(np.percentile(start, 50)), 3),
        "start_p95_s": round(float(np.percentile(start, 95)), 3),
        "start_max_s": round(float(start.max()), 3),
        "session_actors_measured": len(uss),
        "uss_mean_mib": round(float(np.mean(uss)), 1) if uss else None,
        "uss_p95_mib": round(float(np.percentile(uss, 95)), 1) if uss else None,
        "shims_measured": len(shim_uss),
        "shim_uss_mean_mib": round(float(np.mean(shim_uss)), 2) if shim_uss else 0.0,
        "fork_server_uss_mib": [round(u, 1) for u in mem["server_uss"]],
        # A session's own private memory: its worker, and its shim if forked.
        "session_uss_mean_mib": (
            round(
                float(np.mean(uss)) + (float(np.mean(shim_uss)) if shim_uss else 0.0), 1
            )
            if uss
            else None
        ),
        "pss_per_session_mib": round(mem["pss_per_session"], 1),
        "bare_actor_uss_mib": round(bare_uss, 1),
        # All sessions open, enrolled and silent (issue #25: idle <= 0.1 %).
        "idle_machine_busy_pct": mem["idle"]["machine_busy_pct"],
        "idle_session_core_pct": mem["idle"]["session_core_pct"],
        "pool_fill_s": round(pool_fill_s, 1),  # every pooled worker started
        "wall_s": round(wall, 1),
    }
    print(json.dumps(row))
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
