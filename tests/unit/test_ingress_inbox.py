"""The ingress's per-connection inbox: a byte-bounded backlog (no Ray)."""

from __future__ import annotations

import asyncio
import time

import pytest
import uvloop

from serve_app.pump import _answer, _Inbox, _read_frames


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
    inbox.answered([item for item in items if item is not None])
    assert inbox.bytes == 0


def test_reading_stops_once_the_backlog_passes_the_bound():
    ws = FakeSocket(n=1000, size=1000)
    inbox = _Inbox(limit=10_000)
    asyncio.run(_read_frames(ws, inbox))
    assert inbox.overflow
    assert ws.reads == 11  # the 11th frame crossed 10,000 bytes
    assert inbox.queue.qsize() == 12  # 11 frames and the end marker


def test_frames_count_until_answered():
    """Taking frames off the queue frees nothing: they wait on the session
    until the call that carries them returns."""
    inbox = _Inbox(limit=2500)
    for _ in range(2):
        inbox.put((False, b"\0" * 1000, 0.0))
    first = [inbox.queue.get_nowait()]
    inbox.put((True, "x" * 400, 0.0))
    assert inbox.bytes == 2400 and not inbox.overflow
    inbox.answered(first)
    inbox.put((False, b"\0" * 1000, 0.0))
    assert not inbox.overflow and inbox.bytes == 2400
    inbox.put((False, b"\0" * 101, 0.0))
    assert inbox.overflow


def test_a_call_gives_way_to_the_overflow():
    """A call still running when the backlog passes the bound is given up at
    once (None), not awaited."""

    async def go():
        inbox = _Inbox(limit=100)
        never = asyncio.get_running_loop().create_future()
        answer = asyncio.ensure_future(_answer(never, inbox, timeout=60))
        await asyncio.sleep(0.01)
        assert not answer.done()
        inbox.put((False, b"\0" * 101, 0.0))
        return await asyncio.wait_for(answer, 5), never

    result, never = asyncio.run(go())
    assert result is None and never.cancelled()


def test_a_call_that_returns_first_gives_its_result():
    async def go():
        inbox = _Inbox(limit=100)
        done = asyncio.get_running_loop().create_future()
        done.set_result(("messages", None, "rule"))
        return await _answer(done, inbox, timeout=60)

    assert asyncio.run(go()) == ("messages", None, "rule")


def test_a_call_past_its_timeout_raises():
    async def go():
        never = asyncio.get_running_loop().create_future()
        await _answer(never, _Inbox(limit=100), timeout=0.05)

    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(go())


def test_the_pool_is_warmed_at_once_and_loses_its_dead():
    """All pooled actors are touched concurrently; those that fail are named."""
    from serve_app.pool import _dead_after_warm

    active = {"now": 0, "most": 0}

    class Actor:
        def __init__(self, alive: bool) -> None:
            self.alive, self.calls = alive, 0
            self.warm = self

        async def _answer(self) -> None:
            active["now"] += 1
            active["most"] = max(active["most"], active["now"])
            await asyncio.sleep(0.01)
            active["now"] -= 1
            self.calls += 1
            if not self.alive:
                raise RuntimeError("actor died")

        def remote(self):
            return self._answer()

    pool = [(Actor(k != 1), f"s{k}", "t") for k in range(3)]
    dead = asyncio.run(_dead_after_warm(pool))
    assert active["most"] == 3  # all at once, not one after another
    assert dead == [pool[1]]
    assert all(a.calls == 1 for a, _, _ in pool)


# ----------------------------------------------------- the pump's hold-back
class _PacedSocket:
    """Binary frames of `frame_s` of 16 kHz s16 audio, one every `gap_s`,
    then a disconnect; `sent` collects what the pump sends back."""

    def __init__(self, n: int, frame_s: float, gap_s: float) -> None:
        self.left, self.gap = n, gap_s
        self.frame = b"\0" * (int(frame_s * 16000) * 2)
        self.sent: list[str] = []
        self.client_state = self.application_state = None

    async def receive(self) -> dict:
        if self.left == 0:
            await asyncio.sleep(0.05)
            return {"type": "websocket.disconnect", "code": 1000}
        await asyncio.sleep(self.gap)
        self.left -= 1
        return {"type": "websocket.receive", "bytes": self.frame}

    async def send_text(self, text: str) -> None:
        self.sent.append(text)


class _StreamingActor:
    """A SessionActor stand-in that is always streaming 16 kHz s16: it asks
    for the rest of the next 0.5 s hop, answers at once, and records each
    call's frames with the time the call was made."""

    HOP_BYTES = 8000 * 2

    def __init__(self) -> None:
        self.calls: list[tuple[float, list]] = []
        self.bytes = 0
        self.handle, self.detach, self.touch = self, self._Noop(), self._Noop()

    class _Noop:
        def remote(self, *args):
            async def nothing():
                return True

            return nothing()

    def remote(self, conn, frames):
        from diglett.engine.holdback import HoldRule

        self.calls.append((time.monotonic(), frames))
        self.bytes += sum(len(f[1]) for f in frames)
        wanted = self.HOP_BYTES - self.bytes % self.HOP_BYTES

        async def answer():
            return [], None, HoldRule(wanted=wanted)

        return answer()


def _pump(ws, actor) -> None:
    from types import SimpleNamespace

    from diglett.settings import Settings
    from serve_app.ingress import Ingress

    async def failed(*args, **kwargs):
        raise AssertionError(f"the session failed: {args}")

    owner = SimpleNamespace(
        settings=Settings(),
        _session_failed=failed,
        _replace_unused=failed,
        _detached={},
    )
    pump = Ingress.func_or_class._pump
    # On the loop Serve's replicas run (its timers may wake ~1 ms early).
    uvloop.run(pump(owner, ws, actor, 1, "sid", "token", False))


def test_a_fast_stream_is_sent_once_per_hop_of_wall_time(monkeypatch):
    """1 s frames at 50x real time: once the pace shows a fast stream, the
    frames of each 0.5 s of wall time go in one call, not one call each.
    Timers that wake a little early (uvloop's, under load) must not pass
    for the idle timeout."""
    wait_for = asyncio.wait_for

    async def early(aw, timeout):
        return await wait_for(aw, None if timeout is None else timeout * 0.9)

    monkeypatch.setattr(asyncio, "wait_for", early)
    ws, actor = _PacedSocket(n=60, frame_s=1.0, gap_s=0.02), _StreamingActor()
    _pump(ws, actor)
    sizes = [len(frames) for _, frames in actor.calls]
    assert sum(sizes) == 60 and ws.sent == []  # no error
    assert len(sizes) <= 10, sizes  # one call per frame without the hold
    assert max(sizes) >= 15, sizes


def test_a_real_time_stream_is_sent_as_each_hop_completes():
    """20 ms frames in real time: one call per 0.5 s hop, made as soon as the
    hop's last frame arrives (no added wait)."""
    ws, actor = _PacedSocket(n=100, frame_s=0.02, gap_s=0.02), _StreamingActor()
    _pump(ws, actor)
    sizes = [len(frames) for _, frames in actor.calls]
    # The first frame goes alone: the session's needs are known from its
    # first answer on.
    assert sizes == [1, 24, 25, 25, 25] and ws.sent == [], sizes
    for called, frames in actor.calls:
        assert called - frames[-1][2] < 0.1
