"""`diglett-client`: enroll two speakers and get live labels, from a microphone or WAV files.

    diglett-client --list-devices
    diglett-client stream --enroll alice --enroll bob          # all from the microphone
    diglett-client enroll alice bob                            # enroll now ...
    diglett-client stream --timeline talk.csv --plot talk.png  # ... stream within the TTL
    diglett-client stream --enroll alice=a.wav --enroll bob=b.wav conversation.wav --fast

A speaker given as NAME is recorded from the microphone after a countdown,
with a live level meter; NAME=FILE takes a sound file instead. `stream`
without a FILE streams the microphone until Ctrl-C (or --duration), with one
line per label: who speaks, the scores, the level and the running talk time.

Server URL, token and audio device come from flags, else the environment or
a `.env` file: DIGLETT_URL, DIGLETT_API_TOKEN, DIGLETT_AUDIO_DEVICE. A
dropped connection is resumed (the server keeps a session for
DIGLETT_SESSION_TTL_S, 60 s by default).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
from dotenv import load_dotenv

from client.audio import (
    CHUNK_S,
    AudioSetupError,
    Microphone,
    dbfs,
    file_chunks,
    level_bar,
    list_devices,
    pcm16,
    read_mono,
)
from client.output import Display, Timeline
from client.session import ClientError, Connection, Dropped

DEFAULT_URL = "ws://127.0.0.1:8000/v1/stream"
FAST_SPEED = 15.0  # × real time: below the server's default DIGLETT_MAX_RATE of 20
RETRIES = 6


def default_session_file() -> Path:
    env = os.environ.get("DIGLETT_SESSION_FILE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "diglett" / "client-session.json"


def parse_speaker(spec: str) -> tuple[str, Path | None]:
    name, eq, path = spec.partition("=")
    name = name.strip()
    if not name:
        raise ClientError(f"bad speaker {spec!r}: use NAME or NAME=FILE")
    return name, (check_file(path) if eq else None)


def check_file(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ClientError(f"no such audio file: {path}")
    return p


class Runner:
    """One client run: connection(s), audio sources, display and timeline."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.timeline = Timeline()
        self.display = Display(self.timeline)
        self.conn: Connection | None = None
        self.mic: Microphone | None = None
        self.rate = 16000
        self.session_id: str | None = None
        self.resume_token = ""
        self.stop = asyncio.Event()
        self.sent_s = 0.0  # audio of the current stream sent so far
        self.streaming = False

    # ----------------------------------------------------------- connection
    def _on_label(self, m: dict) -> None:
        self.display.label(self.timeline.add(m))

    async def connect(self, resume: bool = False) -> None:
        conn = Connection(
            self.args.url, self.args.token, self._on_label, self.display.error
        )
        if resume:
            ready = await conn.open(self.session_id, self.resume_token)
        else:
            ready = await conn.open()
            self.session_id = ready["session_id"]
            self.resume_token = ready["resume_token"]
        self.timeline.session_id = self.session_id
        self.conn = conn
        if self.rate != ready.get("sample_rate", 16000):
            conn.awaiting_reply = True
            await conn.send_json(
                {"type": "format", "sample_rate": self.rate, "encoding": "pcm_s16le"}
            )
            reply = await conn.reply()
            conn.awaiting_reply = False
            if reply.get("type") != "format_ok":
                from client.session import describe

                raise ClientError(describe(reply), reply.get("code"))

    async def reconnect(self, why: str) -> None:
        """Resume the session on a new connection, with back-off."""
        if self.conn is not None:
            await self.conn.close()
        self.timeline.reconnects += 1
        delay = 0.5
        for attempt in range(1, RETRIES + 1):
            self.display.error(
                f"{why}; resuming session {self.session_id[:8]}… "
                f"(attempt {attempt}/{RETRIES})"
            )
            try:
                await self.connect(resume=True)
                self.display.info("resumed.")
                return
            except Dropped as exc:
                why = str(exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        raise ClientError(f"gave up after {RETRIES} attempts: {why}")

    async def send_audio(self, chunk: np.ndarray) -> None:
        """Send one chunk; on a drop, resume and send it again."""
        data = pcm16(chunk)
        while True:
            try:
                await self.conn.send(data)
                return
            except Dropped as exc:
                await self.reconnect(str(exc))
                if self.streaming:
                    # The resumed stream's clock restarts at 0 where this
                    # chunk starts; audio the server got but never labelled
                    # before the drop is a gap in the timeline.
                    self.timeline.offset_s = self.sent_s
                    await self.conn.send_json({"type": "stream"})

    # ----------------------------------------------------------- enrollment
    async def _record(self, name: str) -> list[np.ndarray]:
        """Countdown, then record the microphone with a live level meter."""
        seconds, tty = self.args.seconds, sys.stdout.isatty()
        self.display.info(
            f"Enrolling {name}: after the countdown, talk for {seconds:.0f} s "
            "(read anything aloud, at your normal distance)."
        )
        for k in range(int(self.args.countdown), 0, -1):
            self.display.info(f"  {k}…")
            await asyncio.sleep(1.0)
        self.display.info("  speak now!")
        chunks, t, last_line = [], 0.0, -1
        async for chunk in self.mic.chunks(seconds, self.stop):
            chunks.append(chunk)
            t += chunk.size / self.mic.rate
            db = dbfs(chunk)
            text = f"  {name}: {t:4.1f}/{seconds:.0f} s  {level_bar(db)} {db:6.1f} dBFS"
            if tty:
                print("\r" + text, end="", flush=True)
            elif int(t) != last_line:
                last_line = int(t)
                self.display.info(text)
        if tty:
            print(flush=True)
        if self.stop.is_set():
            raise ClientError("interrupted")
        return chunks

    async def enroll(self, name: str, path: Path | None) -> dict:
        if path is None:
            chunks = await self._record(name)
        else:
            x, _ = read_mono(path, self.rate)
            step = int(self.rate * CHUNK_S)
            chunks = [x[i : i + step] for i in range(0, x.size, step)]
        for attempt in range(2):
            try:
                self.conn.awaiting_reply = True
                await self.conn.send_json({"type": "enroll", "speaker": name})
                for c in chunks:
                    await self.conn.send(pcm16(c))
                await self.conn.send_json({"type": "enroll_end"})
                reply = await self.conn.reply()
                # After a refused enroll the server also refuses the audio
                # and `enroll_end` that followed it: those errors stay
                # replies (unprinted), so the user sees one line, the cause.
                self.conn.awaiting_reply = reply.get("type") == "error"
                break
            except Dropped as exc:
                if attempt:
                    raise ClientError(f"enrollment of {name} failed: {exc}")
                await self.reconnect(str(exc))
        if reply.get("type") == "error":
            from client.session import describe

            raise ClientError(f"enrolling {name}: {describe(reply)}", reply["code"])
        if reply.get("type") != "enrolled":
            raise ClientError(f"unexpected reply to enroll_end: {reply}")
        warn = reply.get("warnings") or []
        self.display.info(
            f"enrolled {reply['speaker']}: {reply['duration_s']:.1f} s of audio, "
            f"{reply['speech_s']:.1f} s of speech, {reply['level_dbfs']:.1f} dBFS"
            + (f"  warnings: {', '.join(warn)}" if warn else "  (no warnings)")
        )
        for w in warn:
            hint = {
                "quiet": "speak louder or move closer to the microphone",
                "clipping": "too loud: lower the input gain or move away",
                "noisy": "background noise: find a quieter place",
                "truncated": "only the first enroll_max_s seconds were used",
            }.get(w)
            if hint:
                self.display.info(f"  {w}: {hint}")
        if name not in self.timeline.speakers:
            self.timeline.speakers.append(name)
        return reply

    # ------------------------------------------------------------- streaming
    async def stream(self, path: Path | None) -> None:
        if path is not None:
            x, _ = read_mono(path, self.rate)
            speed = None if self.args.speed <= 0 else self.args.speed
            source = file_chunks(x, self.rate, speed, self.stop)
            what = f"{path} ({x.size / self.rate:.1f} s"
            what += f", {speed:g}× real time)" if speed else ", unpaced)"
        else:
            source = self.mic.chunks(self.args.duration, self.stop)
            what = f"the microphone ({self.mic.name}, {self.mic.rate} Hz)"
        self.display.info(
            f"streaming {what} — speakers: {', '.join(self.timeline.speakers)}"
            + ("; Ctrl-C ends" if path is None else "")
        )
        self.streaming = True
        self.conn.awaiting_reply = True
        await self.conn.send_json({"type": "stream"})
        # `not_enrolled` answers `stream` at once; give it a moment to arrive.
        try:
            early = await asyncio.wait_for(self.conn.replies.get(), 0.3)
        except asyncio.TimeoutError:
            early = None
        self.conn.awaiting_reply = False
        if early is not None and early.get("type") == "error":
            from client.session import describe

            raise ClientError(describe(early), early.get("code"))
        self.timeline.offset_s = 0.0
        async for chunk in source:
            await self.send_audio(chunk)
            self.sent_s += chunk.size / self.rate
        await self.finish()

    async def finish(self) -> None:
        """`end`, then wait for the remaining labels and the summary."""
        wait = 60.0 + max(0.0, self.sent_s - self.timeline.end_s)
        for attempt in range(2):
            try:
                await self.conn.send_json({"type": "end"})
                while True:
                    msg = await self.conn.reply(timeout=wait)
                    if msg.get("type") == "summary":
                        self.timeline.summary = msg
                        break
                break
            except Dropped as exc:
                if attempt:
                    self.display.error(f"no summary from the server: {exc}")
                    break
                await self.reconnect(str(exc))
                self.timeline.offset_s = self.sent_s
        self.streaming = False
        await self.conn.close()


def save_session(path: Path, runner: Runner) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "url": runner.args.url,
                "session_id": runner.session_id,
                "resume_token": runner.resume_token,
                "speakers": runner.timeline.speakers,
                "saved_at": time.time(),
            }
        )
    )
    try:
        path.chmod(0o600)
    except OSError:
        pass


