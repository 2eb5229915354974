"""Cutting a 16 kHz stream into hops, each with the analysis window behind it.

Every hop of `hop` samples is emitted exactly once, in order, together with
the last `window` samples that end where the hop ends (fewer at the start of
a stream). Labels therefore tile the stream with no gap and no overlap, and a
hop is ready as soon as its last sample has arrived: no look-ahead latency.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Hop:
    """One hop of the stream.

    `seq` counts hops from 0; `start`/`end` are sample indices on the 16 kHz
    timeline; `hop_audio` has shape (end - start,) and `window` shape
    (min(window, end),), ending at `end`.
    """

    seq: int
    start: int
    end: int
    hop_audio: np.ndarray
    window: np.ndarray


class HopWindower:
    """Accumulates samples and yields complete hops (and a final partial one)."""

    def __init__(self, hop: int, window: int) -> None:
        if hop <= 0 or window < hop:
            raise ValueError("need 0 < hop <= window")
        self.hop = hop
        self.window = window
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
        while self._total - self._emitted >= self.hop:
            hops.append(self._take(self.hop))
        self._trim()
        return hops

    def flush(self) -> Hop | None:
        """Emit the remaining samples as a final, shorter hop (None if none)."""
        rest = self.pending
        if rest <= 0:
            return None
        hop = self._take(rest)
        self._trim()
        return hop

    def _take(self, n: int) -> Hop:
        # _buf ends at sample index _total; locate the hop inside it.
        buf_start = self._total - self._buf.size
        start, end = self._emitted, self._emitted + n
        w_start = max(0, end - self.window)
        window = self._buf[w_start - buf_start : end - buf_start].copy()
        hop_audio = self._buf[start - buf_start : end - buf_start].copy()
        hop = Hop(self._seq, start, end, hop_audio, window)
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
