#!/usr/bin/env python
"""Ray's own floor on this machine: what one actor call and one idle actor cost.

Every window crosses two Ray actor calls (ingress -> SessionActor ->
EmbedBatcher) and every session holds a Ray worker process, so these two
numbers bound the serving path whatever our code does. Shapes as in the
server: a call carries one 1 s int16 frame (32 kB) and the SessionActor's
inner call two 1.5 s int16 windows (2 x 48 kB); replies are two small label
dicts and two 192-d float32 embeddings.

Prints, per call, the CPU ms spent by the caller (this process), the
SessionActor-like callee and the batcher-like inner callee, and, per idle
actor, its CPU (% of a core) and how often its main thread wakes up.

    python -m bench.ray_overhead --calls 400
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import numpy as np
import psutil


def _thread_stats(pid: int) -> dict[str, tuple[int, int]]:
    """{thread name: (CPU ticks, voluntary context switches)}, summed."""
    out: dict[str, tuple[int, int]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = open(f"/proc/{pid}/task/{tid}/stat").read()
            status = open(f"/proc/{pid}/task/{tid}/status").read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks = int(fields[11]) + int(fields[12])
        switches = int(status.split("\nvoluntary_ctxt_switches:")[1].split()[0])
        t, s = out.get(name, (0, 0))
        out[name] = (t + ticks, s + switches)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--idle-actors", type=int, default=10)
    ap.add_argument("--idle-s", type=float, default=20.0)
    args = ap.parse_args()

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    @ray.remote(num_cpus=0)
    class Batcher:
        async def embed(self, windows: list) -> list:
            return [np.zeros(192, np.float32) for _ in windows]

        def pid(self) -> int:
            return os.getpid()

    @ray.remote(num_cpus=0)
    class Session:
        def __init__(self, batcher) -> None:
            self.batcher = batcher

        def pid(self) -> int:
            return os.getpid()

        async def handle(self, conn: int, frames: list, inner: bool):
            if inner:
                await self.batcher.embed.remote(
                    [np.zeros(24000, np.int16) for _ in range(2 * len(frames))]
                )
            scores = {"a": 0.1, "b": 0.2}
            return [{"type": "label", "seq": i, "scores": scores} for i in (0, 1)], None

    batcher = Batcher.remote()
    session = Session.remote(batcher)
    procs = {
        "caller": psutil.Process(),
        "session": psutil.Process(ray.get(session.pid.remote())),
        "batcher": psutil.Process(ray.get(batcher.pid.remote())),
    }

    def cpu() -> dict[str, float]:
        return {k: sum(p.cpu_times()[:2]) for k, p in procs.items()}

    frame = (False, os.urandom(32000), 0.0)

    async def calls(n: int, inner: bool) -> None:
        for _ in range(n):
            await session.handle.remote(1, [frame], inner)

    rows = []
    for inner in (False, True):
        asyncio.run(calls(50, inner))  # warm
        c0, t0 = cpu(), time.perf_counter()
        asyncio.run(calls(args.calls, inner))
        c1, wall = cpu(), time.perf_counter() - t0
        rows.append(
            {
                "call": "with an inner call (2 windows)" if inner else "plain",
                "cpu_ms_per_call": {
                    k: round((c1[k] - c0[k]) * 1e3 / args.calls, 3) for k in c0
                },
                "wall_ms_per_call": round(wall * 1e3 / args.calls, 2),
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    @ray.remote(num_cpus=0)
    class Idle:
        async def pid(self) -> int:
            return os.getpid()

    actors = [Idle.remote() for _ in range(args.idle_actors)]
    pids = ray.get([a.pid.remote() for a in actors])
    time.sleep(3.0)
    before = {p: _thread_stats(p) for p in pids}
    time.sleep(args.idle_s)
    after = {p: _thread_stats(p) for p in pids}
    hz = os.sysconf("SC_CLK_TCK")
    ticks: dict[str, float] = {}
    wakeups: dict[str, float] = {}
    for p in pids:
        for name, (t, s) in after[p].items():
            t0, s0 = before[p].get(name, (0, 0))
            ticks[name] = ticks.get(name, 0) + t - t0
            wakeups[name] = wakeups.get(name, 0) + s - s0
    n, span = len(pids), args.idle_s
    top = sorted(ticks, key=lambda k: -ticks[k])[:3]
    idle = {
        "idle_actor_cpu_percent": round(sum(ticks.values()) / hz / span / n * 100, 2),
        "by_thread_percent": {k: round(ticks[k] / hz / span / n * 100, 2) for k in top},
        "wakeups_per_s_by_thread": {
            k: round(wakeups[k] / span / n)
            for k in sorted(wakeups, key=lambda k: -wakeups[k])[:3]
        },
    }
    print(json.dumps(idle), flush=True)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
