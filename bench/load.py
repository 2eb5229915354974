"""Load generator: many concurrent sessions over real WebSockets.

Each session enrolls two dev-set speakers and streams their speech (looped)
in 100 ms frames at real-time pace, so the server sees what N microphones
would send. The number of sessions ramps up step by step; each step reports
sessions held in real time, label latency (the server's `latency_ms` and
the client-side lag from a hop's last sample sent to its label received),
windows/s, CPU and memory, and a PNG of latency against sessions.

    python bench/load.py --steps 2,4,8,12,16 --step-s 40            # real model
    python bench/load.py --noop --fast --steps 8,16 --step-s 20      # serving path only
    python bench/load.py --noop --speed 50 --steps 10,20,40 --step-s 20

`--burst M` adds M sessions that enroll at once while a step's sessions
stream, and reports the streaming sessions' lag before and during it.
`--noop` starts the server with the BENCHMARK-ONLY no-op embedder
(`DIGLETT_EMBEDDER=noop`); `--fast` sends audio as fast as the server takes
it (1 s frames) instead of in real time, and `--speed X` at X times real time
(1 s frames), so a few sessions offer a known load of windows/s: a step is
held when its labels keep up (lag p95 <= 500 ms). Each step also reports the
CPU time of the server's processes per window. `--url` targets a running
server.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import soundfile as sf

from actors.fork_server import with_forked_workers
from diglett.audio import encode_s16

ROOT = Path(__file__).resolve().parents[1]
SPEAKERS = ROOT.parent / "shared" / "data" / "speakers"
HELD_MS = 500.0  # a label later than this (p95) means the session is not held
WARMUP_S = 10.0  # labels of a stream's first seconds of audio are not timed
BURST_SPAN_S = 10.0  # --burst: lags compared over this long before and after


@dataclass
class SessionResult:
    latency_ms: list[float] = field(default_factory=list)  # server's view
    lag_ms: list[float] = field(default_factory=list)  # client's view
    windows: int = 0  # labels that needed an embedding
    labels: int = 0
    error: str = ""
    enroll_s: float = 0.0  # from its first enroll message to its last `enrolled`
    stream_t: float = 0.0  # when its first stream frame was sent (monotonic)
    last_label_t: float = 0.0
    # (receive time, lag ms or None) of each label that needed an embedding
    window_times: list[tuple[float, float | None]] = field(default_factory=list)


_s16 = encode_s16


def _voices(folder: Path) -> tuple[list[tuple[str, np.ndarray]], np.ndarray]:
    """Two 5 s enrollments and a long conversation of the same speakers."""
    by: dict[str, list[tuple[float, Path]]] = {}
    for r in csv.DictReader((folder / "manifest.csv").open()):
        by.setdefault(r["speaker"], []).append(
            (float(r["duration_s"]), folder / r["file"])
        )
    files = {k: [p for _, p in sorted(v, reverse=True)] for k, v in by.items()}
    rd = lambda p: sf.read(p, dtype="float32")[0]  # noqa: E731
    a, b = "LS-19", "LS-26"
    enrolls = [(a, rd(files[a][0])[: 5 * 16000]), (b, rd(files[b][0])[: 5 * 16000])]
    turns = []
    for pa, pb in zip(files[a][1:], files[b][1:]):
        turns += [rd(pa), np.zeros(8000, np.float32), rd(pb)]
    return enrolls, np.concatenate(turns)


async def enroll_all(ws, enrolls) -> str:
    """Enroll each (name, 16 kHz float audio) over an open session in 1 s
    frames; returns "" or the error code that stopped it."""
    for name, x in enrolls:
        await ws.send(json.dumps({"type": "enroll", "speaker": name}))
        for i in range(0, x.size, 16000):
            await ws.send(_s16(x[i : i + 16000]))
        await ws.send(json.dumps({"type": "enroll_end"}))
        reply = json.loads(await ws.recv())
        if reply["type"] != "enrolled":
            return reply.get("code", "enroll failed")
    return ""


async def _session(
    url: str,
    headers: dict,
    enrolls,
    conv: np.ndarray,
    start: int,
    seconds: float,
    speed: float,
    res: SessionResult,
) -> SessionResult:
    import websockets

    sent_at: dict[int, float] = {}  # hop seq -> when its last sample was sent
    try:
        async with websockets.connect(
            url,
            additional_headers=headers,
            max_size=2**24,
            open_timeout=60,
            compression=None,
        ) as ws:
            ready = json.loads(await ws.recv())
            if ready["type"] != "ready":
                res.error = ready.get("code", "refused")
                return res
            t_enroll = time.monotonic()
            res.error = await enroll_all(ws, enrolls)
            if res.error:
                return res
            res.enroll_s = time.monotonic() - t_enroll
            await ws.send(json.dumps({"type": "stream"}))

            async def reader():
                async for raw in ws:
                    m = json.loads(raw)
                    if m["type"] == "label":
                        now = res.last_label_t = time.monotonic()
                        res.labels += 1
                        res.windows += "scores" in m
                        t = sent_at.pop(m["seq"], None)
                        lag = (now - t) * 1e3 if t is not None else None
                        if "scores" in m:
                            res.window_times.append((now, lag))
                        if m["start_s"] < WARMUP_S:
                            continue  # all sessions enrolled at once just now
                        res.latency_ms.append(m["latency_ms"])
                        if lag is not None:
                            res.lag_ms.append(lag)
                    elif m["type"] == "error":
                        res.error = m["code"]

            task = asyncio.create_task(reader())
            chunk = 1600 if speed == 1.0 else 16000
            t0 = res.stream_t = time.monotonic()
            i = 0
            while time.monotonic() - t0 < seconds:
                if speed > 0:
                    delay = t0 + i / 16000 / speed - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                j = (start + i) % (conv.size - chunk)
                await ws.send(_s16(conv[j : j + chunk]))
                now = time.monotonic()
                for s in range(i // 8000, (i + chunk) // 8000):
                    sent_at[s] = now
                i += chunk
            await ws.send(json.dumps({"type": "end"}))
            await asyncio.wait_for(task, 300)
    except Exception as exc:  # a broken session is a result, not a crash
        res.error = res.error or type(exc).__name__
    return res


# Server processes by what they do (their Ray process titles), for the
# per-role CPU breakdown; the first match wins.
ROLES = (
    ("model", "EmbeddingDeployment"),
    ("ingress", "Ingress"),
    ("proxy", "ProxyActor"),
    ("sessions", "SessionActor"),
    ("batcher", "EmbedBatcher"),
    ("controller", "ServeController"),
    ("raylet", "raylet"),
    ("gcs", "gcs_server"),
)


def _role(cmdline: str) -> str:
    return next((role for role, key in ROLES if key in cmdline), "other")


def _server_procs() -> list[psutil.Process]:
    """The local server's processes: everything this process started (Ray's
    GCS, raylet, agents, workers), or, with `--url`, every Ray process."""
    procs = psutil.Process().children(recursive=True)
    if procs:  # and the SessionActors the fork server forked (not our descendants)
        return with_forked_workers(procs)
    return [
        p
        for p in psutil.process_iter()
        if any(k in " ".join(_cmdline(p)) for k in ("ray::", "raylet", "gcs_server"))
    ]


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _cpu_by_pid() -> dict[int, tuple[str, float]]:
    """{pid: (role, CPU seconds so far)} of the server's processes."""
    out = {}
    for p in _server_procs():
        try:
            out[p.pid] = (_role(" ".join(p.cmdline())), sum(p.cpu_times()[:2]))
        except psutil.Error:
            pass
    return out


