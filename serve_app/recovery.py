"""Recovery after a SessionActor dies: re-create the session under its id
(with its enrollments, from the ingress's copy), so that the client's
resume finds it again, or, before the session's first call, so that the
client never notices.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

import ray
from fastapi import WebSocket

from serve_app.calls import SESSION_START_TIMEOUT_S, _await
from serve_app.pool import SessionPool
from serve_app.pump import _fatal

logger = logging.getLogger("ray.serve")

RESTORE_S = 8.0  # longest wait to re-create a dead session before `internal`

Spawn = Callable[[str, str], Any]  # (session id, resume token) -> SessionActor


async def restore(spawn: Spawn, sid: str, token: str, enrollments: dict):
    """Re-create a session whose actor died, with its enrollments, detached.

    The client got `internal`; its resume then finds the session again.
    Returns the new actor, or None.
    """
    # The dead actor's name is freed asynchronously, and the new actor
    # may find no room (e.g. every `diglett_session` slot taken): bounded
    # in time, so the client always gets its `internal` promptly.
    deadline = time.monotonic() + RESTORE_S
    last: Exception | None = None
    while time.monotonic() < deadline:
        actor = None
        try:
            actor = spawn(sid, token)
            await asyncio.wait_for(
                _await(actor.restore.remote(enrollments)),
                max(0.1, deadline - time.monotonic()),
            )
            logger.info("session %s restored after its actor died", sid)
            return actor
        except Exception as exc:
            last = exc
            if isinstance(exc, asyncio.TimeoutError) and actor is not None:
                ray.kill(actor, no_restart=True)
            await asyncio.sleep(0.25)
    logger.error("session %s could not be restored: %r", sid, last)
    return None


async def replace_unused(pool: SessionPool, spawn: Spawn, sid: str, token: str):
    """A new session's pooled actor died (after the pool's last
    keep-alive) before the session's first call: the same session,
    re-created and attached, so that the client never notices; and the
    pool's other dead actors dropped now (a lost node takes several).
    Returns (actor, conn), or None."""
    pool.sweep()
    actor = await restore(spawn, sid, token, {})
    if actor is None:
        return None
    try:
        conn = await asyncio.wait_for(
            _await(actor.attach.remote()), SESSION_START_TIMEOUT_S
        )
    except Exception:
        return None
    return actor, conn


async def session_failed(
    ws: WebSocket,
    spawn: Spawn,
    sid: str,
    token: str,
    enrolled: dict,
    exc: Exception,
    dead: bool = False,
) -> None:
    """The SessionActor failed: restore it if it died, tell the client."""
    logger.error("session %s: actor failed: %r", sid, exc, extra={"session_id": sid})
    if dead or isinstance(exc, ray.exceptions.RayActorError):
        await restore(spawn, sid, token, enrolled)
    await _fatal(
        ws,
        "internal",
        "the session failed unexpectedly; " "reconnect with resume_token to continue",
    )
