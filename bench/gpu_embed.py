#!/usr/bin/env python
"""The embedding tier under simulated sessions: windows/s and latency.

Made for the lent GPU machine (see ../shared/device/README.md: no model
weights there, so `--embedder ecapa-random` builds the real ECAPA shape with
random weights; speed does not depend on the weights), and runnable on a CPU
with small numbers to check it first.

The path is the server's own from the SessionActor on: `--loaders` plain
Ray actors stand in for SessionActors (each simulating many real-time
sessions that produce one 1.5 s int16 window every 0.5 s), call
`--batchers` EmbedBatchers (one per node in a cluster), which send merged
requests to the real EmbeddingDeployment (`@serve.batch`). Sessions ramp
step by step; each step prints windows/s done against offered, and p50/p95/
p99 latency from a window's creation to its embedding's return.

    python bench/gpu_embed.py --steps 1000,2000,4000,8000 --batch-size 512
    python bench/gpu_embed.py --embedder noop --steps 20,40 --seconds 5   # CPU check
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

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

HOP_S = 0.5
WINDOW = 24000  # 1.5 s at 16 kHz
APP = "gpubench"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", default="1000,2000,4000,8000", help="sessions")
    ap.add_argument("--seconds", type=float, default=20.0, help="per step")
    ap.add_argument(
        "--embedder", default="ecapa-random", help="ecapa-random|ecapa|noop"
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--batch-wait-s", type=float, default=0.01)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--loaders", type=int, default=8)
    ap.add_argument("--batchers", type=int, default=4)
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    os.environ["DIGLETT_EMBEDDER"] = args.embedder
    os.environ["DIGLETT_DEVICE"] = args.device
    import ray
    from ray import serve

    from actors.embed_batcher import EmbedBatcher
    from serve_app.embedding import EmbeddingDeployment
    from serve_app.placement import model_worker_options
    from serve_app.serve_env import start_local_serve

    start_local_serve()  # Ray and Serve as `diglett serve` runs them
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
    handle = serve.get_deployment_handle("EmbeddingDeployment", app_name=APP)
    info = handle.info.remote().result()
    print(json.dumps({"replica": info, "ready_s": round(time.monotonic() - t0, 1)}))

    batchers = [
        EmbedBatcher.options(name=f"gpubench-batcher-{i}").remote(
            APP, "EmbeddingDeployment"
        )
        for i in range(args.batchers)
    ]

    @ray.remote(num_cpus=0)
    class Loader:
        """Many real-time sessions, as SessionActors would send their windows."""

        def __init__(self, batcher) -> None:
            self.batcher = batcher
            rng = np.random.default_rng(os.getpid())
            self.window = (rng.standard_normal(WINDOW) * 3000).astype(np.int16)

        async def run(self, sessions: int, seconds: float) -> dict:
            lat: list[float] = []
            offered = 0
            t_end = time.monotonic() + seconds

            async def session(k: int) -> None:
                nonlocal offered
                await asyncio.sleep(HOP_S * k / max(1, sessions))  # stagger
                nxt = time.monotonic()
                while nxt < t_end:
                    offered += 1
                    t = time.monotonic()
                    await self.batcher.embed.remote([self.window])
                    lat.append(time.monotonic() - t)
                    nxt += HOP_S
                    await asyncio.sleep(max(0.0, nxt - time.monotonic()))

            await asyncio.gather(*(session(k) for k in range(sessions)))
            return {"done": len(lat), "offered": offered, "lat": lat}

    loaders = [Loader.remote(batchers[i % len(batchers)]) for i in range(args.loaders)]
    rows = []
    for n in [int(x) for x in args.steps.split(",")]:
        per = [n // args.loaders + (i < n % args.loaders) for i in range(args.loaders)]
        t0 = time.monotonic()
        res = ray.get([ld.run.remote(k, args.seconds) for ld, k in zip(loaders, per)])
        wall = time.monotonic() - t0
        lat = np.array([x for r in res for x in r["lat"]] or [np.nan]) * 1e3
        row = {
            "sessions": n,
            "offered_windows_per_s": round(n / HOP_S, 1),
            "windows_per_s": round(sum(r["done"] for r in res) / wall, 1),
            "latency_ms_p50": round(float(np.nanpercentile(lat, 50)), 1),
            "latency_ms_p95": round(float(np.nanpercentile(lat, 95)), 1),
            "latency_ms_p99": round(float(np.nanpercentile(lat, 99)), 1),
            "wall_s": round(wall, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(
            json.dumps({"replica": info, "steps": rows}, indent=1)
        )
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