def _cpu_by_role(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds per role between two `_cpu_by_pid` snapshots (a worker
    that took up a role meanwhile counts under it)."""
    roles: dict[str, float] = {}
    for pid, (role, cpu) in after.items():
        roles[role] = roles.get(role, 0.0) + cpu - before.get(pid, (role, 0.0))[1]
    return roles


async def _track_cpu(seen: dict, every_s: float = 1.0) -> None:
    """Keep `seen` ({pid: (role, CPU s)}) at each server process's latest
    reading, so that processes which end before the step does (a session's
    SessionActor ends with it) still count, less their last second."""
    while True:
        seen.update(_cpu_by_pid())
        await asyncio.sleep(every_s)


def _ray_memory_mb() -> float:
    total = 0.0
    for p in _server_procs():
        try:
            total += p.memory_full_info().uss
        except psutil.Error:
            pass
    return total / 2**20


async def _all_streaming(results: list[SessionResult]) -> list[float]:
    """When each session began streaming, once every one has (or failed,
    and never will; up to 60 s)."""
    for _ in range(600):
        if all(r.stream_t or r.error for r in results):
            break
        await asyncio.sleep(0.1)
    return [r.stream_t for r in results if r.stream_t]


async def _steady(
    results: list[SessionResult], step_s: float, settle_s: float = 3.0
) -> dict:
    """The step's steady state: the server's CPU and the windows labelled
    while every session streams (from `settle_s` after the last one started
    to just before the first one stops), so that session start-up,
    enrollment and the final drain do not count; and the lag p95 of its
    first and second half (a backlog that grows shows as a rising lag)."""
    started = await _all_streaming(results)
    if not started:
        return {}
    t_a, t_b = max(started) + settle_s, min(started) + step_s - 0.5
    if t_b - t_a < 5.0:
        return {}
    await asyncio.sleep(t_a - time.monotonic())
    cpu_a = _cpu_by_pid()
    await asyncio.sleep(t_b - time.monotonic())
    cpu_b = _cpu_by_pid()
    by_role = _cpu_by_role(cpu_a, cpu_b)  # a process started meanwhile counts whole
    seen = [(t, lag) for r in results for t, lag in r.window_times if t_a <= t < t_b]
    mid = (t_a + t_b) / 2

    def p95(lags: list) -> float:
        return round(float(np.percentile(lags, 95)), 1) if lags else float("nan")

    return {
        "seconds": round(t_b - t_a, 1),
        "windows_per_s": round(len(seen) / (t_b - t_a), 1),
        "server_cpu_ms_per_window": round(
            sum(by_role.values()) * 1e3 / max(1, len(seen)), 3
        ),
        "cpu_ms_per_window_by_role": {
            k: round(v * 1e3 / max(1, len(seen)), 3)
            for k, v in sorted(by_role.items(), key=lambda kv: -kv[1])
        },
        "lag_p95_first_half": p95([g for t, g in seen if t < mid and g is not None]),
        "lag_p95_second_half": p95([g for t, g in seen if t >= mid and g is not None]),
    }


async def _enroll_only(url: str, headers: dict, enrolls) -> float:
    """A session that connects, enrolls its two speakers and leaves; the
    seconds its enrollments took (nan when one failed)."""
    import websockets

    async with websockets.connect(
        url, additional_headers=headers, max_size=2**24, open_timeout=60
    ) as ws:
        if json.loads(await ws.recv())["type"] != "ready":
            return float("nan")
        t0 = time.monotonic()
        if await enroll_all(ws, enrolls):
            return float("nan")
        return time.monotonic() - t0


async def _burst(
    args, url: str, headers: dict, enrolls, results: list[SessionResult]
) -> dict:
    """`args.burst` new sessions enroll at once, `args.burst_at` s after the
    step's sessions all stream: the streaming sessions' lag in the
    `BURST_SPAN_S` before and after it starts (what a newcomer's enrollment
    costs those already live), and how long the newcomers' enrollments took."""
    started = await _all_streaming(results)
    if not started:
        return {}
    t_burst = max(started) + args.burst_at
    await asyncio.sleep(max(0.0, t_burst - time.monotonic()))
    took = await asyncio.gather(
        *[_enroll_only(url, headers, enrolls) for _ in range(args.burst)]
    )
    await asyncio.sleep(max(0.0, t_burst + BURST_SPAN_S - time.monotonic()))

    def lags(t_a: float, t_b: float) -> list[float]:
        return [
            g
            for r in results
            for t, g in r.window_times
            if t_a <= t < t_b and g is not None
        ] or [float("nan")]

    before = lags(t_burst - BURST_SPAN_S, t_burst)
    during = lags(t_burst, t_burst + BURST_SPAN_S)
    return {
        "sessions": args.burst,
        "enroll_s_p50": round(float(np.nanpercentile(took, 50)), 2),
        "enroll_s_max": round(float(np.nanmax(took)), 2),
        "lag_p95_before": round(float(np.percentile(before, 95)), 1),
        "lag_p95_during": round(float(np.percentile(during, 95)), 1),
        "lag_max_during": round(float(np.max(during)), 1),
    }


def _stream_rate(results: list[SessionResult]) -> float:
    streamed = [r for r in results if r.stream_t and r.last_label_t > r.stream_t]
    if not streamed:
        return 0.0
    span = max(r.last_label_t for r in streamed) - min(r.stream_t for r in streamed)
    return round(sum(r.windows for r in streamed) / span, 1)


async def _step(args, url, headers, enrolls, conv, n: int) -> dict:
    speed = 0.0 if args.fast else args.speed
    psutil.cpu_percent(None)
    cpu0 = _cpu_by_pid()
    own0 = sum(psutil.Process().cpu_times()[:2])
    seen = dict(cpu0)
    tracker = asyncio.create_task(_track_cpu(seen))
    t0 = time.monotonic()
    results = [SessionResult() for _ in range(n)]
    steady = asyncio.create_task(_steady(results, args.step_s))
    burst = (
        asyncio.create_task(_burst(args, url, headers, enrolls, results))
        if args.burst
        else None
    )
    await asyncio.gather(
        *[
            _session(url, headers, enrolls, conv, k * 37 * 1600, args.step_s, speed, r)
            for k, r in enumerate(results)
        ]
    )
    wall = time.monotonic() - t0
    cpu = psutil.cpu_percent(None)
    tracker.cancel()
    seen.update(_cpu_by_pid())
    by_role = _cpu_by_role(cpu0, seen)
    server_cpu = sum(by_role.values())
    windows = max(1, sum(r.windows for r in results))
    lat = np.array([v for r in results for v in r.latency_ms] or [np.nan])
    lag = np.array([v for r in results for v in r.lag_ms] or [np.nan])
    enroll = np.array([r.enroll_s for r in results if r.enroll_s] or [np.nan])
    held = sum(
        1
        for r in results
        if not r.error and r.lag_ms and np.percentile(r.lag_ms, 95) <= HELD_MS
    )
    row = {
        "sessions": n,
        "held": held,
        "errors": sorted({r.error for r in results if r.error}),
        "labels": sum(r.labels for r in results),
        "windows_per_s": round(sum(r.windows for r in results) / wall, 1),
        "labels_per_s": round(sum(r.labels for r in results) / wall, 1),
        # While streaming: from the first stream frame sent to the last label
        # received (all sessions), so enrollment and start-up do not count.
        "stream_windows_per_s": _stream_rate(results),
        "steady": await steady,
        "latency_p50": round(float(np.nanpercentile(lat, 50)), 1),
        "latency_p95": round(float(np.nanpercentile(lat, 95)), 1),
        "latency_p99": round(float(np.nanpercentile(lat, 99)), 1),
        "lag_p50": round(float(np.nanpercentile(lag, 50)), 1),
        "lag_p95": round(float(np.nanpercentile(lag, 95)), 1),
        # Sessions enroll together at the start of a step: how long their
        # two enrollments took (enrollment windows yield to live ones).
        "enroll_s_p50": round(float(np.nanpercentile(enroll, 50)), 2),
        "enroll_s_max": round(float(np.nanmax(enroll)), 2),
        "cpu_percent": cpu,
        "server_cpu_ms_per_window": round(server_cpu * 1e3 / windows, 3),
        # Where the server's CPU went, ms per window, and the load generator's.
        "cpu_ms_per_window_by_role": {
            k: round(v * 1e3 / windows, 2)
            for k, v in sorted(by_role.items(), key=lambda kv: -kv[1])
        },
        "load_generator_cpu_ms_per_window": round(
            (sum(psutil.Process().cpu_times()[:2]) - own0) * 1e3 / windows, 2
        ),
        "ray_uss_mb": round(_ray_memory_mb(), 1),
    }
    if burst is not None:
        row["burst"] = await burst
    print(json.dumps(row), flush=True)
    return row


def _plot(rows: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["sessions"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("lag_p50", "o-"), ("lag_p95", "s-"), ("latency_p95", "^--")):
        ax.plot(n, [r[key] for r in rows], style, label=key.replace("_", " "))
    ax.axhline(HELD_MS, color="grey", lw=0.8, ls=":", label="500 ms")
    ax.set_xlabel("concurrent sessions")
    ax.set_ylabel("ms")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def session_pids() -> list[int]:
    """PIDs of the SessionActors on this machine (pooled ones included)."""
    return [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if " ".join(p.info["cmdline"] or []).startswith("ray::SessionActor")
    ]


def wait_for_pool(timeout_s: float = 300.0) -> float:
    """Wait until the ingress's warm pool of SessionActors has filled, as on
    a server that has been up a while; returns the seconds it took."""
    from diglett.settings import Settings

    pool = Settings.from_env().session_pool
    t0 = time.monotonic()
    while len(session_pids()) < pool and time.monotonic() - t0 < timeout_s:
        time.sleep(0.5)
    return time.monotonic() - t0


def _start_local(args) -> str:
    import ray
    from ray import serve

    sys.path.insert(0, str(ROOT))
    if args.noop:
        os.environ["DIGLETT_EMBEDDER"] = "noop"
    if args.fast or args.speed > 20:  # past the default rate limit
        os.environ["DIGLETT_MAX_RATE"] = "0"
    os.environ.setdefault("DIGLETT_MAX_SESSIONS", "5000")
    if args.pool >= 0:
        os.environ["DIGLETT_SESSION_POOL"] = str(args.pool)
    from serve_app.app import build_app
    from serve_app.serve_env import start_local_serve, wait_until_healthy

    port = start_local_serve()  # Ray and Serve as `diglett serve` runs them
    # As `diglett serve` does: one CPU embedding replica per machine without
    # a GPU (a second splits the same cores), one per GPU otherwise.
    gpus = int(ray.cluster_resources().get("GPU", 0))
    app = build_app({"max_embed_replicas": gpus or 1})
    serve.run(app, name="diglett", route_prefix="/")
    wait_until_healthy(f"http://127.0.0.1:{port}")  # not via the fallback
    print(f"warm pool filled in {wait_for_pool():.1f} s", flush=True)
    return f"ws://127.0.0.1:{port}/v1/stream"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", default="")
    ap.add_argument("--token", default=os.environ.get("DIGLETT_API_TOKEN", ""))
    ap.add_argument("--steps", default="1,2,4,8")
    ap.add_argument("--step-s", type=float, default=30.0)
    ap.add_argument("--noop", action="store_true", help="benchmark-only no-op model")
    ap.add_argument("--fast", action="store_true", help="send as fast as possible")
    ap.add_argument("--speed", type=float, default=1.0, help="x real time")
    ap.add_argument(
        "--burst",
        type=int,
        default=0,
        help="this many more sessions enroll at once while the step streams",
    )
    ap.add_argument(
        "--burst-at",
        type=float,
        default=10.0,
        help="seconds after every session of the step streams",
    )
    ap.add_argument("--data", type=Path, default=SPEAKERS)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument(
        "--pool",
        type=int,
        default=-1,
        help="warm pool of SessionActors (-1: the default); the first step "
        "starts once it has filled",
    )
    args = ap.parse_args()
    url = args.url or _start_local(args)
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    enrolls, conv = _voices(args.data)
    rows = []
    for n in [int(x) for x in args.steps.split(",")]:
        rows.append(asyncio.run(_step(args, url, headers, enrolls, conv, n)))
    args.out.mkdir(parents=True, exist_ok=True)
    tag = ("noop" if args.noop else "ecapa") + (
        "-fast" if args.fast else f"-x{args.speed:g}" if args.speed != 1 else ""
    )
    (args.out / f"load-{tag}.json").write_text(json.dumps(rows, indent=1))
    _plot(rows, args.out / f"load-{tag}.png", f"Diglett load ({tag}, this machine)")
    held = [r["sessions"] for r in rows if r["held"] == r["sessions"]]
    print(f"sessions held in real time: {max(held) if held else 0}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
