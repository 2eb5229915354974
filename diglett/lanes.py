"""Two lanes for a node's embedding work: live windows before enrollments.

A session's stream hops need their labels within half a second; an
enrollment's windows (8 sub-windows for each 5 s clip) only need to be done
before that session streams. In one first-come queue, a burst of
enrollments (sessions starting together) delays every live label behind
it: on a 2-core CPU node 16 sessions enrolling two speakers each queue 256
windows, ~7 s of model time. So enrollment ("bulk") work goes out only
`bulk_windows` at a time, and live work is never queued behind more than
that. Bulk still always progresses: one bulk request can be out whatever
the live load.

Pure bookkeeping (no Ray, no asyncio): `actors/embed_batcher.py` pushes
callers' windows and sends what `next_request` hands out.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

# Enrollment windows out at once per node when Settings.enroll_in_flight is
# 0 (auto): on a CPU replica 8 windows are ~0.2 s of one core's model time,
# the most a live window then waits behind; a GPU takes a whole batch in a
# few ms (serve_app/embedding.py, GPU_BATCH_SIZE).
AUTO_BULK_CPU = 8
AUTO_BULK_GPU = 512


def bulk_windows(setting: int, cluster_gpus: float) -> int:
    """Settings.enroll_in_flight as windows: 0 auto, -1 no bulk lane (0)."""
    if setting < 0:
        return 0
    if setting == 0:
        return AUTO_BULK_GPU if cluster_gpus > 0 else AUTO_BULK_CPU
    return setting


@dataclass
class Request:
    """Items to send together; `n` windows in all."""

    items: list[Any]
    n: int
    live: bool


@dataclass
class Lanes:
    """`max_in_flight` requests out at once, each of at most `max_windows`
    windows (a single bigger item goes alone); of those, bulk requests hold
    at most `bulk_windows` windows in all (0: no bulk lane, everything goes
    first come, first served)."""

    max_in_flight: int
    max_windows: int
    bulk_windows: int
    _live: deque = field(default_factory=deque)
    _bulk: deque = field(default_factory=deque)
    in_flight: int = 0
    bulk_out: int = 0

    def push(self, item: Any, n: int, live: bool) -> None:
        """Queue `item` of `n` windows (bulk items: at most `bulk_windows`,
        see `bulk_chunks`)."""
        lane = self._live if live or not self.bulk_windows else self._bulk
        lane.append((item, n))

    def bulk_chunks(self, n: int) -> list[slice]:
        """How to cut a bulk caller's `n` >= 1 windows into items the bulk
        lane takes (one slice when there is no bulk lane): halves of it, so
        that one request is computed while the next travels and the model
        does not wait on a round trip between enrollment requests."""
        step = max(1, self.bulk_windows // 2) if self.bulk_windows else n
        return [slice(i, min(i + step, n)) for i in range(0, n, step)]

    def next_request(self) -> Request | None:
        """The next request to send, marked out; None while nothing may go.
        Live items first; bulk ones when no live item waits, or when the
        bulk lane has nothing out (so a live flood cannot starve it)."""
        if self.in_flight >= self.max_in_flight:
            return None
        if self._bulk and (not self._live or self.bulk_out == 0):
            req = self._take(self._bulk, self.bulk_windows - self.bulk_out, False)
            if req is not None:
                return req
        if self._live:
            return self._take(self._live, self.max_windows, True)
        return None

    def done(self, req: Request) -> None:
        """`req` came back (answered or failed)."""
        self.in_flight -= 1
        if not req.live:
            self.bulk_out -= req.n

    def pending(self) -> bool:
        return bool(self._live or self._bulk)

    def _take(self, lane: deque, room: int, live: bool) -> Request | None:
        """Items from the front of `lane` while they fit in `room` windows
        (the first always fits a live request, and a bulk one with nothing
        out); None when even the first does not fit."""
        items, n = [], 0
        alone = live or self.bulk_out == 0  # may the first go, however big
        while lane and (n + lane[0][1] <= room or (not items and alone)):
            item, k = lane.popleft()
            items.append(item)
            n += k
        if not items:
            return None
        self.in_flight += 1
        if not live:
            self.bulk_out += n
        return Request(items, n, live)
