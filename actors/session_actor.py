"""SessionActor: one Ray actor per session, holding its enrollments and audio.

It wraps the pure `SessionEngine`: frames in, messages out, with the
embedding jobs of each call sent, through its node's `EmbedBatcher`, to the
shared EmbeddingDeployment. It imports neither torch nor Ray Serve, so it
stays small (see docs/performance.md for its USS).

The actor is named and detached so that a dropped connection can resume it
from any ingress replica; it ends itself when a detached session outlives the
TTL, or when its ingress stops calling. A session that ends cleanly (`end`)
may hand its actor, reset, to the ingress's warm pool for a later session
(`recycle`): starting an actor costs ~0.75 s of CPU, a reset ~2 ms.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import logging
import os
import sys
import time

import ray

from actors.embed_batcher import TASK_EVENTS, node_batcher
from diglett import logging_setup
from diglett.engine.audio import to_int16
from diglett.engine.holdback import HoldRule
from diglett.priority import lower_cpu_priority, thread_niceness
from diglett.engine.protocol import CLOSE_CODES, error
from diglett.engine.session import Close, EnrollJob, EnrollWindowJob, SessionEngine
from diglett.settings import Settings
from serve_app import metrics

logger = logging.getLogger("diglett.engine.session")

NAMESPACE = "diglett"
KEEPALIVE_S = 15.0  # the ingress touches an attached session this often
FIRST_CONN = 1  # the generation of a session's first connection
EMBED_ATTEMPTS = 2
# An embedding call that takes longer is abandoned (a replica that died is
# being replaced, which takes its model load): the client gets `internal`
# instead of a silent wait, and resumes.
EMBED_TIMEOUT_S = 8.0
ENROLL_TIMEOUT_S = 60.0  # whole enrollments queue behind each other in bursts


async def _result(response):
    return await response


def actor_name(session_id: str) -> str:
    """The name of the SessionActor that holds `session_id`.

    A recycled actor keeps the name of its first session, `session-<key>`;
    the sessions it holds later are `<key>.1`, `<key>.2`, ...
    """
    return f"session-{session_id.partition('.')[0]}"


def recycled_session_id(session_id: str) -> str:
    """The id of the session that follows `session_id` on the same actor."""
    key, _, generation = session_id.partition(".")
    return f"{key}.{int(generation or 0) + 1}"


Frame = tuple[bool, "str | bytes", float]  # (is_text, payload, receive time)


def token_digest(resume_token: str) -> str:
    """What a SessionActor keeps of its resume token: its SHA-256, hex.

    An actor's constructor arguments are part of its spec, which the GCS
    keeps (and, with GCS fault tolerance, writes to Redis); a digest there
    lets no one who reads it resume the session.
    """
    return hashlib.sha256(resume_token.encode()).hexdigest()


def report_fork_fallback(settings: Settings, environ) -> str:
    """With DIGLETT_SESSION_FORK on: why this worker was not forked ("" if
    it was), logged as a warning and counted (`diglett_fallbacks_total`,
    mechanism=session_fork), so a fork server that stops forking, e.g.
    after a Ray upgrade, shows in the log and the metrics."""
    if not settings.session_fork or sys.platform != "linux":
        return ""
    from actors.fork_shim import fallback_reason

    reason = fallback_reason(environ)
    if reason:
        logger.warning("SessionActor not forked (Ray's own worker): %s", reason)
        metrics.fallback("session_fork")
    return reason


def session_actor_args(
    settings: Settings, embedding: tuple[str, str], session_id: str, resume_token: str
) -> tuple:
    """SessionActor's constructor arguments, without secrets: the API token
    blanked (an actor never checks it) and the resume token as its digest,
    since the GCS keeps every actor's spec."""
    return (
        dataclasses.replace(settings, api_token=""),
        embedding,
        session_id,
        token_digest(resume_token),
    )