async def run_enroll(runner: Runner) -> int:
    args = runner.args
    specs = [parse_speaker(s) for s in args.speakers]
    if any(p is None for _, p in specs):
        runner.mic = Microphone(args.device)
        runner.rate = runner.mic.rate
    else:
        runner.rate = read_mono(specs[0][1])[1]
    await runner.connect()
    for name, path in specs:
        await runner.enroll(name, path)
    await runner.conn.close()  # no `end`: the session waits for `stream`
    save_session(args.session_file, runner)
    runner.display.info(
        f"session {runner.session_id[:8]}… saved to {args.session_file}; run "
        "`diglett-client stream` before the server's session TTL passes "
        "(DIGLETT_SESSION_TTL_S, 60 s by default)."
    )
    return 0


async def run_stream(runner: Runner) -> int:
    args = runner.args
    specs = [parse_speaker(s) for s in args.enroll]
    audio = check_file(args.audio) if args.audio else None
    if audio is None or any(p is None for _, p in specs):
        runner.mic = Microphone(args.device)
        runner.rate = runner.mic.rate
    else:
        runner.rate = read_mono(audio if audio else specs[0][1])[1]
    if specs:
        await runner.connect()
        for name, path in specs:
            await runner.enroll(name, path)
    else:
        try:
            saved = json.loads(args.session_file.read_text())
        except (OSError, ValueError):
            raise ClientError(
                f"no enrolled session in {args.session_file}: run "
                "`diglett-client enroll NAME NAME` first, or pass --enroll"
            ) from None
        runner.session_id = saved["session_id"]
        runner.resume_token = saved["resume_token"]
        runner.timeline.speakers = list(saved.get("speakers", []))
        try:
            await runner.connect(resume=True)
        except ClientError as exc:
            if exc.code == "session_expired":
                raise ClientError(
                    "the enrolled session has expired (the server keeps it for "
                    "DIGLETT_SESSION_TTL_S after `enroll`): enroll again, or use "
                    "`stream --enroll NAME ...` to do both in one run",
                    exc.code,
                ) from None
            raise
    try:
        await runner.stream(audio)
    finally:
        if runner.timeline.rows:
            runner.display.summary()
            if args.timeline:
                runner.timeline.write(Path(args.timeline))
                runner.display.info(f"timeline written to {args.timeline}")
            if args.plot:
                runner.timeline.plot(Path(args.plot))
                runner.display.info(f"plot written to {args.plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=os.environ.get("DIGLETT_URL", DEFAULT_URL),
        help=f"server WebSocket URL (DIGLETT_URL; default {DEFAULT_URL})",
    )
    common.add_argument(
        "--token",
        default=os.environ.get("DIGLETT_API_TOKEN", ""),
        help="API token (DIGLETT_API_TOKEN)",
    )
    common.add_argument(
        "--device",
        default=os.environ.get("DIGLETT_AUDIO_DEVICE") or None,
        help="input device: index or name (part); DIGLETT_AUDIO_DEVICE",
    )
    common.add_argument(
        "--list-devices", action="store_true", help="list input devices and exit"
    )
    common.add_argument(
        "--session-file",
        type=Path,
        default=default_session_file(),
        help="where `enroll` saves the session that `stream` resumes",
    )
    common.add_argument(
        "--seconds", type=float, default=10.0, help="microphone enrollment length"
    )
    common.add_argument(
        "--countdown", type=int, default=3, help="countdown before recording"
    )

    ap = argparse.ArgumentParser(
        prog="diglett-client",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--list-devices", action="store_true", help="list input devices and exit"
    )
    sub = ap.add_subparsers(dest="command")
    en = sub.add_parser(
        "enroll", parents=[common], help="enroll speakers (microphone or files)"
    )
    en.add_argument(
        "speakers", nargs="+", metavar="NAME[=FILE]", help="speakers to enroll"
    )
    st = sub.add_parser("stream", parents=[common], help="stream and show live labels")
    st.add_argument("audio", nargs="?", help="sound file to stream (default: mic)")
    st.add_argument(
        "--enroll",
        action="append",
        default=[],
        metavar="NAME[=FILE]",
        help="enroll first, in this run (repeat for each speaker)",
    )
    pace = st.add_mutually_exclusive_group()
    pace.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="file pacing in × real time (default 1: real time; 0: unpaced)",
    )
    pace.add_argument(
        "--fast",
        dest="speed",
        action="store_const",
        const=FAST_SPEED,
        help=f"send a file as fast as the server allows ({FAST_SPEED:g}×)",
    )
    st.add_argument(
        "--duration", type=float, default=None, help="stop the microphone after S s"
    )
    st.add_argument("--timeline", help="write the labels to out.json or out.csv")
    st.add_argument("--plot", help="write speaker bands and level to out.png")
    return ap


