#!/usr/bin/env python
"""Session churn: the server CPU a session costs, SessionActors recycled or not.

Waves of `--wave` sessions (default: the warm pool's size) each connect,
enroll two speakers, stream `--stream-s` s of real speech, wait for its
labels and send `end`; the next wave opens `--gap-s` later, past the pool keeper's
quiet time, so the pool refills between waves as on a live server. The
server runs the BENCHMARK-ONLY no-op embedder: this is what a session costs
the serving path, start-up included.

Reports, per session: the machine's CPU time outside this process, the time
to `ready` (p50/p95), and how many SessionActor processes were started; and
the private memory (USS) of the pooled actors after the waves (recycled
ones have served several sessions).
With `DIGLETT_SESSION_RECYCLE=1` (the default) a session that ends cleanly
hands its actor, reset, back to the warm pool; with 0 it is ended and the
pool's keeper starts another (~0.75 s of CPU here, 0.47 s of it Ray's
setup_worker.py). The two run side by side, interleaved, each round on a
fresh local server.

    python -m bench.churn --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

from bench import harness as hn
from bench import procs
from bench.harness import RESULTS, SPEAKERS, Server
from bench.sessions_start import _one


async def _waves(args, srv: Server, enrolls, conv) -> tuple[list, set[int]]:
    """Run the waves; returns the sessions' results and every SessionActor
    pid seen meanwhile (sampled often: each lives for a whole session)."""
    seen: set[int] = set(procs.session_pids())
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            seen.update(procs.session_pids())
            await asyncio.sleep(0.25)

    watcher = asyncio.create_task(watch())
    results: list = []
    for _ in range(args.waves):
        wave = [_one(srv, enrolls, conv, args.stream_s) for _ in range(args.wave)]
        results += await asyncio.gather(*wave)
        await asyncio.sleep(args.gap_s)
    stop.set()
    await watcher
    return results, seen


def run_one(args) -> dict:
    """One server with DIGLETT_SESSION_RECYCLE=args.recycle; its row."""
    from diglett.settings import Settings

    env = {"DIGLETT_EMBEDDER": "noop", "DIGLETT_SESSION_RECYCLE": str(args.recycle)}
    os.environ.update(env)
    pool = Settings.from_env().session_pool
    args.wave = args.wave or pool
    enrolls, conv = hn.voices(args.data)
    with hn.local_server(env) as srv:
        procs.wait_for_pool()
        time.sleep(3.0)
        pooled = set(procs.session_pids())
        own = psutil.Process()
        busy0, own0, t0 = (
            procs.machine_busy_s(),
            sum(own.cpu_times()[:2]),
            time.monotonic(),
        )
        results, seen = asyncio.run(_waves(args, srv, enrolls, conv))
        wall = time.monotonic() - t0
        server_cpu = procs.machine_busy_s() - busy0 - (sum(own.cpu_times()[:2]) - own0)
        uss = [u for u, _ in procs.session_memory()["actor"]]  # the pool, after
    n = len(results)
    ready = np.array([r for r, _ in results])
    return {
        "recycle": args.recycle,
        "sessions": n,
        "pool": pool,
        "errors": sorted({e for _, e in results if e}),
        "seconds": round(wall, 1),
        "server_cpu_s_per_session": round(server_cpu / n, 3),
        "actors_started": len(seen - pooled),
        "ready_p50_s": round(float(np.percentile(ready, 50)), 3),
        "ready_p95_s": round(float(np.percentile(ready, 95)), 3),
        "pooled_actors": len(uss),
        "pooled_uss_mean_mib": round(float(np.mean(uss)), 1) if uss else None,
        "pooled_uss_max_mib": round(float(np.max(uss)), 1) if uss else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--waves", type=int, default=6)
    ap.add_argument("--wave", type=int, default=0, help="sessions a wave (0: pool)")
    ap.add_argument("--stream-s", type=float, default=2.0)
    ap.add_argument("--gap-s", type=float, default=4.0)
    ap.add_argument("--data", type=Path, default=SPEAKERS)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--recycle",
        type=int,
        default=-1,
        help="run one server with DIGLETT_SESSION_RECYCLE set to this (0 or 1) "
        "and print its row; -1: both, side by side, --rounds times",
    )
    args = ap.parse_args()
    if args.recycle >= 0:  # one server, in a process of its own
        print(json.dumps(run_one(args)), flush=True)
        return 0
    rows = []
    for _ in range(args.rounds):
        for recycle in (1, 0):
            cmd = [sys.executable, "-m", "bench.churn", *sys.argv[1:]]
            cmd += ["--recycle", str(recycle)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "churn.json").write_text(json.dumps(rows, indent=1))
    by = {
        m: [r["server_cpu_s_per_session"] for r in rows if r["recycle"] == m]
        for m in (0, 1)
    }
    print(
        "server CPU per session, ended vs recycled: "
        f"{np.mean(by[0]):.3f} / {np.mean(by[1]):.3f} s = "
        f"{np.mean(by[0]) / np.mean(by[1]):.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
