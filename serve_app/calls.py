"""Waiting on SessionActor calls: the time limits that the ingress's parts
(the pump, the warm pool, recovery) share, and an ObjectRef as a coroutine.

Every call the ingress makes to a SessionActor is bounded in time: a node
that vanished would otherwise hold the caller until Ray declares it dead.
"""

from __future__ import annotations

CALL_MARGIN_S = 12.0  # a SessionActor call's own work, beyond its embedding wait
SESSION_START_TIMEOUT_S = 30.0  # a SessionActor no node can place is `overloaded`


async def _await(ref):
    """An ObjectRef as a coroutine, for asyncio.wait_for."""
    return await ref
