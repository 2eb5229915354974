"""A WebSocket session's stream pump: frames from the socket to its
SessionActor, and the actor's answers back.

Frames that queue up while the actor is busy are sent together in one actor
call, so under load the per-call cost is spread over many frames; a backlog
past `BACKLOG_BYTES` ends the session with `overloaded`. Audio frames are
held back until the session can answer something new (diglett/engine/holdback.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Protocol

import ray
from fastapi import WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from actors.session_actor import EMBED_TIMEOUT_S, ENROLL_TIMEOUT_S, KEEPALIVE_S
from diglett.engine.holdback import HoldRule, StreamPace, can_hold, send_by
from diglett.engine.protocol import CLOSE_CODES, error
from diglett.settings import Settings
from serve_app import metrics
from serve_app.calls import CALL_MARGIN_S, _await

if TYPE_CHECKING:
    from serve_app.pool import SessionPool

logger = logging.getLogger("ray.serve")

# Unprocessed input per connection before `overloaded`: about 4 min of
# 16 kHz s16 audio, 22 s of 96 kHz f32.
BACKLOG_BYTES = 8 * 2**20
BATCH_FRAMES = 64  # most frames sent to the SessionActor in one call


def _call_timeout(frames: list) -> float:
    """How long one `SessionActor.handle` call may take before the actor is
    given up for lost: its embedding wait (`EMBED_TIMEOUT_S`, or
    `ENROLL_TIMEOUT_S` when the call ends an enrollment) plus a margin.

    Without it a session whose node vanished waits for Ray to declare the
    node dead, which took over 60 s on a loaded 2-core machine.
    """
    enrolling = any(is_text and "enroll_end" in p for is_text, p, _ in frames)
    return (ENROLL_TIMEOUT_S if enrolling else EMBED_TIMEOUT_S) + CALL_MARGIN_S


class _Inbox:
    """Frames received but not yet answered, bounded in bytes.

    Serve's replica pulls every WebSocket message from the proxy into an
    unbounded queue of its own, so awaiting a full queue here would give the
    client no back-pressure: a stream sent faster than the session can label
    it would only grow the ingress's memory and the labels' lag. Instead the
    backlog is counted and, past `BACKLOG_BYTES`, the session is ended with
    `overloaded` (try again later).

    A frame counts from its arrival until the SessionActor call that carries
    it returns (`answered`), not only while it is queued: otherwise a stream
    that the pump splits into calls of just under the bound each would never
    pass it, however far behind real time it fell.
    """

    def __init__(self, limit: int) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.limit = limit
        self.bytes = 0
        self.overflowed = asyncio.Event()

    @property
    def overflow(self) -> bool:
        return self.overflowed.is_set()

    def put(self, item) -> None:
        if isinstance(item, tuple):
            self.bytes += len(item[1])
            if self.bytes > self.limit:
                self.overflowed.set()
        self.queue.put_nowait(item)

    def answered(self, frames: list) -> None:
        """`frames` (taken from `queue`) have been processed."""
        self.bytes -= sum(len(f[1]) for f in frames)


async def _read_frames(ws: WebSocket, inbox: _Inbox) -> None:
    """Move frames from the socket into `inbox`; None marks the end."""
    try:
        while not inbox.overflow:
            m = await ws.receive()
            if m["type"] == "websocket.disconnect":
                break
            t = time.monotonic()
            if m.get("text") is not None:
                inbox.put((True, m["text"], t))
            elif m.get("bytes") is not None:
                inbox.put((False, m["bytes"], t))
    except asyncio.CancelledError:
        raise
    except Exception:
        pass  # a broken socket ends the stream like a disconnect
    inbox.put(None)


class _ActorLost:
    """Put in the inbox by the keep-alive when the SessionActor is gone."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc


_DUE = object()  # in place of a frame: the held frames' time is up


async def _keepalive(actor, conn: int, inbox: "_Inbox") -> None:
    """Touch the session now and then; a session that died while its client
    sends nothing (a pause, a listener) is reported at once, not at the
    next frame."""
    while True:
        await asyncio.sleep(KEEPALIVE_S)
        try:
            await actor.touch.remote(conn)
        except ray.exceptions.RayActorError as exc:
            inbox.put(_ActorLost(exc))
            return
        except Exception:
            return


