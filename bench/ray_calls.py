#!/usr/bin/env python
"""Ray calls per hop, counted by Ray: one real-time session through the real server.

Starts Ray and the Serve app locally (`serve.run`, as tests/conftest.py does)
with task events on for this run only: Serve's actors through
`RAY_SERVE_ENABLE_TASK_EVENTS=1`, the SessionActor and the EmbedBatcher
through `DIGLETT_RAY_TASK_EVENTS=1` (both are off when serving: an event per
call grew the GCS's memory). One session enrolls two dev-set speakers, then
streams `--seconds` of their speech in real time in 100 ms frames; every
actor task created while it streamed is listed with `ray.util.state` and
counted by caller → callee.method (the caller: the actor whose task made the
call, through the task's parent). Hops are the labels the session got;
speech hops are those with scores (silent hops need no embedding).

Prints one JSON line per (caller, callee.method) with its count, per hop
and per second, then a summary line. Calls made on a timer (keep-alives of
the session and the warm pool, Serve's own control loop) show up in the
count too and are told apart by their rate.

    python -m bench.ray_calls [--seconds 30] [--real]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from bench import harness as hn

FLUSH_S = 3.0  # Ray reports task events to the GCS every second


def short_class(class_name: str) -> str:
    """`ServeReplica:diglett:Ingress` -> `Ingress`; other classes as they are."""
    return class_name.rsplit(":", 1)[-1] if class_name else "?"


def count_calls(tasks: list, actor_classes: dict, t0_ms: int, t1_ms: int) -> Counter:
    """(caller, callee.method) -> number of actor tasks created in
    [t0_ms, t1_ms). `tasks`: `ray.util.state` TaskStates (all kinds, so that
    parents resolve); `actor_classes`: actor id -> class name. A task's
    caller is the actor its parent task ran in (a creation task's actor,
    for calls made outside any task, e.g. from an ingress's own HTTP
    server); "driver" if the parent ran in no actor, "?" if it is unknown."""
    by_id = {t.task_id: t for t in tasks}
    out: Counter = Counter()
    for t in tasks:
        if t.type != "ACTOR_TASK" or not (t0_ms <= (t.creation_time_ms or 0) < t1_ms):
            continue
        method = t.name.rsplit(".", 1)[-1]
        callee = f"{short_class(actor_classes.get(t.actor_id, ''))}.{method}"
        parent = by_id.get(t.parent_task_id)
        if parent is None:
            caller = "?"
        elif parent.actor_id:
            caller = short_class(actor_classes.get(parent.actor_id, ""))
        else:
            caller = "driver"
        out[(caller, callee)] += 1
    return out


async def _stream(
    srv: hn.Server,
    enrolls: list[tuple[str, np.ndarray]],
    conv: np.ndarray,
    seconds: float,
) -> dict:
    """One session: enroll, stream `seconds` in real time (0.1 s frames),
    end. Returns the streaming window (epoch ms) and the labels it got."""
    labels: list[dict] = []
    conn = await hn.connect(srv, on_label=labels.append)
    try:
        for name, audio in enrolls:
            await hn.enroll(conn, name, audio)
        await asyncio.sleep(FLUSH_S)  # enrollment's calls fall before the window
        t0_ms = int(time.time() * 1e3)
        await conn.send_json({"type": "stream"})
        await hn.stream(conn, conv, 1600, speed=1.0, seconds=seconds)
        await asyncio.sleep(1.0)  # the last hop's label
        t1_ms = int(time.time() * 1e3)
        await hn.finish(conn, timeout=60)
    finally:
        await conn.close()
    return {"t0_ms": t0_ms, "t1_ms": t1_ms, "labels": labels}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument(
        "--real", action="store_true", help="the real model (default: no-op)"
    )
    ap.add_argument("--data", type=Path, default=hn.SPEAKERS)
    args = ap.parse_args()

    # Before Ray starts, so that every process it starts inherits them, and
    # before this process imports the actor classes: the ingress deployment
    # is pickled from here with the SessionActor class as imported here.
    os.environ["RAY_SERVE_ENABLE_TASK_EVENTS"] = "1"
    os.environ["DIGLETT_RAY_TASK_EVENTS"] = "1"
    from actors import embed_batcher

    assert embed_batcher.TASK_EVENTS_ENV == "DIGLETT_RAY_TASK_EVENTS"
    assert embed_batcher.TASK_EVENTS, "actors were imported before the switch"
    if not args.real:
        os.environ["DIGLETT_EMBEDDER"] = "noop"
    import ray

    enrolls, conv = hn.voices(args.data)
    # The state API needs the dashboard.
    with hn.local_server(include_dashboard=True) as srv:
        run = asyncio.run(_stream(srv, enrolls, conv, args.seconds))
        return _report(args, run, ray.get_runtime_context().gcs_address)


def _report(args, run: dict, gcs_address: str) -> int:
    """Count the calls of the streaming window, print them as JSON lines."""
    from ray.util.state import list_actors, list_tasks

    time.sleep(FLUSH_S)
    # This instance's, by address: others may run on a shared machine.
    state = {
        "address": gcs_address,
        "limit": 10_000,
        "detail": True,
        "raise_on_missing_output": False,
    }
    tasks, actors = list_tasks(**state), list_actors(**state)
    classes = {a.actor_id: a.class_name for a in actors}
    counts = count_calls(tasks, classes, run["t0_ms"], run["t1_ms"])
    hops = len(run["labels"])
    speech = sum("scores" in m for m in run["labels"])
    window_s = (run["t1_ms"] - run["t0_ms"]) / 1e3
    for (caller, callee), n in sorted(counts.items(), key=lambda kv: -kv[1]):
        row = {"caller": caller, "callee": callee, "calls": n}
        row["per_hop"] = round(n / max(1, hops), 3)
        row["per_s"] = round(n / window_s, 3)
        print(json.dumps(row), flush=True)
    summary = {
        "model": "ecapa" if args.real else "noop",
        "stream_s": args.seconds,
        "window_s": round(window_s, 1),
        "hops": hops,
        "speech_hops": speech,
        "silent_hops": hops - speech,
        "actor_calls": sum(counts.values()),
        "tasks_listed": len(tasks),
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
