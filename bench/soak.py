"""Soak test: N sessions stream real speech for M minutes; memory and latency over time.

Starts its own local Ray instance with the Serve app (bench/harness.py, on a
free port, so it disturbs no other server), opens N sessions that each
enroll two speakers and then stream real speech from ../shared/data/speakers
at real-time pace (utterances separated by pauses), and every --every
seconds records:

- memory (RSS and USS, MiB) of every process of this Ray instance, summed by
  role (EmbeddingDeployment, Ingress, SessionActor, EmbedBatcher, proxy,
  controller, raylet, gcs, other workers);
- label latency (the server's `latency_ms`) p50/p95/max over the interval,
  labels received and errors.

    python -m bench.soak                        # 50 sessions, 30 minutes
    python -m bench.soak --sessions 10 --minutes 3 --every 15

Prints one line per sample and writes bench/results/soak-<sessions>x<min>.json.
Not part of CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import psutil

from actors.fork_server import with_forked_workers
from bench import harness as hn
from bench import procs
from bench.harness import RESULTS, SPEAKERS, Server
from client.session import ClientError

SHARED_MODEL = SPEAKERS.parents[1] / "models" / "spkrec-ecapa-voxceleb"
TOKEN = "soak-token"
FRAME_SAMPLES = 4000  # 0.25 s


def speech() -> dict[str, list[np.ndarray]]:
    """Each dev-set speaker's 16 kHz utterances, longest first."""
    return {
        k: [hn.read16(p) for p in paths] for k, paths in hn.utterances(SPEAKERS).items()
    }


async def session(
    srv: Server, enroll: dict, talk: np.ndarray, stop: asyncio.Event, stats: dict
) -> None:
    """Enroll two speakers, then stream their talk (with pauses) in real
    time until `stop`; after a failure, resume and go on."""

    def on_label(m: dict) -> None:
        stats["latency"].append(m["latency_ms"])

    conn = await hn.connect(srv, on_label, stats["errors"].append, ready_timeout_s=120)
    ready = conn.ready
    for name, x in enroll.items():
        try:
            await hn.enroll(conn, name, x, frame_samples=8000)
        except ClientError as exc:
            stats["errors"].append(exc.code)
    pos = 0
    while True:
        try:
            await conn.send_json({"type": "stream"})
            pos += await hn.stream(
                conn, talk, FRAME_SAMPLES, seconds=hn.FOREVER, offset=pos, stop=stop
            )
            await hn.finish(conn, timeout=120)
            await conn.close()
            return
        except Exception as exc:
            if conn.fatal:
                stats["errors"].append(conn.fatal.get("code"))
            ended = conn.closed.is_set()
            stats["failures"].append(
                f"close {conn.close_code}" if ended else repr(exc)[:200]
            )
        await conn.close()
        if stop.is_set():
            return
        try:  # resume the session, enrollments included
            conn = await hn.connect(
                srv,
                on_label,
                stats["errors"].append,
                ready_timeout_s=120,
                session=ready["session_id"],
                resume_token=ready["resume_token"],
            )
        except Exception as exc:
            stats["failures"].append(f"resume: {exc!r}"[:200])
            return


def ray_procs() -> list[psutil.Process]:
    """This Ray instance's raylet with every process it started (the
    SessionActors its fork server forked included) and its GCS."""
    keep: list[psutil.Process] = []
    for child in psutil.Process().children():
        role = procs.role(procs.cmdline(child))
        if role == "raylet":
            keep += [child] + child.children(recursive=True)
        elif role == "gcs":
            keep.append(child)
    return with_forked_workers(keep)


def memory() -> dict[str, dict[str, float]]:
    """RSS and USS (MiB) of this Ray instance's processes, summed by role
    (keyed by process title: EmbeddingDeployment, Ingress, ...)."""
    by_role = procs.memory_by_role(ray_procs())
    return {
        procs.TITLES.get(k, k): {kk: round(vv, 1) for kk, vv in v.items()}
        for k, v in by_role.items()
    }


