"""Audio sources for the client: the microphone (PyAudio) and sound files.

Every source yields float32 mono chunks of about `CHUNK_S` seconds at
`source.rate`. PyAudio is imported only when a microphone is used, so WAV
mode works without PortAudio installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import AsyncIterator

import numpy as np
import soundfile as sf

CHUNK_S = 0.1


class AudioSetupError(Exception):
    """A microphone or file problem, worded for the user."""


def encode_s16(x: np.ndarray) -> bytes:
    """float32 samples in [-1, 1], shape (n,) → the wire's `pcm_s16le` bytes,
    clipped to the int16 range.

    The same as `diglett.engine.audio.encode_s16`, copied so that the client installs
    on its own (`pip install ./client`) without the server's torch and Ray;
    tests/serve/test_client_install.py checks that the two agree.
    """
    return (np.clip(x, -1.0, 32767 / 32768) * 32768).astype("<i2").tobytes()


pcm16 = encode_s16


def dbfs(x: np.ndarray) -> float:
    if x.size == 0:
        return -120.0
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    return max(-120.0, 20.0 * np.log10(rms)) if rms > 0 else -120.0


def level_bar(db: float, width: int = 20, floor: float = -70.0) -> str:
    frac = min(1.0, max(0.0, (db - floor) / -floor))
    n = int(round(frac * width))
    return "█" * n + "░" * (width - n)


def read_mono(path: Path, rate: int | None = None) -> tuple[np.ndarray, int]:
    """A sound file as float32 mono; resampled to `rate` when given."""
    try:
        x, r = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:
        raise AudioSetupError(f"cannot read audio file {path}: {exc}") from None
    x = x.mean(axis=1)
    if rate is not None and r != rate:
        import soxr

        x = soxr.resample(x, r, rate).astype(np.float32)
        r = rate
    return x, r


@contextlib.contextmanager
def _quiet_stderr():
    """Hide the ALSA/JACK chatter PortAudio prints while probing devices."""
    if os.environ.get("DIGLETT_CLIENT_DEBUG"):
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _pyaudio():
    try:
        import pyaudio
    except ImportError:
        raise AudioSetupError(
            "the microphone needs PyAudio: pip install pyaudio (or, in the "
            "Diglett repo: pip install ./client); on Debian/Ubuntu first: "
            "apt-get install portaudio19-dev"
        ) from None
    with _quiet_stderr():
        return pyaudio, pyaudio.PyAudio()


def list_devices() -> list[dict]:
    """Input devices: index, name, channels, default rate, default flag."""
    pyaudio, pa = _pyaudio()
    try:
        try:
            default = pa.get_default_input_device_info()["index"]
        except (IOError, OSError):
            default = None
        out = []
        for i in range(pa.get_device_count()):
            d = pa.get_device_info_by_index(i)
            if d.get("maxInputChannels", 0) > 0:
                out.append(
                    {
                        "index": i,
                        "name": d["name"],
                        "channels": int(d["maxInputChannels"]),
                        "rate": int(d["defaultSampleRate"]),
                        "default": i == default,
                    }
                )
        return out
    finally:
        pa.terminate()


def _find_device(pa, spec: str | None) -> dict:
    if spec in (None, ""):
        try:
            return pa.get_default_input_device_info()
        except (IOError, OSError):
            raise AudioSetupError(
                "no default input device; see --list-devices and pass --device"
            ) from None
    devices = [pa.get_device_info_by_index(i) for i in range(pa.get_device_count())]
    devices = [d for d in devices if d.get("maxInputChannels", 0) > 0]
    if spec.isdigit():
        for d in devices:
            if d["index"] == int(spec):
                return d
    else:
        for exact in (True, False):
            for d in devices:
                name = d["name"].lower()
                if (name == spec.lower()) if exact else (spec.lower() in name):
                    return d
    names = ", ".join(f"{d['index']}: {d['name']}" for d in devices) or "none"
    raise AudioSetupError(f"no input device {spec!r}; input devices: {names}")


class Microphone:
    """A PyAudio input stream; `rate` is 16 kHz when the device allows it."""

    def __init__(self, device: str | None = None, rate: int = 16000) -> None:
        self._pyaudio, self._pa = _pyaudio()
        try:
            info = _find_device(self._pa, device)
            self.name = info["name"]
            self._index = int(info["index"])
            self._channels = 1
            self.rate = rate
            candidates = [rate, int(info["defaultSampleRate"])]
            for r in candidates:
                try:
                    ok = self._pa.is_format_supported(
                        r,
                        input_device=self._index,
                        input_channels=1,
                        input_format=self._pyaudio.paInt16,
                    )
                except ValueError:
                    ok = False
                if ok:
                    self.rate = r
                    break
            else:
                raise AudioSetupError(
                    f"device {self.name!r} supports neither {rate} Hz nor its "
                    "default rate in mono 16-bit"
                )
            self._frames = int(self.rate * CHUNK_S)
            with _quiet_stderr():
                self._stream = self._pa.open(
                    format=self._pyaudio.paInt16,
                    channels=1,
                    rate=self.rate,
                    input=True,
                    input_device_index=self._index,
                    frames_per_buffer=self._frames,
                )
        except AudioSetupError:
            self._pa.terminate()
            raise
        except Exception as exc:
            self._pa.terminate()
            raise AudioSetupError(f"cannot open the microphone: {exc}") from None
        self._lock = threading.Lock()

    def read(self) -> np.ndarray:
        """One chunk (blocking)."""
        with self._lock:
            data = self._stream.read(self._frames, exception_on_overflow=False)
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0

    async def chunks(
        self, seconds: float | None = None, stop: asyncio.Event | None = None
    ) -> AsyncIterator[np.ndarray]:
        """Chunks as they are recorded, for `seconds` or until `stop`.

        A reader thread keeps recording while the consumer is busy (for
        instance while reconnecting), so no audio is dropped in between.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        done = threading.Event()
        total = None if seconds is None else int(round(seconds / CHUNK_S))

        def pump() -> None:
            n = 0
            try:
                while not done.is_set() and (total is None or n < total):
                    chunk = self.read()
                    n += 1
                    loop.call_soon_threadsafe(queue.put_nowait, chunk)
            except Exception as exc:  # device unplugged, stream closed
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            loop.call_soon_threadsafe(queue.put_nowait, None)

        thread = threading.Thread(target=pump, daemon=True, name="mic")
        thread.start()
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                waits = {getter}
                stopper = None
                if stop is not None:
                    stopper = asyncio.ensure_future(stop.wait())
                    waits.add(stopper)
                finished, _ = await asyncio.wait(
                    waits, return_when=asyncio.FIRST_COMPLETED
                )
                if stopper is not None:
                    stopper.cancel()
                if getter not in finished:
                    getter.cancel()
                    return
                item = getter.result()
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise AudioSetupError(f"microphone failed: {item}")
                yield item
        finally:
            done.set()
            await asyncio.get_running_loop().run_in_executor(None, thread.join, 2.0)

    def close(self) -> None:
        try:
            self._stream.stop_stream()
            self._stream.close()
        except Exception:
            pass
        self._pa.terminate()


async def file_chunks(
    x: np.ndarray,
    rate: int,
    speed: float | None,
    stop: asyncio.Event | None = None,
) -> AsyncIterator[np.ndarray]:
    """`x` in CHUNK_S pieces; paced at `speed` × real time (None: no pacing)."""
    step = int(rate * CHUNK_S)
    t0 = time.monotonic()
    for k, i in enumerate(range(0, x.size, step)):
        if stop is not None and stop.is_set():
            return
        if speed:
            await asyncio.sleep(max(0.0, t0 + k * CHUNK_S / speed - time.monotonic()))
        yield x[i : i + step]
