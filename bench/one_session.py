"""One real-time session against a freshly started server: latency and memory.

Starts Ray and the Serve app locally (bench/harness.py), enrolls two dev-set
speakers, streams a conversation of their unseen speech in real time, and
prints: label latency p50/p95 (the server's `latency_ms`), the SessionActor's
private memory (USS) and, for comparison, a bare Ray actor's USS.

    python -m bench.one_session [--seconds 60] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import numpy as np
import psutil

from bench import harness as hn
from bench import procs
from bench.harness import SPEAKERS, Server

FRAME_SAMPLES = 1600  # 100 ms frames, like a microphone client


async def _session(srv: Server, enrolls, conv: np.ndarray) -> list[dict]:
    """Enroll, stream `conv` in real time, end; the labels."""
    labels: list[dict] = []
    conn = await hn.connect(srv, labels.append)
    try:
        for name, x in enrolls:
            print("enrolled:", await hn.enroll(conn, name, x, frame_samples=8000))
        await conn.send_json({"type": "stream"})
        await hn.stream(conn, conv, FRAME_SAMPLES, speed=1.0)
        await hn.finish(conn, timeout=120)
    finally:
        await conn.close()
    return labels


async def _enrolled_pid() -> int | None:
    """The pid of the SessionActor that holds enrollments (not a pooled one)."""
    import ray

    from actors.session_actor import NAMESPACE

    pid = None
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == NAMESPACE and actor["name"].startswith("session-"):
            h = ray.get_actor(actor["name"], namespace=NAMESPACE)
            stats = await h.stats.remote()
            if stats["speakers"]:
                pid = stats["pid"]
    return pid


async def _measure(srv: Server, enrolls, conv) -> tuple[list[dict], list[int]]:
    """The session's labels, and its SessionActor's USS once a second."""
    task = asyncio.create_task(_session(srv, enrolls, conv))
    await asyncio.sleep(3)
    pid = await _enrolled_pid()
    uss: list[int] = []
    while not task.done():
        if pid:
            try:
                uss.append(psutil.Process(pid).memory_full_info().uss)
            except psutil.Error:
                pass
        await asyncio.sleep(1.0)
    return await task, uss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--data", type=Path, default=SPEAKERS)
    ap.add_argument("--model-dir", default=os.environ.get("DIGLETT_MODEL_DIR", ""))
    args = ap.parse_args()
    env = {"DIGLETT_MODEL_DIR": args.model_dir} if args.model_dir else {}

    u = hn.utterances(args.data)
    a, b = "LS-19", "LS-26"
    enrolls = [(n, hn.read16(u[n][0])[: 5 * hn.SAMPLE_RATE]) for n in (a, b)]
    turns = [hn.read16(p) for p in u[a][1:3] + u[b][1:3]]
    order = [turns[0], turns[2], turns[1], turns[3]]
    conv = np.concatenate(order)[: int(args.seconds * hn.SAMPLE_RATE)]

    with hn.local_server(env, num_cpus=2) as srv:
        bare, bare_uss = procs.bare_actor()
        labels, uss = asyncio.run(_measure(srv, enrolls, conv))
    lat = np.array([m["latency_ms"] for m in labels])
    print(f"labels: {len(labels)} over {conv.size / hn.SAMPLE_RATE:.1f} s of audio")
    print(
        f"latency_ms: p50 {np.percentile(lat, 50):.1f}  p95 {np.percentile(lat, 95):.1f}"
        f"  max {lat.max():.1f}"
    )
    if uss:
        print(
            f"SessionActor USS: {max(uss) / 2**20:.1f} MiB (peak), "
            f"bare Ray actor USS: {bare_uss:.1f} MiB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
