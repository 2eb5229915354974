"""The benchmarks' one way to a server and its sessions.

`server()` starts Ray and the Serve app on this machine as the tests do
and `diglett serve` runs them (`serve_app.serve_env`: HAProxy, throughput
mode; one CPU embedding replica on a machine without a GPU, one per GPU
otherwise), or reaches a running server by URL. A session is the
project's own client, `client.session.Connection`, so a number measured
here is one of the code users run. Run the benchmarks from the repository
root as `python -m bench.<name>`.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from client.session import ClientError, Connection
from diglett.engine.audio import encode_s16

ROOT = Path(__file__).resolve().parents[1]
SPEAKERS = ROOT.parent / "shared" / "data" / "speakers"  # the dev set's speech
RESULTS = ROOT / "bench" / "results"
SAMPLE_RATE = 16000
HOP_SAMPLES = 8000  # 0.5 s, the server's hop


def http_base(ws_url: str) -> str:
    """http(s)://HOST:PORT of a ws(s)://HOST:PORT/v1/stream URL."""
    base = ws_url.split("/v1/stream")[0]
    return "http" + base[len("ws") :]


@dataclass(frozen=True)
class Server:
    url: str  # ws://HOST:PORT/v1/stream
    token: str = ""

    @property
    def http(self) -> str:
        return http_base(self.url)


def server_args(ap: argparse.ArgumentParser) -> None:
    """`--url` and `--token`, for `server()`: a running server to measure."""
    ap.add_argument(
        "--url", default="", help="ws://HOST:PORT/v1/stream of a running server"
    )
    ap.add_argument("--token", default=os.environ.get("DIGLETT_API_TOKEN", ""))


@contextmanager
def local_server(env: Mapping[str, str] | None = None, **ray_init) -> Iterator[Server]:
    """Ray and the Serve app on this machine, on a free port of 127.0.0.1;
    stopped on exit. `env` (DIGLETT_* settings) is set first, so the server
    reads it; `ray_init` goes to `ray.init` (num_cpus, address...)."""
    os.environ.update(env or {})
    import ray
    from ray import serve

    from serve_app.app import build_app
    from serve_app.serve_env import start_local_serve, wait_until_healthy

    port = start_local_serve(**ray_init)
    try:
        # As `diglett serve` does: one CPU embedding replica per machine
        # without a GPU (a second splits the same cores), one per GPU.
        gpus = int(ray.cluster_resources().get("GPU", 0))
        serve.run(
            build_app({"max_embed_replicas": gpus or 1}),
            name="diglett",
            route_prefix="/",
        )
        # Through HAProxy to the ingress, not Serve's slower fallback proxy.
        if not wait_until_healthy(f"http://127.0.0.1:{port}"):
            print("harness: the direct route is not up; sessions may be slower")
        token = os.environ.get("DIGLETT_API_TOKEN", "")
        yield Server(f"ws://127.0.0.1:{port}/v1/stream", token)
    finally:
        serve.shutdown()
        ray.shutdown()


@contextmanager
def server(
    url: str = "", token: str = "", env: Mapping[str, str] | None = None, **ray_init
) -> Iterator[Server]:
    """The server at `url` (with `token`), or, without one, `local_server`."""
    if url:
        yield Server(url, token)
        return
    with local_server(env, **ray_init) as local:
        yield local


# ------------------------------------------------------------------ sessions
def _ignore(_) -> None:
    pass


async def connect(
    srv: Server,
    on_label: Callable[[dict], None] = _ignore,
    on_error: Callable[[str], None] = _ignore,
    *,
    ready_timeout_s: float = 60.0,
    session: str | None = None,
    resume_token: str = "",
) -> Connection:
    """An open session (`ready` received), or the ClientError or Dropped
    that refused it; resumes `session` when given."""
    conn = Connection(
        srv.url, srv.token, on_label, on_error, ready_timeout_s=ready_timeout_s
    )
    try:
        await conn.open(session, resume_token)
    except Exception:
        await conn.close()
        raise
    return conn


def error_code(exc: BaseException) -> str:
    """A failed session's cause in a word: the server's code, or the
    exception's type."""
    code = getattr(exc, "code", None)
    return code if isinstance(code, str) and code else type(exc).__name__


async def enroll(
    conn: Connection,
    name: str,
    audio: np.ndarray,
    frame_samples: int = SAMPLE_RATE,
    timeout: float = 300.0,
) -> dict:
    """Enroll `name` from 16 kHz float `audio` in frames of `frame_samples`;
    the `enrolled` reply, or ClientError with the server's code."""
    conn.awaiting_reply = True  # an error answering it is the reply
    try:
        await conn.send_json({"type": "enroll", "speaker": name})
        for i in range(0, audio.size, frame_samples):
            await conn.send(encode_s16(audio[i : i + frame_samples]))
        await conn.send_json({"type": "enroll_end"})
        reply = await conn.reply(timeout)
    finally:
        conn.awaiting_reply = False
    if reply.get("type") != "enrolled":
        raise ClientError(f"enrolling {name}: {reply}", reply.get("code"))
    return reply


