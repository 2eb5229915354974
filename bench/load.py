"""Load generator: many concurrent sessions over real WebSockets.

Each session enrolls two dev-set speakers and streams their speech (looped)
in 100 ms frames at real-time pace, so the server sees what N microphones
would send. The number of sessions ramps up step by step; each step reports
sessions held in real time, label latency (the server's `latency_ms` and
the client-side lag from a hop's last sample sent to its label received),
windows/s, CPU and memory, and a PNG of latency against sessions.

    python -m bench.load --steps 2,4,8,12,16 --step-s 40            # real model
    python -m bench.load --noop --fast --steps 8,16 --step-s 20      # serving path only
    python -m bench.load --noop --speed 50 --steps 10,20,40 --step-s 20

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
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

from bench import harness as hn
from bench import procs
from bench.harness import RESULTS, SPEAKERS, Server

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
    session_id: str = ""  # from `ready`
    sent_samples: int = 0  # of the stream
    summary_labels: int = -1  # labels the server says it sent (`summary`)
    enroll_s: float = 0.0  # from its first enroll message to its last `enrolled`
    stream_t: float = 0.0  # when its first stream frame was sent (monotonic)
    last_label_t: float = 0.0
    # (receive time, lag ms or None) of each label that needed an embedding
    window_times: list[tuple[float, float | None]] = field(default_factory=list)


async def _session(
    srv: Server,
    enrolls,
    conv: np.ndarray,
    start: int,
    seconds: float,
    speed: float,
    res: SessionResult,
) -> SessionResult:
    clock = hn.Clock()

    def on_label(m: dict) -> None:
        now = res.last_label_t = time.monotonic()
        res.labels += 1
        res.windows += "scores" in m
        lag = clock.label(m, now)
        lag = lag * 1e3 if lag is not None else None
        if "scores" in m:
            res.window_times.append((now, lag))
        if m["start_s"] < WARMUP_S:
            return  # all sessions enrolled at once just now
        res.latency_ms.append(m["latency_ms"])
        if lag is not None:
            res.lag_ms.append(lag)

    def on_error(line: str) -> None:
        res.error = res.error or line

    conn = None
    try:
        conn = await hn.connect(srv, on_label, on_error)
        res.session_id = conn.ready["session_id"]
        t_enroll = time.monotonic()
        for name, x in enrolls:
            await hn.enroll(conn, name, x)
        res.enroll_s = time.monotonic() - t_enroll
        await conn.send_json({"type": "stream"})
        res.stream_t = time.monotonic()
        chunk = 1600 if speed == 1.0 else 16000
        res.sent_samples = await hn.stream(
            conn, conv, chunk, speed, clock=clock, seconds=seconds, offset=start
        )
        res.summary_labels = (await hn.finish(conn))["labels"]
    except Exception as exc:  # a broken session is a result, not a crash
        res.error = res.error or hn.error_code(exc)
    finally:
        if conn is not None:
            await conn.close()
    return res


async def _all_streaming(results: list[SessionResult]) -> list[float]:
    """When each session began streaming, once every one has (or failed,
    and never will; up to 60 s)."""
    for _ in range(600):
        if all(r.stream_t or r.error for r in results):
            break
        await asyncio.sleep(0.1)
    return [r.stream_t for r in results if r.stream_t]


CpuSnapshot = Callable[[], dict[int, tuple[str, float]]]  # procs.cpu_by_pid


async def _steady(
    results: list[SessionResult],
    step_s: float,
    settle_s: float = 3.0,
    cpu_snapshot: CpuSnapshot = procs.cpu_by_pid,
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
    cpu_a = cpu_snapshot()
    await asyncio.sleep(t_b - time.monotonic())
    cpu_b = cpu_snapshot()
    by_role = procs.cpu_by_role(
        cpu_a, cpu_b
    )  # a process started meanwhile counts whole
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


async def _enroll_only(srv: Server, enrolls) -> float:
    """A session that connects, enrolls its two speakers and leaves; the
    seconds its enrollments took (nan when one failed)."""
    try:
        conn = await hn.connect(srv)
    except Exception:
        return float("nan")
    try:
        t0 = time.monotonic()
        for name, x in enrolls:
            await hn.enroll(conn, name, x)
        return time.monotonic() - t0
    except Exception:
        return float("nan")
    finally:
        await conn.close()


async def _burst(args, srv: Server, enrolls, results: list[SessionResult]) -> dict:
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
        *[_enroll_only(srv, enrolls) for _ in range(args.burst)]
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


async def step(
    args,
    srv: Server,
    enrolls,
    conv,
    n: int,
    *,
    cpu_snapshot: CpuSnapshot = procs.cpu_by_pid,
    results: list[SessionResult] | None = None,
) -> dict:
    """`n` sessions for `args.step_s` (`args.fast`, `.speed`, `.burst`);
    the step's row. `cpu_snapshot` reads the server's processes (its roles
    are the row's); `results`, when given, are the sessions' (n of them),
    for the caller to watch while they run."""
    speed = 0.0 if args.fast else args.speed
    psutil.cpu_percent(None)
    cpu0 = cpu_snapshot()
    own0 = sum(psutil.Process().cpu_times()[:2])
    seen = dict(cpu0)
    tracker = asyncio.create_task(procs.track_cpu(seen, snapshot=cpu_snapshot))
    t0 = time.monotonic()
    results = results if results is not None else [SessionResult() for _ in range(n)]
    steady = asyncio.create_task(
        _steady(results, args.step_s, cpu_snapshot=cpu_snapshot)
    )
    burst = (
        asyncio.create_task(_burst(args, srv, enrolls, results)) if args.burst else None
    )
    await asyncio.gather(
        *[
            _session(srv, enrolls, conv, k * 37 * 1600, args.step_s, speed, r)
            for k, r in enumerate(results)
        ]
    )
    wall = time.monotonic() - t0
    cpu = psutil.cpu_percent(None)
    tracker.cancel()
    seen.update(cpu_snapshot())
    by_role = procs.cpu_by_role(cpu0, seen)
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
        # What the server says it sent (each session's `summary`), and the
        # hops the sessions sent audio for (the last, shorter one included).
        "summary_labels": sum(max(0, r.summary_labels) for r in results),
        "hops_sent": sum(-(-r.sent_samples // hn.HOP_SAMPLES) for r in results),
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
        "ray_uss_mb": round(procs.memory_by_role()["total"]["uss_mib"], 1),
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


def _server_env(args) -> dict[str, str]:
    """The local server's settings for these options."""
    env = {"DIGLETT_MAX_SESSIONS": os.environ.get("DIGLETT_MAX_SESSIONS", "5000")}
    if args.noop:
        env["DIGLETT_EMBEDDER"] = "noop"
    if args.fast or args.speed > 20:  # past the default rate limit
        env["DIGLETT_MAX_RATE"] = "0"
    if args.pool >= 0:
        env["DIGLETT_SESSION_POOL"] = str(args.pool)
    return env


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    hn.server_args(ap)
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
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--pool",
        type=int,
        default=-1,
        help="warm pool of SessionActors (-1: the default); the first step "
        "starts once it has filled",
    )
    args = ap.parse_args()
    enrolls, conv = hn.voices(args.data)
    rows = []
    with hn.server(args.url, args.token, _server_env(args)) as srv:
        if not args.url:  # the first step starts on a full pool
            print(f"warm pool filled in {procs.wait_for_pool():.1f} s", flush=True)
        for n in [int(x) for x in args.steps.split(",")]:
            rows.append(asyncio.run(step(args, srv, enrolls, conv, n)))
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
