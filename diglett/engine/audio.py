"""Decoding of the wire's PCM frames and WAV files, and resampling to 16 kHz.

Pure numpy + soxr (a real polyphase resampler with a streaming mode, so
chunked input gives the same samples as one long call).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import soxr

from diglett.settings import SAMPLE_RATE

ENCODINGS = {"pcm_s16le": 2, "pcm_f32le": 4}
MIN_RATE = 8000
MAX_RATE = 96000


class AudioError(ValueError):
    """Audio that cannot be used; `code` is the protocol's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class InputFormat:
    """The client's declared audio format."""

    sample_rate: int = SAMPLE_RATE
    encoding: str = "pcm_s16le"

    @property
    def bytes_per_sample(self) -> int:
        return ENCODINGS[self.encoding]

    @property
    def max_frame_bytes(self) -> int:
        """One binary frame holds at most 1 s of audio."""
        return self.sample_rate * self.bytes_per_sample


def check_format(sample_rate: int, encoding: str) -> InputFormat:
    """Validate a `format` request; raises AudioError('unsupported_format')."""
    if encoding not in ENCODINGS:
        raise AudioError(
            "unsupported_format",
            f"encoding {encoding!r} is not supported; use one of {sorted(ENCODINGS)}",
        )
    if not MIN_RATE <= sample_rate <= MAX_RATE:
        raise AudioError(
            "unsupported_format",
            f"sample_rate {sample_rate} is outside {MIN_RATE}..{MAX_RATE} Hz",
        )
    return InputFormat(sample_rate, encoding)


def frame_error(data: bytes, fmt: InputFormat) -> AudioError | None:
    """Why one binary frame would be refused, or None; nothing is copied.

    `frame_too_large` for more than 1 s of audio, `bad_audio` for a partial
    sample or non-finite floats. The ingress checks each frame once with it
    (to know whether it may wait for more, `diglett/engine/holdback.py`); the
    session decodes it once, with `decode_frame`.
    """
    if len(data) > fmt.max_frame_bytes:
        return AudioError(
            "frame_too_large",
            f"frame of {len(data)} bytes holds more than 1 s of audio "
            f"({fmt.max_frame_bytes} bytes at {fmt.sample_rate} Hz {fmt.encoding})",
        )
    if len(data) % fmt.bytes_per_sample:
        return AudioError(
            "bad_audio",
            f"frame of {len(data)} bytes is not a whole number of "
            f"{fmt.bytes_per_sample}-byte samples",
        )
    if (
        fmt.encoding == "pcm_f32le"
        and not np.isfinite(np.frombuffer(data, "<f4")).all()
    ):
        return AudioError("bad_audio", "float samples must be finite (no NaN or inf)")
    return None


def decode_frame(data: bytes, fmt: InputFormat) -> np.ndarray:
    """Decode one binary frame into float32 samples in [-1, 1], shape (n,).

    Raises the AudioError of `frame_error` for a frame it refuses.
    """
    err = frame_error(data, fmt)
    if err is not None:
        raise err
    if fmt.encoding == "pcm_s16le":
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    return np.clip(np.frombuffer(data, dtype="<f4"), -1.0, 1.0).astype(np.float32)


def to_int16(x: np.ndarray) -> np.ndarray:
    """float32 samples in [-1, 1], shape (n,) → int16 (clipped), shape (n,).

    Windows travel from SessionActors to the embedding tier as int16: half
    the bytes, so one or two windows (~48 kB each) fit under Ray's 100 KiB
    inline limit and skip the object store. The stream was 16-bit to begin
    with in the usual case; for float input the rounding is ~-96 dBFS.
    """
    return (np.clip(x, -1.0, 32767 / 32768) * 32768).astype("<i2")


def to_float32(x: np.ndarray) -> np.ndarray:
    """The inverse of `to_int16`; float32 input passes through."""
    if x.dtype == np.int16:
        return x.astype(np.float32) / 32768.0
    return np.asarray(x, dtype=np.float32)


def encode_s16(x: np.ndarray) -> bytes:
    """float32 samples in [-1, 1], shape (n,) → the wire's `pcm_s16le` bytes.

    The inverse of `decode_frame` for s16: clips to the int16 range.
    """
    return to_int16(x).tobytes()


class StreamResampler:
    """Chunk-by-chunk resampler to 16 kHz that keeps its filter state.

    `push` returns what is ready; `flush` returns the tail held back by the
    filter delay. At 16 kHz input it passes samples through untouched.
    """

    def __init__(self, in_rate: int) -> None:
        self.in_rate = in_rate
        self._stream = (
            None
            if in_rate == SAMPLE_RATE
            else soxr.ResampleStream(in_rate, SAMPLE_RATE, 1, dtype="float32")
        )

    def push(self, x: np.ndarray) -> np.ndarray:
        if self._stream is None:
            return x
        return self._stream.resample_chunk(x, last=False)

    def flush(self) -> np.ndarray:
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        out = self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        self._stream = soxr.ResampleStream(
            self.in_rate, SAMPLE_RATE, 1, dtype="float32"
        )
        return out


def resample(x: np.ndarray, in_rate: int) -> np.ndarray:
    """Resample a whole signal `x` (shape (n,)) to 16 kHz."""
    if in_rate == SAMPLE_RATE:
        return x.astype(np.float32, copy=False)
    return soxr.resample(x, in_rate, SAMPLE_RATE).astype(np.float32, copy=False)


def decode_wav(data: bytes, max_s: float) -> tuple[np.ndarray, float]:
    """Decode a sound file (WAV, or any format libsndfile reads) to 16 kHz mono.

    Returns (samples of shape (n,), duration in seconds of the original).
    Raises AudioError: `bad_audio` when unreadable or empty, `too_long` when
    longer than `max_s`.
    """
    import soundfile as sf

    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, frames = f.samplerate, f.frames
            if rate <= 0:
                raise AudioError("bad_audio", "the file declares no sample rate")
            duration = frames / rate
            if duration > max_s:
                raise AudioError(
                    "too_long", f"audio is {duration:.1f} s long; at most {max_s:g} s"
                )
            x = f.read(dtype="float32", always_2d=True)
    except AudioError:
        raise
    except Exception as exc:  # libsndfile raises several types for bad input
        raise AudioError("bad_audio", f"not a readable WAV file: {exc}") from exc
    if x.shape[0] == 0:
        raise AudioError("bad_audio", "the file holds no audio samples")
    if not np.all(np.isfinite(x)):
        raise AudioError("bad_audio", "the file holds NaN or infinite samples")
    mono = np.clip(x.mean(axis=1), -1.0, 1.0)
    out = resample(mono, rate)
    if out.size == 0:  # e.g. one sample at a high rate
        raise AudioError("bad_audio", "the file holds too little audio")
    return out, duration
