"""`diglett-client`: enroll from WAV files and stream a WAV file, headless.

    diglett-client --enroll alice=alice.wav --enroll bob=bob.wav conversation.wav
    diglett-client --url ws://host:8000/v1/stream --realtime ...

Files of any rate and channel count are mixed to mono and sent as 16-bit PCM
at their own rate (the server resamples). Server URL and token also come
from `DIGLETT_URL` / `DIGLETT_API_TOKEN` (environment or `.env`).
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
import soundfile as sf
from dotenv import load_dotenv

FRAME_S = 0.1


def read_mono(path: Path) -> tuple[np.ndarray, int]:
    """A sound file as float32 mono, shape (n,), and its sample rate."""
    x, rate = sf.read(path, dtype="float32", always_2d=True)
    return x.mean(axis=1), rate


def pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1.0, 32767 / 32768) * 32768).astype("<i2").tobytes()


def format_label(m: dict) -> str:
    scores = " ".join(f"{k}={v:+.2f}" for k, v in m.get("scores", {}).items())
    return (
        f"{m['start_s']:7.1f}-{m['end_s']:<7.1f} {m['label']:<12} "
        f"{m['level_dbfs']:6.1f} dBFS  {scores}  ({m.get('latency_ms', 0):.0f} ms)"
    )


async def run(args: argparse.Namespace) -> int:
    import websockets

    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    async with websockets.connect(
        args.url, additional_headers=headers, max_size=2**24
    ) as ws:
        ready = json.loads(await ws.recv())
        if ready.get("type") != "ready":
            print(f"server refused: {ready.get('message', ready)}", file=sys.stderr)
            return 1
        rate = None
        for spec in args.enroll:
            name, _, path = spec.partition("=")
            x, r = read_mono(Path(path))
            if rate is None:
                rate = r
                if r != 16000:
                    await ws.send(json.dumps({"type": "format", "sample_rate": r}))
                    print(json.loads(await ws.recv()))
            elif r != rate:
                print("all files must share one sample rate", file=sys.stderr)
                return 2
            await ws.send(json.dumps({"type": "enroll", "speaker": name}))
            step = int(r * FRAME_S)
            for i in range(0, x.size, step):
                await ws.send(pcm16(x[i : i + step]))
            await ws.send(json.dumps({"type": "enroll_end"}))
            reply = json.loads(await ws.recv())
            if reply["type"] == "error":
                print(f"enroll {name}: {reply['code']}: {reply['message']}")
                return 1
            print(
                f"enrolled {name}: {reply['duration_s']} s, speech "
                f"{reply['speech_s']} s, {reply['level_dbfs']} dBFS "
                f"{' '.join(reply['warnings'])}"
            )
        x, r = read_mono(Path(args.audio))
        if rate is not None and r != rate:
            print("all files must share one sample rate", file=sys.stderr)
            return 2
        await ws.send(json.dumps({"type": "stream"}))

        async def show() -> int:
            async for raw in ws:
                m = json.loads(raw)
                if m["type"] == "label":
                    print(format_label(m), flush=True)
                elif m["type"] == "summary":
                    print("summary:", json.dumps(m["talk_s"]))
                elif m["type"] == "error":
                    print(f"error {m['code']}: {m['message']}", file=sys.stderr)
            return 0 if ws.close_code == 1000 else 1

        printer = asyncio.create_task(show())
        step = int(r * FRAME_S)
        t0 = time.monotonic()
        for k, i in enumerate(range(0, x.size, step)):
            if args.realtime:
                await asyncio.sleep(max(0.0, t0 + k * FRAME_S - time.monotonic()))
            await ws.send(pcm16(x[i : i + step]))
        await ws.send(json.dumps({"type": "end"}))
        return await printer


def main(argv: list[str] | None = None) -> int:
    load_dotenv()
    ap = argparse.ArgumentParser(prog="diglett-client", description=__doc__)
    ap.add_argument("audio", help="WAV file of the conversation")
    ap.add_argument(
        "--enroll", action="append", default=[], metavar="NAME=WAV", required=True
    )
    ap.add_argument(
        "--url", default=os.environ.get("DIGLETT_URL", "ws://127.0.0.1:8000/v1/stream")
    )
    ap.add_argument("--token", default=os.environ.get("DIGLETT_API_TOKEN", ""))
    ap.add_argument("--realtime", action="store_true", help="pace audio in real time")
    args = ap.parse_args(argv)
    try:
        return asyncio.run(run(args))
    except (OSError, ConnectionError) as exc:
        print(f"diglett-client: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
