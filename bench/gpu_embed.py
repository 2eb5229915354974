#!/usr/bin/env python
"""The embedding tier under simulated sessions: windows/s and latency.

Made for the lent GPU machine (see ../shared/device/README.md and
bench/gpu_device.sh: no model weights there, so `--embedder ecapa-random`
builds the real ECAPA shape with random weights; speed does not depend on
the weights), and runnable on a CPU with small numbers to check it first
(tests/model/test_gpu_bench.py does).

The path is the server's own from the SessionActors on: `--loaders` plain
Ray actors stand in for the SessionActors of many nodes, each simulating
its share of real-time sessions (one 1.5 s int16 window every 0.5 s each,
their phases spread over the hop). Every `--tick-ms` a loader sends the
windows that fell due in one call to its EmbedBatcher, as a node's
SessionActors would have sent them one by one; the batchers (one per node
in a cluster) send merged requests to the real EmbeddingDeployment
(`@serve.batch`). So the tier sees the requests of 8,000 sessions without
this machine paying for 16,000 actor calls a second, which in a cluster
the session nodes pay. Each window is a distinct slice of a random signal,
so every one crosses every process boundary as it would.

Sessions ramp step by step after a short warm-up, until a step is not held
(p95 over `--p95-ms`, windows left behind, or errors); each step prints
windows/s done against offered, p50/p95/p99 latency from a window falling
due to its embedding's return, and the CPU the machine and the replica used.

    python -m bench.gpu_embed --steps 2000,4000,8000,12000 --batch-size 512
    python -m bench.gpu_embed --embedder noop --steps 20,40 --seconds 5   # CPU
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

HOP_S = 0.5
WINDOW = 24000  # 1.5 s at 16 kHz
APP = "gpubench"


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` (0 when it is gone)."""
    try:
        return sum(psutil.Process(pid).cpu_times()[:2])
    except psutil.Error:
        return 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", default="2000,4000,8000,12000", help="sessions")
    ap.add_argument("--seconds", type=float, default=15.0, help="per step")
    ap.add_argument("--warm-up-s", type=float, default=3.0)
    ap.add_argument(
        "--embedder", default="ecapa-random", help="ecapa-random|ecapa|noop"
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--batch-wait-s", type=float, default=0.01)
    ap.add_argument(
        "--batch-shapes",
        default="",
        help="DIGLETT_BATCH_SHAPES (default on a GPU: 8-64, then multiples of 64)",
    )
    ap.add_argument("--compile", action="store_true", help="DIGLETT_GPU_COMPILE=1")
    ap.add_argument("--streams", type=int, default=2, help="DIGLETT_GPU_STREAMS")
    ap.add_argument(
        "--p95-ms", type=float, default=300.0, help="a step is held below this p95"
    )
    ap.add_argument(
        "--keep-going", action="store_true", help="run every step, held or not"
    )
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--loaders", type=int, default=8)
    ap.add_argument("--batchers", type=int, default=4)
    ap.add_argument("--tick-ms", type=float, default=20.0)
    ap.add_argument(
        "--out",
        default=(
            str(Path(os.environ["OUT"]) / "gpu_embed.json")
            if os.environ.get("OUT")
            else ""
        ),
    )
    args = ap.parse_args()

    os.environ["DIGLETT_EMBEDDER"] = args.embedder
    os.environ["DIGLETT_DEVICE"] = args.device
    os.environ["DIGLETT_BATCH_SHAPES"] = args.batch_shapes
    os.environ["DIGLETT_GPU_COMPILE"] = "1" if args.compile else "0"
    os.environ["DIGLETT_GPU_STREAMS"] = str(args.streams)
    import ray
    from ray import serve

    from actors.embed_batcher import EmbedBatcher
    from serve_app.embedding import EmbeddingDeployment
    from serve_app.placement import model_worker_options
    from serve_app.serve_env import start_local_serve

    # Ray and Serve as `diglett serve` runs them, less the HTTP proxy.
    start_local_serve(http=False)
    gpu = ray.cluster_resources().get("GPU", 0) >= 1
    dep = EmbeddingDeployment.options(
        num_replicas=args.replicas,
        autoscaling_config=None,
        max_ongoing_requests=1024,
        # Merged into the deployment's own options (the model worker's
        # environment: its model thread at niceness 0), not replacing them.
        ray_actor_options=model_worker_options(
            {"num_cpus": 1, "num_gpus": 1 / args.replicas if gpu else 0}
        ),
        user_config={"batch_size": args.batch_size, "batch_wait_s": args.batch_wait_s},
    )
    t0 = time.monotonic()
    serve.run(dep.bind(), name=APP, route_prefix=None)

    @ray.remote(num_cpus=0)
    class Prober:
        """Asks the replicas for `info()` from an actor's event loop: with
        RAY_SERVE_THROUGHPUT_OPTIMIZED in a driver's environment, a handle
        runs its router on the caller's loop, and plain code has none."""

        async def infos(self, replicas: int) -> dict[int, dict]:
            handle = serve.get_deployment_handle("EmbeddingDeployment", app_name=APP)
            infos: dict[int, dict] = {}
            for _ in range(20 * replicas):  # each call lands on some replica
                info = await handle.info.remote()
                infos[info["pid"]] = info
                if len(infos) == replicas:
                    break
            return infos

    infos = ray.get(Prober.remote().infos.remote(args.replicas))
    info = next(iter(infos.values()))
    print(json.dumps({"replica": info, "ready_s": round(time.monotonic() - t0, 1)}))

    batchers = [
        EmbedBatcher.options(name=f"gpubench-batcher-{i}").remote(
            APP, "EmbeddingDeployment"
        )
        for i in range(args.batchers)
    ]

    @ray.remote(num_cpus=0)
    class Loader:
        """Many real-time sessions of other nodes, their windows sent per tick."""

        def __init__(self, batcher, tick_s: float) -> None:
            self.batcher = batcher
            self.tick_s = tick_s
            rng = np.random.default_rng(os.getpid())
            # Windows are slices of this at varying offsets: distinct objects,
            # so each is serialized on its own, as sessions' windows are.
            self.signal = (rng.standard_normal(10 * WINDOW) * 3000).astype(np.int16)
            self.offset = 0

        def _window(self) -> np.ndarray:
            self.offset = (self.offset + 997) % (self.signal.size - WINDOW)
            return self.signal[self.offset : self.offset + WINDOW]

        async def run(self, sessions: int, seconds: float) -> dict:
            lat: list[float] = []
            errors: list[str] = []
            t_start = time.monotonic()
            t_end = t_start + seconds
            # Session k's windows fall due at t_start + (k / sessions + j) * hop.
            due = [t_start + HOP_S * k / max(1, sessions) for k in range(sessions)]
            pending: set[asyncio.Task] = set()
            offered = 0

            async def send(dues: list[float]) -> None:
                try:
                    await self.batcher.embed.remote([self._window() for _ in dues])
                except Exception as exc:  # counted, not raised: the step goes on
                    errors.append(repr(exc)[:200])
                    return
                now = time.monotonic()
                lat.extend(now - d for d in dues)

            k = 0  # sessions' due times advance round-robin, in order
            while True:
                now = time.monotonic()
                if now >= t_end:
                    break
                dues = []
                while sessions and due[k] <= now:
                    dues.append(due[k])
                    due[k] += HOP_S
                    k = (k + 1) % sessions
                if dues:
                    offered += len(dues)
                    task = asyncio.ensure_future(send(dues))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                await asyncio.sleep(self.tick_s)
            if pending:
                await asyncio.wait(pending, timeout=60)
            return {"done": len(lat), "offered": offered, "lat": lat, "errors": errors}

    loaders = [
        Loader.remote(batchers[i % len(batchers)], args.tick_ms / 1000)
        for i in range(args.loaders)
    ]

    def step(n: int, seconds: float) -> dict:
        per = [n // args.loaders + (i < n % args.loaders) for i in range(args.loaders)]
        psutil.cpu_percent()  # starts the machine's busy share from now
        rep0 = sum(process_cpu_s(pid) for pid in infos)
        t0 = time.monotonic()
        res = ray.get([ld.run.remote(k, seconds) for ld, k in zip(loaders, per)])
        wall = time.monotonic() - t0
        busy = psutil.cpu_percent() / 100 * psutil.cpu_count()
        rep1 = sum(process_cpu_s(pid) for pid in infos)
        lat = np.array([x for r in res for x in r["lat"]] or [np.nan]) * 1e3
        done = sum(r["done"] for r in res)
        errors = [e for r in res for e in r["errors"]]
        return {
            "sessions": n,
            "offered_windows_per_s": round(sum(r["offered"] for r in res) / seconds, 1),
            "windows_offered": sum(r["offered"] for r in res),
            "windows_done": done,
            "windows_per_s": round(done / wall, 1),
            "latency_ms_p50": round(float(np.nanpercentile(lat, 50)), 1),
            "latency_ms_p95": round(float(np.nanpercentile(lat, 95)), 1),
            "latency_ms_p99": round(float(np.nanpercentile(lat, 99)), 1),
            "wall_s": round(wall, 1),
            "machine_cpu_cores": round(busy, 2),
            "machine_cores": psutil.cpu_count(),
            "replica_cpu_ms_per_window": round(1e3 * (rep1 - rep0) / max(1, done), 3),
            "errors": len(errors),
            "first_error": errors[0] if errors else "",
        }

    def held(row: dict) -> bool:
        """Kept up: every window back, p95 within bound, no errors."""
        return (
            row["errors"] == 0
            and row["latency_ms_p95"] <= args.p95_ms
            and row["windows_done"] >= 0.98 * row["windows_offered"]
            and row["wall_s"] <= args.seconds + 2.0  # no backlog left to drain
        )

    steps = [int(x) for x in args.steps.split(",")]
    if args.warm_up_s > 0:
        warm = step(steps[0], args.warm_up_s)
        print(json.dumps({"warm_up": warm}), flush=True)
    rows = []
    for n in steps:
        row = step(n, args.seconds)
        row["held"] = held(row)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:  # after every step, so a run cut short keeps what it did
            Path(args.out).write_text(
                json.dumps(
                    {"args": vars(args), "replica": info, "steps": rows}, indent=1
                )
            )
        if not row["held"] and not args.keep_going:
            break  # latency broke: more sessions would only build backlog
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