class Clock:
    """When each hop's last sample went out, so that its label is timed on
    arrival (the client's lag), and how many hops are unanswered."""

    def __init__(self, hop_samples: int = HOP_SAMPLES) -> None:
        self.hop_samples = hop_samples
        self.sent_at: dict[int, float] = {}  # hop seq -> monotonic time
        self.samples = 0  # sent so far
        self.labels = 0  # received so far
        self._label = asyncio.Event()

    def sent(self, start: int, end: int, t: float) -> None:
        """Samples [start, end) of the stream went out at `t`."""
        for seq in range(start // self.hop_samples, end // self.hop_samples):
            self.sent_at[seq] = t
        self.samples = max(self.samples, end)

    def label(self, msg: dict, t: float) -> float | None:
        """A label arrived at `t`: its lag in seconds (None when its hop's
        last sample was not sent through `sent`)."""
        self.labels += 1
        self._label.set()
        sent = self.sent_at.pop(msg["seq"], None)
        return None if sent is None else t - sent

    async def within(self, ahead: float, timeout: float) -> None:
        """Wait until at most `ahead` hops are unanswered."""
        deadline = time.monotonic() + timeout
        while self.samples / self.hop_samples - self.labels > ahead:
            self._label.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClientError(f"no label from the server in {timeout:.0f} s")
            try:
                await asyncio.wait_for(self._label.wait(), left)
            except asyncio.TimeoutError:
                pass


FOREVER = math.inf  # `stream(seconds=FOREVER, stop=...)`: until stopped


async def stream(
    conn: Connection,
    audio: np.ndarray,
    frame_samples: int,
    speed: float = 1.0,
    *,
    clock: Clock | None = None,
    seconds: float | None = None,
    offset: int = 0,
    stop: asyncio.Event | None = None,
    ahead: float | None = None,
    timeout: float = 120.0,
) -> int:
    """Send 16 kHz float `audio` (after `stream`) as binary frames of
    `frame_samples`, at `speed`x real time (0: as fast as they go), once;
    or, with `seconds`, looped from `offset` for that long (`math.inf`:
    until `stop` is set). With `clock` and `ahead`, never more than `ahead`
    hops unanswered. Returns the samples sent."""
    t0 = time.monotonic()
    i = 0
    while True:
        if stop is not None and stop.is_set():
            break
        if seconds is None and i >= audio.size:
            break
        if seconds is not None and time.monotonic() - t0 >= seconds:
            break
        if speed > 0:
            delay = t0 + i / SAMPLE_RATE / speed - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        if seconds is None:
            frame = audio[i : i + frame_samples]
        else:
            j = (offset + i) % (audio.size - frame_samples)
            frame = audio[j : j + frame_samples]
        await conn.send(encode_s16(frame))
        if clock is not None:
            clock.sent(i, i + frame.size, time.monotonic())
            if ahead is not None:
                await clock.within(ahead, timeout)
        i += frame.size
    return i


async def finish(conn: Connection, timeout: float = 300.0) -> dict:
    """Send `end`; the `summary` (every label has arrived before it)."""
    await conn.send_json({"type": "end"})
    while True:
        msg = await conn.reply(timeout)
        if msg.get("type") == "summary":
            return msg


# -------------------------------------------------------------------- speech
def utterances(folder: Path) -> dict[str, list[Path]]:
    """The dev set's utterances by speaker, longest first."""
    by: dict[str, list[tuple[float, Path]]] = {}
    for r in csv.DictReader((folder / "manifest.csv").open()):
        by.setdefault(r["speaker"], []).append(
            (float(r["duration_s"]), folder / r["file"])
        )
    return {k: [p for _, p in sorted(v, reverse=True)] for k, v in by.items()}


def read16(path: Path) -> np.ndarray:
    """A 16 kHz WAV as float32, shape (n,)."""
    return sf.read(path, dtype="float32")[0]


def voices(
    folder: Path, a: str = "LS-19", b: str = "LS-26"
) -> tuple[list[tuple[str, np.ndarray]], np.ndarray]:
    """Two 5 s enrollments (each speaker's longest utterance) and a long
    conversation of the same speakers' other utterances, turn about, 0.5 s
    apart."""
    files = utterances(folder)
    enrolls = [(n, read16(files[n][0])[: 5 * SAMPLE_RATE]) for n in (a, b)]
    turns = []
    for pa, pb in zip(files[a][1:], files[b][1:]):
        turns += [read16(pa), np.zeros(HOP_SAMPLES, np.float32), read16(pb)]
    return enrolls, np.concatenate(turns)
