"""The ingress replica's warm pool of started, idle SessionActors.

A new session takes a pooled actor, so `ready` never waits for a Ray worker
to start (seconds when many start at once). The pool refills in the
background once a burst of new sessions has passed, keeps its actors alive,
drops the dead ones, and takes back the actors of sessions that ended
cleanly (recycling: a reset costs ~2 ms of CPU, a start ~0.75 s).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any, Callable

import ray

from actors.session_actor import (
    FIRST_CONN,
    KEEPALIVE_S,
    recycled_session_id,
    token_digest,
)
from diglett.settings import Settings
from serve_app.calls import CALL_MARGIN_S, SESSION_START_TIMEOUT_S, _await

logger = logging.getLogger("ray.serve")

POOL_QUIET_S = 2.0  # the pool refills once no session opened for this long
# Recycled actors may hold the pool at up to this many times its size (the
# keeper refills it to its size as sessions take from it, so otherwise the
# sessions' own actors would find it full when they end); an actor beyond
# its size that sat unused in it for POOL_TRIM_S ends.
RECYCLE_POOL_FACTOR = 2
POOL_TRIM_S = 120.0


def pool_excess(pooled_at: list[float], size: int, now: float) -> list[int]:
    """Which pool entries to end: those beyond `size` entries that have sat
    unused for POOL_TRIM_S, given when each entered the pool; indices, the
    pool's back (its oldest idle entries, as sessions take from the front)
    first."""
    out = []
    for i in range(len(pooled_at) - 1, -1, -1):
        if len(pooled_at) - len(out) <= size:
            break
        if now - pooled_at[i] >= POOL_TRIM_S:
            out.append(i)
    return out


async def _dead_after_warm(pool: list) -> list:
    """Touch every pooled (actor, id, token) at once; returns those that
    failed (the same tuples).

    At once, not one after another: a burst leaves a pool of 100 busy
    actors, and a sequential round could outlast their keep-alive limit."""
    answers = await asyncio.gather(
        *(actor.warm.remote() for actor, _, _ in pool), return_exceptions=True
    )
    return [e for e, a in zip(pool, answers) if isinstance(a, BaseException)]


class SessionPool:
    """Started, idle SessionActors of one ingress replica, with the tasks
    that keep them: `take` one for a new session, `release` a cleanly ended
    session's actor back into it."""

    def __init__(self, settings: Settings, spawn: Callable[[str, str], Any]) -> None:
        self.settings = settings
        self._spawn = spawn  # (session id, resume token) -> a new SessionActor
        # Started, idle SessionActors: (actor, session id, resume token).
        self.entries: list[tuple] = []
        self._task: asyncio.Task | None = None
        # Set when a session takes a pooled actor: wakes the pool's keeper,
        # which otherwise waits KEEPALIVE_S between rounds.
        self._wanted = asyncio.Event()
        self._sweep: asyncio.Task | None = None  # an early `_drop_dead`
        self._last_open = 0.0  # when a new session last opened
        self._recycling: set[asyncio.Task] = set()  # see _recycle
        self._pooled_at: dict[str, float] = {}  # session id -> when pooled

    def take(self) -> tuple | None:
        """A new session opens: the pool's front (actor, id, token), or None
        when it is empty; its refill starts once the burst has passed."""
        self._last_open = time.monotonic()
        self.fill()
        if self.entries:
            return self.entries.pop(0)
        return None

    def fill(self) -> None:
        """Start refilling the warm pool in the background (one at a time:
        starting workers in parallel on a busy node only slows them all)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._keep())
        self._wanted.set()

    async def _keep(self) -> None:
        """Keep the pool full, and its actors alive (`_keep_warm`)."""
        warm = asyncio.get_running_loop().create_task(self._keep_warm())
        try:
            while True:
                self._wanted.clear()
                failed = False
                while len(self.entries) < self.settings.session_pool:
                    # Not during a burst of new sessions: starting a worker
                    # costs ~0.5 s of CPU, which the burst's own sessions need.
                    while time.monotonic() - self._last_open < POOL_QUIET_S:
                        await asyncio.sleep(POOL_QUIET_S / 4)
                    sid, token = secrets.token_hex(16), secrets.token_urlsafe(32)
                    actor = self._spawn(sid, token)
                    try:
                        await asyncio.wait_for(
                            _await(actor.warm.remote()), SESSION_START_TIMEOUT_S
                        )
                    except Exception as exc:  # no room now: retry later
                        logger.warning("could not start a pooled session: %r", exc)
                        ray.kill(actor, no_restart=True)
                        failed = True
                        break
                    self.entries.append((actor, sid, token))
                    self._pooled_at[sid] = time.monotonic()
                if failed:
                    await asyncio.sleep(KEEPALIVE_S)
                    continue
                # Full: refill as soon as a session takes one (it used to
                # wait out this round's KEEPALIVE_S, up to 15 s, so whether
                # a refill landed on a burst's first streaming seconds was
                # chance).
                try:
                    await asyncio.wait_for(self._wanted.wait(), KEEPALIVE_S)
                except asyncio.TimeoutError:
                    pass
        finally:
            warm.cancel()

    async def _keep_warm(self) -> None:
        """Touch the pooled actors every KEEPALIVE_S, also while the pool
        fills (a pooled actor untouched for 3 x KEEPALIVE_S ends, and filling
        a pool of 100 on a busy node took longer: 46 of 100 were found dead),
        and drop the dead ones."""
        while True:
            await asyncio.sleep(KEEPALIVE_S)
            await self._drop_dead()
            self._trim()

    def _trim(self) -> None:
        """End the actors beyond the pool's size that sat unused in it for
        POOL_TRIM_S (each holds ~34 MiB)."""
        now = time.monotonic()
        at = [self._pooled_at.get(sid, now) for _, sid, _ in self.entries]
        for i in pool_excess(at, self.settings.session_pool, now):
            ray.kill(self.entries.pop(i)[0], no_restart=True)
        self._pooled_at = {
            sid: self._pooled_at[sid]
            for _, sid, _ in self.entries
            if sid in self._pooled_at
        }

    async def _drop_dead(self) -> None:
        dead = await _dead_after_warm(list(self.entries))
        # Sessions may have taken pooled actors meanwhile.
        self.entries = [e for e in self.entries if all(e is not d for d in dead)]

    def sweep(self) -> None:
        """Drop the pool's dead actors now, not at the next keep-alive: one
        was found dead, and a lost node takes several."""
        self._sweep = asyncio.get_running_loop().create_task(self._drop_dead())

    def release(self, actor, sid: str) -> None:
        """A session ended cleanly: recycle its actor into the pool, or end
        it, in the background (the caller, a WebSocket handler, is about to
        be cancelled by Serve)."""
        task = asyncio.get_running_loop().create_task(self._recycle_or_end(actor, sid))
        self._recycling.add(task)
        task.add_done_callback(self._recycling.discard)

    async def _recycle_or_end(self, actor, sid: str) -> None:
        if not await self._recycle(actor, sid):
            ray.kill(actor, no_restart=True)

    async def _recycle(self, actor, sid: str) -> bool:
        """Hand the actor of a session that ended cleanly to the warm pool,
        reset as a new session (`SessionActor.recycle`), while the pool
        holds fewer than RECYCLE_POOL_FACTOR times its size; False when it
        is that full or the actor refused or failed (the caller then ends
        it). Starting an actor costs ~0.75 s of CPU, most of it Ray's; a
        reset, ~2 ms (docs/performance.md)."""
        room = RECYCLE_POOL_FACTOR * self.settings.session_pool
        if not self.settings.session_recycle or len(self.entries) >= room:
            return False
        new_sid, token = recycled_session_id(sid), secrets.token_urlsafe(32)
        try:
            conn = await asyncio.wait_for(
                _await(actor.recycle.remote(new_sid, token_digest(token))),
                CALL_MARGIN_S,
            )
        except Exception as exc:
            logger.warning("session %s: could not recycle its actor: %r", sid, exc)
            return False
        if conn != FIRST_CONN or len(self.entries) >= room:
            return False
        # First out: the next session gets the actor whose pages were just
        # in use; the pool's oldest idle ones are at the end, to be trimmed.
        self.entries.insert(0, (actor, new_sid, token))
        self._pooled_at[new_sid] = time.monotonic()
        return True

    def close(self) -> None:
        """End the idle actors (the replica is stopping)."""
        for actor, _, _ in self.entries:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