# No task events: Ray records one in the GCS for every call (several per
# hop), which grew its memory by ~12 MiB a minute at 20 sessions and
# never gave it back (docs/capacity.md, bench/soak.py). A public option;
# bench/ray_calls.py turns them on to count calls (embed_batcher.TASK_EVENTS).
@ray.remote(num_cpus=0, max_restarts=0, enable_task_events=TASK_EVENTS)
class SessionActor:
    """The state of one session; methods are called by the ingress only."""

    def __init__(
        self,
        settings: Settings,
        embedding: tuple[str, str],
        session_id: str,
        resume_digest: str,
    ) -> None:
        """`embedding` names the tier: (Serve app name, deployment name);
        `resume_digest` is `token_digest` of the session's resume token."""
        self.settings = settings
        lower_cpu_priority(settings.serving_nice)
        logging_setup.configure(session_id=session_id, fmt=settings.log_format)
        self.fork_fallback = report_fork_fallback(settings, os.environ)
        self.engine = SessionEngine(settings)
        self.embedding = embedding
        self._batcher = None  # this node's EmbedBatcher, found on first use
        self.session_id = session_id
        self._token_digest = resume_digest
        self._conn = 0  # generation of the latest connection; 0 = none yet
        self._attached = False
        self._ended = False  # the client sent `end`: no resume, may be recycled
        self._last_seen = time.monotonic()
        self._watchdog: asyncio.Task | None = None

    async def warm(self) -> int:
        """Started into an ingress's warm pool: attached at once to the
        connection that will take it (generation FIRST_CONN), so that the
        session which takes it from the pool starts without a call, and held
        by the pool's keep-alive like an attached session (not the shorter
        TTL); if that ingress goes away, it ends. Repeated calls change
        nothing once a connection is attached."""
        if not self._conn:
            self._conn, self._attached = FIRST_CONN, True
        self._touch()
        return self._conn

    async def attach(
        self, resume_token: str | None = None, session_id: str | None = None
    ) -> int:
        """Attach a connection; returns its generation, or 0 if refused.

        A resume must name this actor's current session and present its
        token (compared in constant time); a session that ended is gone. A
        newer connection supersedes an older one.
        """
        if resume_token is not None and (
            self._ended
            or (session_id is not None and session_id != self.session_id)
            or not hmac.compare_digest(
                token_digest(resume_token).encode(), self._token_digest.encode()
            )
        ):
            return 0
        if self._conn:
            self.engine.reattach()
        self._conn += 1
        self._attached = True
        self._touch()
        return self._conn

    async def detach(self, conn: int) -> None:
        """The connection dropped: keep enrollments for the TTL."""
        if conn == self._conn:
            self._attached = False
            self.engine.disconnect()
            self._touch()

    async def touch(self, conn: int) -> bool:
        """Keep-alive from the ingress; False if this connection was superseded."""
        self._touch()
        return conn == self._conn

    async def handle(
        self, conn: int, frames: list[Frame]
    ) -> tuple[list[dict], int | None, HoldRule]:
        """Process frames in order; returns (messages to send, close code,
        what the ingress may hold back before the next call)."""
        self._touch()
        if conn != self._conn:
            return (
                [error("session_expired", "another connection resumed this session")],
                CLOSE_CODES["session_expired"],
                HoldRule(),
            )
        actions: list = []
        for is_text, payload, t in frames:
            if is_text:
                actions.extend(self.engine.on_text(payload, t))
            else:
                actions.extend(self.engine.on_binary(payload, t))
            if actions and isinstance(actions[-1], Close):
                break
        timeout = EMBED_TIMEOUT_S

        async def embed(jobs: list) -> list:
            nonlocal timeout
            enrolling = any(isinstance(j, (EnrollJob, EnrollWindowJob)) for j in jobs)
            timeout = ENROLL_TIMEOUT_S if enrolling else EMBED_TIMEOUT_S
            return await self._embed(
                [to_int16(j.audio) for j in jobs], timeout, live=not enrolling
            )

        try:
            messages, close = await self.engine.run_async(actions, embed)
        except TimeoutError as exc:  # alive, but too busy (or stalled)
            return self._embedding_failed(
                exc,
                "overloaded",
                f"the embedding service did not answer within {timeout:g} s",
            )
        except Exception as exc:  # the embedding tier failed twice
            return self._embedding_failed(
                exc, "internal", "the embedding service failed"
            )
        if close == 1000:
            self._ended = True
        return messages, close, self.engine.hold_rule()

    async def recycle(self, session_id: str, resume_digest: str) -> int:
        """After a clean end, become a new session, attached like a pooled
        actor (`warm`); returns its first connection's generation, or 0 if
        refused (the session has not ended, or `session_id` would rename
        this actor).

        Nothing of the old session is kept: a new engine (no enrollments,
        no audio), id and token; only this node's EmbedBatcher is kept.
        """
        if not self._ended or actor_name(session_id) != actor_name(self.session_id):
            return 0
        self.engine = SessionEngine(self.settings)
        self.session_id, self._token_digest = session_id, resume_digest
        self._ended = False
        logging_setup.configure(session_id=session_id, fmt=self.settings.log_format)
        self._conn, self._attached = FIRST_CONN, True
        self._touch()
        return self._conn

    def _embedding_failed(
        self, exc: Exception, code: str, what: str
    ) -> tuple[list[dict], int, HoldRule]:
        """End this connection with `code`; the session (its enrollments)
        stays for a resume, as after any drop."""
        logger.error("session %s: embedding failed: %r", self.session_id, exc)
        self.engine.disconnect()  # drops unfinished hops, a second look's too
        self.engine.state = "closed"
        message = f"{what}; reconnect with resume_token to continue"
        return [error(code, message)], CLOSE_CODES[code], HoldRule()

    async def _embed(self, signals, timeout: float, live: bool = True):
        """Through this node's EmbedBatcher; one retry (a replica or the
        batcher may have died), all within `timeout` s."""
        last: Exception | None = None
        deadline = time.monotonic() + timeout
        for _ in range(EMBED_ATTEMPTS):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if self._batcher is None:
                self._batcher = node_batcher(
                    *self.embedding,
                    NAMESPACE,
                    self.settings.serving_nice,
                    self.settings.enroll_in_flight,
                )
            ref = self._batcher.embed.remote(signals, live)
            try:
                return await asyncio.wait_for(_result(ref), left)
            except asyncio.TimeoutError:
                ray.cancel(ref)  # overloaded or being replaced: no retry
                raise
            except ray.exceptions.RayActorError as exc:
                self._batcher, last = None, exc  # find (or start) a new one
            except Exception as exc:
                last = exc
        raise last or TimeoutError("embedding timed out")

    async def enrollments(self) -> dict:
        """{speaker: (reference embedding, self-score)}, never their audio.

        The ingress keeps this copy so that it can `restore` the session
        should this actor's process die.
        """
        e = self.engine
        return {
            k: (v, e.self_scores.get(k))
            for k, v in e.enrollments.items()
            if v is not None
        }

    async def restore(self, enrollments: dict) -> None:
        """Seed a re-created session; it then waits for a resume (TTL)."""
        for name, (reference, self_score) in enrollments.items():
            self.engine.set_reference(name, reference, self_score)
        self._attached = False
        self._touch()

    async def stats(self) -> dict:
        """For tests and benchmarks: which process and node hold the session."""
        import os
        import sys

        return {
            "pid": os.getpid(),
            "fork_fallback": self.fork_fallback,
            "torch_loaded": "torch" in sys.modules,
            "niceness": thread_niceness(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "speakers": sorted(self.engine.enrollments),
            "thresholds": self.engine.thresholds(),
        }

    def _touch(self) -> None:
        self._last_seen = time.monotonic()
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._expire())

    async def _expire(self) -> None:
        """End the session when nobody holds it any more."""
        while True:
            await asyncio.sleep(1.0)
            idle = time.monotonic() - self._last_seen
            limit = 3 * KEEPALIVE_S if self._attached else self.settings.session_ttl_s
            if idle > limit:
                logger.info("session %s expired after %.0f s", self.session_id, idle)
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                return
