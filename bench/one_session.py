"""One real-time session against a freshly started server: latency and memory.

Starts Ray and the Serve app locally (as the tests do), enrolls two dev-set
speakers, streams a conversation of their unseen speech in real time, and
prints: label latency p50/p95 (the server's `latency_ms`), the SessionActor's
private memory (USS) and, for comparison, a bare Ray actor's USS.

    python bench/one_session.py [--seconds 60] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import soundfile as sf

from diglett.audio import encode_s16

ROOT = Path(__file__).resolve().parents[1]
SPEAKERS = ROOT.parent / "shared" / "data" / "speakers"


def _utterances(folder: Path) -> dict[str, list[Path]]:
    by: dict[str, list[tuple[float, Path]]] = {}
    for r in csv.DictReader((folder / "manifest.csv").open()):
        by.setdefault(r["speaker"], []).append(
            (float(r["duration_s"]), folder / r["file"])
        )
    return {k: [p for _, p in sorted(v, reverse=True)] for k, v in by.items()}


_s16 = encode_s16


async def _session(url: str, enrolls, conv: np.ndarray, realtime: bool):
    import websockets

    async with websockets.connect(url, max_size=2**24, compression=None) as ws:
        ready = json.loads(await ws.recv())
        for name, x in enrolls:
            await ws.send(json.dumps({"type": "enroll", "speaker": name}))
            for i in range(0, x.size, 8000):
                await ws.send(_s16(x[i : i + 8000]))
            await ws.send(json.dumps({"type": "enroll_end"}))
            print("enrolled:", await ws.recv())
        await ws.send(json.dumps({"type": "stream"}))
        labels: list[dict] = []

        async def reader():
            async for m in ws:
                d = json.loads(m)
                if d["type"] == "label":
                    labels.append(d)

        task = asyncio.create_task(reader())
        chunk = 1600  # 100 ms frames, like a microphone client
        t0 = time.monotonic()
        for k, i in enumerate(range(0, conv.size, chunk)):
            if realtime:
                delay = t0 + k * chunk / 16000 - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await ws.send(_s16(conv[i : i + chunk]))
        await ws.send(json.dumps({"type": "end"}))
        await asyncio.wait_for(task, 120)
        return ready, labels


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--data", type=Path, default=SPEAKERS)
    ap.add_argument("--model-dir", default=os.environ.get("DIGLETT_MODEL_DIR", ""))
    args = ap.parse_args()
    if args.model_dir:
        os.environ["DIGLETT_MODEL_DIR"] = args.model_dir
    import ray
    from ray import serve

    from serve_app.serve_env import start_local_serve, wait_until_healthy

    sys.path.insert(0, str(ROOT))
    from actors.session_actor import NAMESPACE
    from serve_app.app import build_app

    u = _utterances(args.data)
    a, b = "LS-19", "LS-26"
    rd = lambda p: sf.read(p, dtype="float32")[0]  # noqa: E731
    enrolls = [(a, rd(u[a][0])[: 5 * 16000]), (b, rd(u[b][0])[: 5 * 16000])]
    turns = [rd(p) for p in u[a][1:3] + u[b][1:3]]
    order = [turns[0], turns[2], turns[1], turns[3]]
    conv = np.concatenate(order)[: int(args.seconds * 16000)]

    port = start_local_serve(num_cpus=2)  # as `diglett serve` runs
    serve.run(build_app(), name="diglett", route_prefix="/")
    wait_until_healthy(f"http://127.0.0.1:{port}")  # not via the fallback

    @ray.remote(num_cpus=0)
    class Bare:
        def pid(self) -> int:
            return os.getpid()

    bare = Bare.remote()
    bare_uss = psutil.Process(ray.get(bare.pid.remote())).memory_full_info().uss

    url = f"ws://127.0.0.1:{port}/v1/stream"
    uss: list[int] = []

    async def run():
        task = asyncio.create_task(_session(url, enrolls, conv, True))
        await asyncio.sleep(3)
        pid = None
        for actor in ray.util.list_named_actors(all_namespaces=True):
            if actor["namespace"] == NAMESPACE and actor["name"].startswith("session-"):
                h = ray.get_actor(actor["name"], namespace=NAMESPACE)
                stats = await h.stats.remote()
                if stats["speakers"]:  # the enrolled one, not a pooled one
                    pid = stats["pid"]
        while not task.done():
            if pid:
                try:
                    uss.append(psutil.Process(pid).memory_full_info().uss)
                except psutil.Error:
                    pass
            await asyncio.sleep(1.0)
        return await task

    ready, labels = asyncio.run(run())
    lat = np.array([m["latency_ms"] for m in labels])
    print(f"labels: {len(labels)} over {conv.size / 16000:.1f} s of audio")
    print(
        f"latency_ms: p50 {np.percentile(lat, 50):.1f}  p95 {np.percentile(lat, 95):.1f}"
        f"  max {lat.max():.1f}"
    )
    if uss:
        print(
            f"SessionActor USS: {max(uss) / 2**20:.1f} MiB (peak), "
            f"bare Ray actor USS: {bare_uss / 2**20:.1f} MiB"
        )
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