def check_plot(args: argparse.Namespace) -> None:
    """Fail before anything starts, not after the stream, if `--plot` cannot
    be written: it needs matplotlib, which only the client's `plot` extra
    installs (`pip install './client[plot]'`)."""
    if not getattr(args, "plot", None):
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ClientError(
            "--plot needs matplotlib: pip install matplotlib "
            "(or, in the Diglett repo: pip install './client[plot]')"
        ) from None


def print_devices() -> int:
    devices = list_devices()
    if not devices:
        print("no input devices found")
        return 1
    for d in devices:
        mark = "*" if d["default"] else " "
        print(
            f"{mark} {d['index']:3d}  {d['name']}  ({d['channels']} ch, {d['rate']} Hz)"
        )
    print("(* = default; pass --device INDEX or a part of the name)")
    return 0


async def _main(args: argparse.Namespace) -> int:
    runner = Runner(args)
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()

    def on_sigint() -> None:
        if runner.stop.is_set():
            main_task.cancel()
        else:
            print("\nstopping (Ctrl-C again to quit at once)…", file=sys.stderr)
            runner.stop.set()

    try:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    except (NotImplementedError, RuntimeError):
        pass
    try:
        if args.command == "enroll":
            return await run_enroll(runner)
        return await run_stream(runner)
    except Dropped as exc:
        raise ClientError(str(exc)) from None
    finally:
        if runner.mic is not None:
            runner.mic.close()
        if runner.conn is not None:
            await runner.conn.close()


def main(argv: list[str] | None = None) -> int:
    load_dotenv(Path.cwd() / ".env")
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "list_devices", False):
            return print_devices()
        if args.command is None:
            build_parser().print_help()
            return 2
        check_plot(args)
        return asyncio.run(_main(args))
    except (ClientError, AudioSetupError) as exc:
        print(f"diglett-client: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 130
    except Exception as exc:  # the promise: a clear line, never a traceback
        print(
            f"diglett-client: unexpected {type(exc).__name__}: {exc}", file=sys.stderr
        )
        if os.environ.get("DIGLETT_CLIENT_DEBUG"):
            raise
        return 1


if __name__ == "__main__":
    sys.exit(main())
