"""Sound levels and the energy-based speech gate.

Pure numpy: every function takes float32 audio in [-1, 1] at 16 kHz.
"""

from __future__ import annotations

from collections import deque

import numpy as np

SILENCE_DBFS = -120.0
FRAME_SAMPLES = 320  # 20 ms at 16 kHz: the gate's resolution


def rms_dbfs(x: np.ndarray) -> float:
    """RMS level of `x` (shape (n,)) in dB relative to full scale.

    A full-scale square wave is 0 dBFS; digital silence (or no samples) is
    `SILENCE_DBFS`.
    """
    if x.size == 0:
        return SILENCE_DBFS
    ms = float(np.mean(np.square(x, dtype=np.float64)))
    if ms <= 1e-12:
        return SILENCE_DBFS
    return max(SILENCE_DBFS, 10.0 * np.log10(ms))


def frame_dbfs(x: np.ndarray, frame: int = FRAME_SAMPLES) -> np.ndarray:
    """Level of each whole `frame`-sample frame of `x`: shape (n // frame,).

    A trailing partial frame counts as a frame of its own when it holds at
    least half a frame, so short hops are still measured.
    """
    n_full = x.size // frame
    tail = x.size - n_full * frame
    parts = [x[: n_full * frame].reshape(n_full, frame)] if n_full else []
    ms = [np.mean(np.square(p, dtype=np.float64), axis=1) for p in parts]
    if tail >= frame // 2:
        ms.append(np.array([np.mean(np.square(x[-tail:], dtype=np.float64))]))
    if not ms:
        return np.zeros(0)
    all_ms = np.concatenate(ms)
    with np.errstate(divide="ignore"):
        db = 10.0 * np.log10(np.maximum(all_ms, 1e-12))
    return np.maximum(db, SILENCE_DBFS)


def speech_frames(x: np.ndarray, gate_dbfs: float) -> np.ndarray:
    """Boolean mask of the 20 ms frames of `x` whose level reaches the gate."""
    return frame_dbfs(x) >= gate_dbfs


def speech_seconds(x: np.ndarray, gate_dbfs: float) -> float:
    """Seconds of `x` that the gate counts as speech."""
    return float(np.count_nonzero(speech_frames(x, gate_dbfs))) * FRAME_SAMPLES / 16000


def has_speech(x: np.ndarray, gate_dbfs: float, min_frac: float) -> bool:
    """Whether at least `min_frac` of the frames of `x` are above the gate."""
    mask = speech_frames(x, gate_dbfs)
    if mask.size == 0:
        return False
    return float(np.count_nonzero(mask)) >= max(1.0, min_frac * mask.size)


def clipping_fraction(x: np.ndarray) -> float:
    """Fraction of samples at (or within one LSB of) full scale."""
    if x.size == 0:
        return 0.0
    return float(np.count_nonzero(np.abs(x) >= 32766.0 / 32768.0)) / x.size


class RecentFloor:
    """The stream's background level: a low percentile of its recent levels.

    Between and under the talkers of a conversation a stream holds its
    background (a room's floor, steady noise, faraway babble); the quieter
    tenth of the last `span` levels (of short blocks, session.py) is a
    running estimate of it, and speech barely over it is that background,
    not a talker. `floor` is None until `least` levels are known.
    """

    def __init__(self, span: int, least: int, percentile: float = 10.0) -> None:
        self._levels: deque[float] = deque(maxlen=max(1, span))
        self.least = least
        self.percentile = percentile
        self._floor: float | None = None  # cached until the next level

    def extend(self, levels_dbfs) -> None:
        """Count the levels of the stream's next blocks, in order."""
        self._levels.extend(float(x) for x in levels_dbfs)
        self._floor = None

    def floor(self) -> float | None:
        """The background level (dBFS) of the levels counted so far."""
        if len(self._levels) < max(1, self.least):
            return None
        if self._floor is None:
            # numpy's linear percentile; sorted() is faster on a short list
            xs = sorted(self._levels)
            pos = (len(xs) - 1) * self.percentile / 100.0
            lo = int(pos)
            hi = min(lo + 1, len(xs) - 1)
            self._floor = xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
        return self._floor
