"""The ingress's per-connection inbox: a byte-bounded backlog (no Ray)."""

from __future__ import annotations

import asyncio

from serve_app.ingress import _Inbox, _read_frames


class FakeSocket:
    """Yields `n` binary frames of `size` bytes, then a disconnect."""

    def __init__(self, n: int, size: int) -> None:
        self.left, self.size, self.reads = n, size, 0

    async def receive(self) -> dict:
        self.reads += 1
        if self.left == 0:
            return {"type": "websocket.disconnect", "code": 1000}
        self.left -= 1
        return {"type": "websocket.receive", "bytes": b"\0" * self.size}


def test_backlog_within_the_bound_is_kept_in_order():
    inbox = _Inbox(limit=10_000)
    asyncio.run(_read_frames(FakeSocket(n=9, size=1000), inbox))
    items = [inbox.queue.get_nowait() for _ in range(inbox.queue.qsize())]
    assert not inbox.overflow
    assert items[-1] is None and len(items) == 10
    for item in items:
        inbox.taken(item)
    assert inbox.bytes == 0


def test_reading_stops_once_the_backlog_passes_the_bound():
    ws = FakeSocket(n=1000, size=1000)
    inbox = _Inbox(limit=10_000)
    asyncio.run(_read_frames(ws, inbox))
    assert inbox.overflow
    assert ws.reads == 11  # the 11th frame crossed 10,000 bytes
    assert inbox.queue.qsize() == 12  # 11 frames and the end marker


def test_frames_taken_free_room():
    inbox = _Inbox(limit=2500)
    for _ in range(2):
        inbox.put((False, b"\0" * 1000, 0.0))
    inbox.taken(inbox.queue.get_nowait())
    inbox.put((True, "x" * 1000, 0.0))
    assert not inbox.overflow and inbox.bytes == 2000
    inbox.put((False, b"\0" * 600, 0.0))
    assert inbox.overflow
