"""Cutting a 16 kHz stream into hops, each with the analysis window behind it.

Every hop of `hop` samples is emitted exactly once, in order, together with
the last `window` samples that end where the hop ends (fewer at the start of
a stream). Labels therefore tile the stream with no gap and no overlap. A
hop is ready as soon as its last sample has arrived, or, with `ahead`
samples of look-ahead, once those have too; it then also carries the window
that ends `ahead` samples after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Hop:
    """One hop of the stream.

    `seq` counts hops from 0; `start`/`end` are sample indices on the 16 kHz
    timeline; `hop_audio` has shape (end - start,) and `window` shape
    (min(window, end),), ending at `end`. With look-ahead, `ahead_window`
    is the window ending at `ahead_end` (`ahead` samples after `end`, or
    the stream's end if sooner); else None and `ahead_end` == `end`.
    """

    seq: int
    start: int
    end: int
    hop_audio: np.ndarray
    window: np.ndarray
    ahead_window: np.ndarray | None
    ahead_end: int


class HopWindower:
    """Accumulates samples and yields complete hops (and a final partial one)."""

    def __init__(self, hop: int, window: int, ahead: int = 0) -> None:
        if hop <= 0 or window < hop or not 0 <= ahead <= hop:
            raise ValueError("need 0 < hop <= window and 0 <= ahead <= hop")
        self.hop = hop
        self.window = window
        self.ahead = ahead
        self._buf = np.zeros(0, dtype=np.float32)  # last window + pending samples
        self._total = 0  # samples received so far
        self._emitted = 0  # samples covered by hops so far
        self._seq = 0

    @property
    def pending(self) -> int:
        """Samples received but not yet part of an emitted hop."""
        return self._total - self._emitted

    def push(self, x: np.ndarray) -> list[Hop]:
        """Add samples of shape (n,); return the hops they complete."""
        self._total += x.size
        self._buf = np.concatenate([self._buf, x.astype(np.float32, copy=False)])
        hops = []
        while self._total - self._emitted >= self.hop + self.ahead:
            hops.append(self._take(self.hop))
        self._trim()
        return hops

    @property
    def missing(self) -> int:
        """Samples still to come before the next hop is ready."""
        return max(0, self.hop + self.ahead - self.pending)

    def drain(self) -> list[Hop]:
        """Emit the whole hops still waiting for look-ahead, with what there
        is of it (the stream ends); `flush` then emits the rest."""
        hops = []
        while self.pending >= self.hop:
            hops.append(self._take(self.hop))
        self._trim()
        return hops

    def flush(self) -> Hop | None:
        """Emit the remaining samples as a final, shorter hop (None if none);
        with look-ahead, after `drain`."""
        rest = self.pending
        if rest <= 0:
            return None
        hop = self._take(min(rest, self.hop))
        self._trim()
        return hop

    def _take(self, n: int) -> Hop:
        # _buf ends at sample index _total; locate the hop inside it.
        buf_start = self._total - self._buf.size
        start, end = self._emitted, self._emitted + n
        w_start = max(0, end - self.window)
        window = self._buf[w_start - buf_start : end - buf_start].copy()
        hop_audio = self._buf[start - buf_start : end - buf_start].copy()
        ahead_window, ahead_end = None, end
        if self.ahead:
            ahead_end = min(end + self.ahead, self._total)
            a_start = max(0, ahead_end - self.window)
            ahead_window = self._buf[a_start - buf_start : ahead_end - buf_start].copy()
        hop = Hop(self._seq, start, end, hop_audio, window, ahead_window, ahead_end)
        self._emitted = end
        self._seq += 1
        return hop

    def _trim(self) -> None:
        """Keep only what a future window can still need.

        The final hop may be shorter than `hop`, so its window can reach back
        to `window` samples before the last emitted hop's end.
        """
        keep_from = max(0, self._emitted - self.window)
        buf_start = self._total - self._buf.size
        if keep_from > buf_start:
            self._buf = self._buf[keep_from - buf_start :]
