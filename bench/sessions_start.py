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

    python -m bench.sessions_start --sessions 100
    python -m bench.sessions_start --sessions 100 --pool 0   # no warm pool
    DIGLETT_SESSION_FORK=1 python -m bench.sessions_start    # forked workers
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np
import psutil

from bench import harness as hn
from bench import procs
from bench.harness import SPEAKERS, Server

READY_TIMEOUT_S = 300.0  # many sessions opening at once with no warm pool


async def _one(
    srv: Server, enrolls, conv: np.ndarray, stream_s: float, opened=None, hold=None
) -> tuple[float, str]:
    """One session: open (timed), wait until all are open (`opened`, if
    given), enroll, stream, then wait for `hold` (if given) and `end`;
    (seconds to `ready`, "" or the error that stopped it)."""
    want = int(stream_s * hn.SAMPLE_RATE) // hn.HOP_SAMPLES  # labels streamed
    labels, labelled = [0], asyncio.Event()

    def on_label(_: dict) -> None:
        labels[0] += 1
        if labels[0] >= want:
            labelled.set()

    t0 = time.monotonic()
    try:
        conn = await hn.connect(srv, on_label, ready_timeout_s=READY_TIMEOUT_S)
    except Exception as exc:
        start_s = time.monotonic() - t0
        if opened is not None:
            await opened()
        return start_s, hn.error_code(exc)
    start_s = time.monotonic() - t0
    try:
        if opened is not None:
            await opened()
        for name, x in enrolls:
            await hn.enroll(conn, name, x)
        await conn.send_json({"type": "stream"})
        n = int(stream_s * hn.SAMPLE_RATE)
        await hn.stream(conn, conv[:n], hn.SAMPLE_RATE, speed=0)
        await asyncio.wait_for(labelled.wait(), READY_TIMEOUT_S)
        if hold is not None:
            await hold.wait()
        await hn.finish(conn)
    except Exception as exc:
        return start_s, hn.error_code(exc)
    finally:
        await conn.close()
    return start_s, ""


async def _idle_cpu(seconds: float) -> dict[str, float]:
    """With every session open, enrolled and silent: the machine's busy
    share and each SessionActor's (shim included) share of a core, over
    `seconds`. An idle Ray actor's main thread wakes every 10 ms to check
    for signals (Ray's CoreWorker, not configurable), which sets the floor."""
    watched = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(match(cmd) for role, match in procs.SESSION_ROLES if role != "server"):
            watched.append(p)

    def used() -> float:
        total = 0.0
        for p in watched:
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
    actors = sum(1 for p in watched if "SessionActor" in " ".join(p.cmdline()))
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

    env = {
        "DIGLETT_EMBEDDER": "noop",
        "DIGLETT_MAX_SESSIONS": str(max(500, args.sessions)),
    }
    if args.pool >= 0:
        env["DIGLETT_SESSION_POOL"] = str(args.pool)
    enrolls, conv = hn.voices(args.data)
    with hn.local_server(env) as srv:
        return _measure(args, srv, enrolls, conv)


def _measure(args, srv: Server, enrolls, conv: np.ndarray) -> int:
    """Everything but the server's start: the pool, the sessions, the row."""
    from diglett.settings import Settings

    pool_fill_s = procs.wait_for_pool()  # as on a server up for a while
    time.sleep(2.0)
    bare, bare_uss = procs.bare_actor()  # alive, as a session's neighbour

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
            asyncio.create_task(_one(srv, enrolls, conv, args.stream_s, opened, hold))
            for _ in range(args.sessions)
        ]
        # Every session streamed: measure while all are still open.
        while True:
            await asyncio.sleep(2.0)
            if all(t.done() for t in tasks):
                break
            pids = procs.session_pids()
            if len(pids) >= args.sessions:
                await asyncio.sleep(args.stream_s + 10.0)
                break
        by_role = procs.session_memory()
        actors = by_role["actor"]
        mem = {
            "uss": [uss for uss, _ in actors],
            "shim_uss": [uss for uss, _ in by_role["shim"]],
            "server_uss": [uss for uss, _ in by_role["server"]],
            # Everything the sessions cost, shared pages included, per session.
            "pss_per_session": sum(
                pss for group in by_role.values() for _, pss in group
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
