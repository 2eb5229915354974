"""Soak test: N sessions stream real speech for M minutes; memory and latency over time.

Starts its own local Ray instance with the Serve app (on a free port, so it
disturbs no other server), opens N sessions that each enroll two speakers
and then stream real speech from ../shared/data/speakers at real-time pace
(utterances separated by pauses), and every --every seconds records:

- memory (RSS and USS, MiB) of every process of this Ray instance, summed by
  role (EmbeddingDeployment, Ingress, SessionActor, proxy, controller, raylet,
  gcs, other workers);
- label latency (the server's `latency_ms`) p50/p95/max over the interval,
  labels received and errors.

    python bench/soak.py                        # 50 sessions, 30 minutes
    python bench/soak.py --sessions 10 --minutes 3 --every 15

Prints one line per sample and writes bench/results/soak-<sessions>x<min>.json.
Not part of CI.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import psutil
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actors.fork_server import with_forked_workers  # noqa: E402
from diglett.audio import encode_s16  # noqa: E402

SHARED = ROOT.parent / "shared"
SPEAKERS = SHARED / "data" / "speakers"
TOKEN = "soak-token"
ROLES = [
    "EmbeddingDeployment",
    "Ingress",
    "SessionActor",
    "ProxyActor",
    "ServeController",
    "raylet",
    "gcs_server",
]


def speech() -> dict[str, list[np.ndarray]]:
    by: dict[str, list[np.ndarray]] = defaultdict(list)
    for r in csv.DictReader((SPEAKERS / "manifest.csv").open()):
        x, rate = sf.read(SPEAKERS / r["file"], dtype="float32")
        if rate == 16000:
            by[r["speaker"]].append(x)
    return {k: sorted(v, key=len, reverse=True) for k, v in by.items()}


to_s16 = encode_s16


class Session(threading.Thread):
    """Enroll two speakers, then stream their talk (with pauses) until told."""

    def __init__(self, url, enroll, talk, stop, stats, lock) -> None:
        super().__init__(daemon=True)
        self.url, self.enroll, self.talk = url, enroll, talk
        self.stop, self.stats, self.lock = stop, stats, lock

    def _open(self, query: str = ""):
        from websockets.sync.client import connect

        return connect(
            self.url + query,
            additional_headers={"Authorization": f"Bearer {TOKEN}"},
            open_timeout=120,
            max_size=2**24,
            compression=None,
        )

    def run(self) -> None:
        """Stream until told to stop; after a failure, resume and go on."""
        from websockets.exceptions import ConnectionClosed

        ws = self._open()
        ready = json.loads(ws.recv(timeout=120))
        resume = f"?session={ready['session_id']}&resume_token={ready['resume_token']}"
        for name, x in self.enroll.items():
            ws.send(json.dumps({"type": "enroll", "speaker": name}))
            for i in range(0, x.size, 8000):
                ws.send(to_s16(x[i : i + 8000]))
            ws.send(json.dumps({"type": "enroll_end"}))
            self._note(json.loads(ws.recv(timeout=300)))
        pos = 0
        while True:
            try:
                ws.send(json.dumps({"type": "stream"}))
                n, k, t0 = 4000, 0, time.monotonic()
                while not self.stop.is_set():
                    ws.send(to_s16(self.talk[pos : pos + n]))
                    pos = (pos + n) % (self.talk.size - n)
                    k += 1
                    end = t0 + k * 0.25
                    while True:
                        try:
                            m = ws.recv(timeout=max(0.0, end - time.monotonic()))
                        except TimeoutError:
                            break
                        self._note(json.loads(m))
                ws.send(json.dumps({"type": "end"}))
                while True:
                    self._note(json.loads(ws.recv(timeout=120)))
            except ConnectionClosed as exc:
                try:
                    while True:  # what the server sent before closing
                        self._note(json.loads(ws.recv(timeout=1)))
                except Exception:
                    pass
                if exc.rcvd and exc.rcvd.code == 1000:
                    return
                with self.lock:
                    self.stats["failures"].append(
                        f"close {exc.rcvd.code if exc.rcvd else None}"
                    )
            except Exception as exc:
                with self.lock:
                    self.stats["failures"].append(repr(exc)[:200])
            if self.stop.is_set():
                return
            try:  # resume the session, enrollments included
                ws = self._open(resume)
                json.loads(ws.recv(timeout=120))
            except Exception as exc:
                with self.lock:
                    self.stats["failures"].append(f"resume: {exc!r}"[:200])
                return

    def _note(self, m: dict) -> None:
        with self.lock:
            if m["type"] == "label":
                self.stats["latency"].append(m["latency_ms"])
            elif m["type"] == "error":
                self.stats["errors"].append(m["code"])


def memory(node) -> dict[str, dict[str, float]]:
    """RSS and USS (MiB) of this Ray instance's processes, summed by role."""
    raylet_pid = node.all_processes["raylet"][0].process.pid
    root = psutil.Process(raylet_pid)
    procs = with_forked_workers([root] + root.children(recursive=True))
    for info in node.all_processes.get("gcs_server", []):
        procs.append(psutil.Process(info.process.pid))
    out: dict[str, dict[str, float]] = defaultdict(
        lambda: {"rss_mib": 0.0, "uss_mib": 0.0, "count": 0}
    )
    for p in procs:
        try:
            title = " ".join(p.cmdline()) or p.name()
            info = p.memory_full_info()
        except psutil.Error:
            continue
        role = next((r for r in ROLES if r in title), "other")
        if p.pid == raylet_pid:
            role = "raylet"
        elif role == "raylet":  # a worker still starting ("--raylet-…" args)
            role = "other"
        out[role]["rss_mib"] += info.rss / 2**20
        out[role]["uss_mib"] += info.uss / 2**20
        out[role]["count"] += 1
    total = {"rss_mib": 0.0, "uss_mib": 0.0, "count": 0}
    for v in out.values():
        for k in total:
            total[k] += v[k]
    out["total"] = total
    return {k: {kk: round(vv, 1) for kk, vv in v.items()} for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--every", type=float, default=30.0, help="sample period, s")
    ap.add_argument("--pause-s", type=float, default=2.0, help="pause between turns")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count())
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    shared_model = SHARED / "models" / "spkrec-ecapa-voxceleb"
    if not os.environ.get("DIGLETT_MODEL_DIR") and shared_model.is_dir():
        os.environ["DIGLETT_MODEL_DIR"] = str(shared_model)
    os.environ.update(
        {"DIGLETT_API_TOKEN": TOKEN, "DIGLETT_MAX_SESSIONS": str(args.sessions + 10)}
    )
    import ray
    from ray import serve

    from serve_app.app import build_app
    from serve_app.serve_env import start_local_serve, wait_until_healthy

    port = start_local_serve(num_cpus=args.num_cpus)  # as `diglett serve` runs
    serve.run(build_app(), name="diglett", route_prefix="/")
    wait_until_healthy(f"http://127.0.0.1:{port}")  # not via the fallback
    node = ray._private.worker._global_node
    url = f"ws://127.0.0.1:{port}/v1/stream"

    voices = speech()
    names = sorted(voices)
    pause = np.zeros(int(args.pause_s * 16000), dtype=np.float32)
    stop = threading.Event()
    lock = threading.Lock()
    stats = {"latency": [], "errors": [], "failures": []}
    sessions = []
    for i in range(args.sessions):
        a, b = names[i % len(names)], names[(i + 1) % len(names)]
        # Longest utterance first: enrollments of 5 s.
        enroll = {"alice": voices[a][0][: 5 * 16000], "bob": voices[b][0][: 5 * 16000]}
        turns = [u for pair in zip(voices[a][1:], voices[b][1:]) for u in pair]
        talk = np.concatenate([np.concatenate([u, pause]) for u in turns])
        sessions.append(Session(url, enroll, talk, stop, stats, lock))

    samples = []
    t_start = time.monotonic()

    def sample(phase: str) -> None:
        with lock:
            lat, errs = stats["latency"][:], stats["errors"][:]
            stats["latency"].clear()
            stats["errors"].clear()
        mem = memory(node)
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

    sample("idle")
    for s in sessions:
        s.start()
    end = t_start + args.minutes * 60
    while time.monotonic() < end:
        time.sleep(min(args.every, max(0.0, end - time.monotonic())))
        sample("running")
    stop.set()
    for s in sessions:
        s.join(180)
    time.sleep(5.0)  # actors of ended sessions exit
    sample("ended")
    result = {
        "sessions": args.sessions,
        "minutes": args.minutes,
        "cpus": args.num_cpus,
        "failures": stats["failures"],
        "samples": samples,
    }
    out = Path(
        args.out
        or ROOT
        / "bench"
        / "results"
        / (f"soak-{args.sessions}x{args.minutes:g}min.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"failures: {len(stats['failures'])}; wrote {out}")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