async def soak(args, srv: Server) -> dict:
    """Sample, start the sessions, sample every `--every` s, stop them,
    sample once more; the result."""
    voices = speech()
    names = sorted(voices)
    pause = np.zeros(int(args.pause_s * hn.SAMPLE_RATE), dtype=np.float32)
    stop = asyncio.Event()
    stats: dict[str, list] = defaultdict(list)  # latency, errors, failures
    samples = []
    t_start = time.monotonic()

    async def sample(phase: str) -> None:
        lat, errs = stats.pop("latency", []), stats.pop("errors", [])
        mem = await asyncio.to_thread(memory)  # the sessions stream meanwhile
        row = {
            "t_s": round(time.monotonic() - t_start, 1),
            "phase": phase,
            "labels": len(lat),
            "latency_p50_ms": round(float(np.percentile(lat, 50)), 1) if lat else None,
            "latency_p95_ms": round(float(np.percentile(lat, 95)), 1) if lat else None,
            "latency_max_ms": round(float(max(lat)), 1) if lat else None,
            "errors": errs,
            "memory": mem,
        }
        samples.append(row)
        sa = mem.get("SessionActor", {})
        print(
            f"t={row['t_s']:7.1f}s {phase:8s} labels={row['labels']:5d} "
            f"p50={row['latency_p50_ms']} p95={row['latency_p95_ms']} ms "
            f"errors={len(errs)}  total RSS={mem['total']['rss_mib']:.0f} "
            f"USS={mem['total']['uss_mib']:.0f} MiB  "
            f"embedding USS={mem.get('EmbeddingDeployment', {}).get('uss_mib')} "
            f"ingress USS={mem.get('Ingress', {}).get('uss_mib')} "
            f"SessionActors USS={sa.get('uss_mib')} (n={sa.get('count')})",
            flush=True,
        )

    await sample("idle")
    tasks = []
    for i in range(args.sessions):
        a, b = names[i % len(names)], names[(i + 1) % len(names)]
        # Longest utterance first: enrollments of 5 s.
        five = 5 * hn.SAMPLE_RATE
        enroll = {"alice": voices[a][0][:five], "bob": voices[b][0][:five]}
        turns = [u for pair in zip(voices[a][1:], voices[b][1:]) for u in pair]
        talk = np.concatenate([np.concatenate([u, pause]) for u in turns])
        tasks.append(asyncio.create_task(session(srv, enroll, talk, stop, stats)))
    end = t_start + args.minutes * 60
    while time.monotonic() < end:
        await asyncio.sleep(min(args.every, max(0.0, end - time.monotonic())))
        await sample("running")
    stop.set()
    await asyncio.wait(tasks, timeout=180)
    await asyncio.sleep(5.0)  # actors of ended sessions exit
    await sample("ended")
    return {
        "sessions": args.sessions,
        "minutes": args.minutes,
        "cpus": args.num_cpus,
        "failures": stats["failures"],
        "samples": samples,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--every", type=float, default=30.0, help="sample period, s")
    ap.add_argument("--pause-s", type=float, default=2.0, help="pause between turns")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count())
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    env = {"DIGLETT_API_TOKEN": TOKEN, "DIGLETT_MAX_SESSIONS": str(args.sessions + 10)}
    if not os.environ.get("DIGLETT_MODEL_DIR") and SHARED_MODEL.is_dir():
        env["DIGLETT_MODEL_DIR"] = str(SHARED_MODEL)
    with hn.local_server(env, num_cpus=args.num_cpus) as srv:
        result = asyncio.run(soak(args, srv))
    out = Path(args.out or RESULTS / f"soak-{args.sessions}x{args.minutes:g}min.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"failures: {len(result['failures'])}; wrote {out}")


if __name__ == "__main__":
    main()
