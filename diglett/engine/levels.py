"""Sound levels, the energy-based speech gate and the stream's background
(its level, and whether its spectrum moves like talk).

Pure numpy: every function takes float32 audio in [-1, 1] at 16 kHz.
"""

from __future__ import annotations

from collections import deque
from functools import lru_cache

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


# Spectral shape of a block: its energy in 16 log-spaced bands from
# 40 Hz to 8 kHz (edges in bins of a 0.1 s block's spectrum at 16 kHz,
# 10 Hz apart), in dB, less their mean, so that the level drops out.
SHAPE_EDGES = np.geomspace(4, 800, 17).astype(int)


@lru_cache(maxsize=4)
def _hann(n: int) -> np.ndarray:
    return np.hanning(n)


def block_shapes(x: np.ndarray, block: int) -> np.ndarray:
    """The spectral shapes of the n = len(x) // block whole blocks of `x`,
    shape (n, bands): band energies in dB, less their mean (Hann window)."""
    n = x.size // block
    blocks = np.asarray(x[: n * block], np.float64).reshape(n, block)
    spec = np.abs(np.fft.rfft(blocks * _hann(block), axis=1)) ** 2
    edges = np.minimum(SHAPE_EDGES, spec.shape[1] - 1)
    bands = np.add.reduceat(spec, edges[:-1], axis=1)[:, : edges.size - 1]
    db = 10.0 * np.log10(bands + 1e-20)
    return db - db.mean(axis=1, keepdims=True)


class BackgroundMotion:
    """Whether the stream's background moves like talk or stays steady.

    Babble, a TV or a café is other people talking: its spectrum changes
    from one 0.1 s block to the next, as speech does. A fan, hiss or hum
    keeps one spectrum; only the estimate's own scatter moves it. The
    blocks at the stream's background level (within `within_db` of the
    floor, RecentFloor) tell which: the mean over bands of the spread (std,
    dB) of their spectral shapes (`block_shapes`), over the last `span`
    blocks. session.py applies its background rules only to a background
    that moves (docs/accuracy.md measures why).
    """

    def __init__(self, span: int, least: int, within_db: float) -> None:
        bands = SHAPE_EDGES.size - 1
        self._levels = np.full(max(1, span), np.nan)
        self._shapes = np.zeros((max(1, span), bands))
        self._next = 0  # ring position of the next block
        self.least = least
        self.within_db = within_db
        self._cache: tuple[float, float | None] | None = None

    def extend(self, x: np.ndarray, block: int, block_levels: np.ndarray) -> None:
        """Count the whole `block`-sample blocks of the stream's next audio
        `x` (n,), whose levels `frame_dbfs(x, block)` gave (the floor's
        too); a trailing part of a block is left out."""
        shapes = block_shapes(x, block)
        at = (self._next + np.arange(len(shapes))) % self._levels.size
        self._levels[at], self._shapes[at] = block_levels[: len(shapes)], shapes
        self._next += len(shapes)
        self._cache = None

    def spread_db(self, floor_dbfs: float | None) -> float | None:
        """The mean spread (dB) of the shapes of the blocks within
        `within_db` of `floor_dbfs`; None while the floor is unknown or
        fewer than `least` blocks are there."""
        if floor_dbfs is None:
            return None
        if self._cache is not None and self._cache[0] == floor_dbfs:
            return self._cache[1]
        near = self._levels < floor_dbfs + self.within_db  # NaN (unused): False
        spread = None
        if int(near.sum()) >= self.least:
            spread = float(np.mean(np.std(self._shapes[near], axis=0)))
        self._cache = (floor_dbfs, spread)
        return spread