async def _answer(ref, inbox: _Inbox, timeout: float):
    """The SessionActor call's result, or None should the connection's
    backlog pass its bound first: a long call (a backlog of up to
    `BATCH_FRAMES` frames to embed) must not delay `overloaded` while the
    client keeps sending. Raises asyncio.TimeoutError after `timeout` s."""
    call = asyncio.ensure_future(_await(ref))
    over = asyncio.ensure_future(inbox.overflowed.wait())
    try:
        done, _ = await asyncio.wait(
            {call, over}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        over.cancel()
        if not call.done():
            call.cancel()  # the Ray task itself ends with the session's actor
    if call in done:
        return call.result()
    if over in done:
        return None
    raise asyncio.TimeoutError


async def _handle(actor, conn: int, frames: list, inbox: _Inbox):
    """`SessionActor.handle` on `frames`, through `_answer`."""
    return await _answer(
        actor.handle.remote(conn, frames), inbox, _call_timeout(frames)
    )


async def _overloaded(ws: WebSocket) -> None:
    await _fatal(
        ws,
        "overloaded",
        f"more than {BACKLOG_BYTES >> 20} MiB of this stream wait "
        "to be processed: send audio in real time, or try later",
    )


async def _fatal(ws: WebSocket, code: str, message: str) -> None:
    """Send a fatal error and close with its code."""
    metrics.error(code)
    try:
        await ws.send_text(json.dumps(error(code, message)))
    except Exception:
        pass
    await _close(ws, CLOSE_CODES[code])


async def _close(ws: WebSocket, code: int) -> None:
    if ws.application_state != WebSocketState.DISCONNECTED:
        try:
            await ws.close(code=code)
        except Exception:
            pass


class PumpOwner(Protocol):
    """What the pump needs of the ingress replica (a stand-in in tests): its
    settings, where detached sessions are noted, the warm pool that takes
    back a cleanly ended session's actor, and recovery from a dead actor."""

    settings: Settings
    _detached: dict[str, float]
    pool: SessionPool

    async def _session_failed(
        self,
        ws: WebSocket,
        sid: str,
        token: str,
        enrolled: dict,
        exc: Exception,
        dead: bool = False,
    ) -> None: ...

    async def _replace_unused(self, sid: str, token: str): ...


async def pump(
    owner: PumpOwner,
    ws: WebSocket,
    actor,
    conn: int,
    sid: str,
    token: str,
    resumed: bool,
) -> None:
    """Run one connection's session until the client ends or drops it, or it
    fails: then end, recycle or detach its actor (a dropped session stays
    resumable until its TTL)."""
    inbox = _Inbox(BACKLOG_BYTES)
    queue = inbox.queue
    reader = asyncio.create_task(_read_frames(ws, inbox))
    keepalive = asyncio.create_task(_keepalive(actor, conn, inbox))
    ended = False
    clean = False  # ended by the client's `end`: the actor may be recycled
    idle_s = (
        owner.settings.idle_timeout_s if owner.settings.idle_timeout_s > 0 else None
    )
    # A copy of the enrollments (embeddings only), to restore the session
    # should its actor's process die.
    enrolled: dict = {}
    # A new session whose actor has answered nothing yet (a pooled actor
    # may have died since the pool's last keep-alive).
    fresh = not resumed
    # Audio frames held back until the session can answer something new
    # (diglett/engine/holdback.py): one actor call per hop, not one per frame.
    held: list = []
    rule = HoldRule()
    # A stream well ahead of real time is answered once per hop of wall
    # time, with every frame that came meanwhile (diglett/engine/holdback.py).
    pace = StreamPace()
    due: float | None = None  # when `held` must go, if held for pace
    try:
        try:
            if resumed:  # a new session has none yet: no call to ask
                enrolled = await actor.enrollments.remote()
        except Exception as exc:
            await owner._session_failed(ws, sid, token, enrolled, exc)
            return
        eof = False
        while not eof:
            wait, for_due = idle_s, False
            if due is not None:
                left = max(0.0, due - time.monotonic())
                if idle_s is None or left < idle_s:
                    wait, for_due = left, True
            try:
                item = await asyncio.wait_for(queue.get(), wait)
            except asyncio.TimeoutError:
                # (asyncio may wake a little before `due`)
                if not for_due:
                    ended = True
                    await _fatal(
                        ws,
                        "session_expired",
                        f"no frame for {idle_s:g} s (idle timeout); "
                        "the session ended",
                    )
                    return
                item = _DUE
            if inbox.overflow:
                ended = True
                await _overloaded(ws)
                return
            if isinstance(item, _ActorLost):
                await owner._session_failed(ws, sid, token, enrolled, item.exc)
                return
            new: list = []
            if item is None:
                eof = True
            elif item is not _DUE:
                new.append(item)
            while len(held) + len(new) < BATCH_FRAMES and not eof and not queue.empty():
                nxt = queue.get_nowait()
                if nxt is None:
                    eof = True
                elif not isinstance(nxt, _ActorLost):  # its frames fail anyway
                    new.append(nxt)
            pace.add(new, rule.fmt)
            prior, held = held, []
            frames = prior + new
            if not frames:
                break
            if not eof and len(frames) < BATCH_FRAMES and item is not _DUE:
                # Held for pace (`due` set), the hop is already complete:
                # only the new frames need a look, in `send_by`.
                if due is None and can_hold(prior, new, rule):
                    held = frames
                    continue
                due = send_by(prior, new, rule, pace)
                if due is not None and time.monotonic() < due:
                    held = frames
                    continue
            due = None
            try:
                try:
                    answer = await _handle(actor, conn, frames, inbox)
                except ray.exceptions.RayActorError:
                    # Nothing but `ready` was sent yet: start it afresh.
                    replaced = (
                        await owner._replace_unused(sid, token) if fresh else None
                    )
                    if replaced is None:
                        raise
                    actor, conn = replaced
                    keepalive.cancel()
                    keepalive = asyncio.create_task(_keepalive(actor, conn, inbox))
                    answer = await _handle(actor, conn, frames, inbox)
                fresh = False
                if answer is None:
                    ended = True
                    await _overloaded(ws)
                    return
                messages, close, rule = answer
                inbox.answered(frames)
                if any(m.get("type") == "enrolled" for m in messages):
                    enrolled = await actor.enrollments.remote()
            except asyncio.TimeoutError as exc:
                # Its node is unreachable (Ray has not declared it dead
                # yet), or it hangs: replace it rather than wait.
                ray.kill(actor, no_restart=True)
                await owner._session_failed(ws, sid, token, enrolled, exc, True)
                return
            except Exception as exc:
                await owner._session_failed(ws, sid, token, enrolled, exc)
                return
            for msg in messages:
                recv_t = msg.pop("_recv_t", None)
                if recv_t is not None:
                    msg["latency_ms"] = round((time.monotonic() - recv_t) * 1e3, 1)
                metrics.message_sent(msg)
                await ws.send_text(json.dumps(msg))
            if close is not None:
                ended = clean = close == 1000
                await _close(ws, close)
                return
    except (WebSocketDisconnect, RuntimeError, ConnectionError):
        pass  # the client went away mid-send
    except Exception as exc:  # never leave a client without a close frame
        logger.exception("session %s: unexpected error", sid)
        await _fatal(ws, "internal", f"internal error: {type(exc).__name__}")
    finally:
        reader.cancel()
        keepalive.cancel()
        if ended:
            logger.info("session %s ended", sid, extra={"session_id": sid})
            if clean:  # not awaited here: Serve cancels this handler
                owner.pool.release(actor, sid)
            else:
                ray.kill(actor, no_restart=True)
        else:
            owner._detached[sid] = time.monotonic() + owner.settings.session_ttl_s
            try:
                await actor.detach.remote(conn)
            except Exception:
                pass
            logger.info("session %s detached", sid, extra={"session_id": sid})
