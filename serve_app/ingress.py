"""The FastAPI ingress under Ray Serve: `/v1/stream` and the HTTP endpoints.

Per WebSocket connection it creates (or, on resume, finds) a SessionActor
and pumps frames to it. Frames that queue up while the actor is busy are
sent together in one actor call, so under load the per-call cost is spread
over many frames; a backlog past `BACKLOG_BYTES` ends the session with
`overloaded`.
"""

# No `from __future__ import annotations`: FastAPI must resolve the
# endpoint annotations at run time inside the replica.

import asyncio
import hmac
import json
import logging
import secrets
import time

import numpy as np
import ray
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.websockets import WebSocketDisconnect, WebSocketState

from actors.session_actor import (
    session_actor_args,
    token_digest,
    EMBED_TIMEOUT_S,
    ENROLL_TIMEOUT_S,
    FIRST_CONN,
    KEEPALIVE_S,
    NAMESPACE,
    SessionActor,
    actor_name,
    recycled_session_id,
)
from diglett import __version__, levels, logging_setup
from diglett.access import accepted_subprotocol, given_resume_token, given_token
from diglett.audio import AudioError, decode_wav
from diglett.embedder import EMBEDDING_DIM
from diglett.holdback import HoldRule, StreamPace, can_hold, send_by
from diglett.priority import lower_cpu_priority
from diglett.protocol import CLOSE_CODES, error
from diglett.settings import Settings
from serve_app import metrics
from serve_app.demo import router as demo_router
from serve_app.placement import session_actor_options
from serve_app.serve_env import request_route

logger = logging.getLogger("ray.serve")

CALL_MARGIN_S = 12.0  # a SessionActor call's own work, beyond its embedding wait
RESTORE_S = 8.0  # longest wait to re-create a dead session before `internal`
# Unprocessed input per connection before `overloaded`: about 4 min of
# 16 kHz s16 audio, 22 s of 96 kHz f32.
BACKLOG_BYTES = 8 * 2**20
BATCH_FRAMES = 64  # most frames sent to the SessionActor in one call
SESSION_START_TIMEOUT_S = 30.0  # a SessionActor no node can place is `overloaded`
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


app = FastAPI(
    title="Diglett",
    version=__version__,
    description=(
        "Real-time speaker verification and sound levels. The streaming "
        "protocol (v1) runs over the WebSocket at `/v1/stream`; see "
        "docs/protocol.md."
    ),
)
app.include_router(demo_router)  # the browser demo at /demo (serve_app/demo.py)


class Health(BaseModel):
    status: str
    # How this request reached the ingress (serve_app/serve_env.py): "direct"
    # from HAProxy, or "proxy" through Serve's Python proxy.
    route: str | None = None


class Info(BaseModel):
    protocol: int
    sample_rate: int
    encoding: str
    window_s: float
    hop_s: float
    enroll_min_s: float
    enroll_min_speech_s: float
    enroll_max_s: float
    max_speakers: int
    model: str
    threshold: float
    # Audio each label waits for past its hop (docs/protocol.md); 0: none.
    lookahead_s: float = 0.0
    version: str


class EmbeddingOut(BaseModel):
    embedding: list[float]
    dim: int
    duration_s: float
    level_dbfs: float


class ErrorOut(BaseModel):
    code: str
    message: str


def upload_cap(max_upload_s: float) -> int:
    """Most bytes a `/v1/embeddings` body may have: `max_upload_s` of the
    largest WAV accepted (96 kHz, 8 channels, 32-bit), plus 1 MB of headers
    and multipart framing."""
    return int(max_upload_s * 96000 * 8 * 4) + 1_000_000


def _unauthorized() -> JSONResponse:
    return _bad(401, "unauthorized", "missing or wrong API token")


def _bad(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status)


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


async def _await(ref):
    """An ObjectRef as a coroutine, for asyncio.wait_for."""
    return await ref


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


async def _dead_after_warm(pool: list) -> list:
    """Touch every pooled (actor, id, token) at once; returns those that
    failed (the same tuples).

    At once, not one after another: a burst leaves a pool of 100 busy
    actors, and a sequential round could outlast their keep-alive limit."""
    answers = await asyncio.gather(
        *(actor.warm.remote() for actor, _, _ in pool), return_exceptions=True
    )
    return [e for e, a in zip(pool, answers) if isinstance(a, BaseException)]


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


@serve.deployment(
    name="Ingress",
    # Every open WebSocket is an ongoing request: this caps sessions per replica.
    max_ongoing_requests=2000,
    ray_actor_options={"num_cpus": 0},
)
@serve.ingress(app)
class Ingress:
    """HTTP and WebSocket front door; holds no session state itself."""

    def __init__(self, embedder: DeploymentHandle) -> None:
        self.settings = Settings.from_env()
        lower_cpu_priority(self.settings.serving_nice)
        logging_setup.redact_serve_logs()
        self.embedder = embedder
        # SessionActors reach the tier by name, through their node's batcher.
        dep = embedder.deployment_id
        self.embedding = (
            dep.app_name or serve.get_replica_context().app_name,
            dep.name,
        )
        self.active = 0
        metrics.set_active(0)  # exported from the start, not from a first session
        # Started, idle SessionActors: (actor, session id, resume token).
        self._pool: list[tuple] = []
        self._pool_task: asyncio.Task | None = None
        # Set when a session takes a pooled actor: wakes the pool's keeper,
        # which otherwise waits KEEPALIVE_S between rounds.
        self._pool_wanted = asyncio.Event()
        self._sweep: asyncio.Task | None = None  # an early `_drop_dead_pooled`
        self._last_open = 0.0  # when a new session last opened
        self._recycling: set[asyncio.Task] = set()  # see _recycle
        self._pooled_at: dict[str, float] = {}  # session id -> when pooled
        # Sessions that dropped here, resumable until then (monotonic time).
        self._detached: dict[str, float] = {}
        try:
            self._fill_pool()
        except RuntimeError:  # no event loop here: the first session fills it
            pass

    # ------------------------------------------------------------------ HTTP
    @app.get("/healthz", response_model=Health, responses={503: {"model": Health}})
    async def healthz(self, request: Request):
        """`ok` once an embedding replica has loaded the model; `route` says
        whether HAProxy reached this replica directly yet (`direct`)."""
        server = request.scope.get("server") or (None, None)
        route = request_route(server[1])
        try:
            await asyncio.wait_for(self.embedder.info.remote(), timeout=5.0)
        except Exception:
            return JSONResponse({"status": "loading", "route": route}, status_code=503)
        return {"status": "ok", "route": route}

    @app.get("/v1/info", response_model=Info, responses={401: {"model": ErrorOut}})
    async def info(self, request: Request):
        """The session-independent values of the `ready` message."""
        if not self._authorized(request):
            return _unauthorized()
        return {**self.settings.info(), "version": __version__}

    @app.post(
        "/v1/embeddings",
        response_model=EmbeddingOut,
        responses={
            400: {"model": ErrorOut},
            401: {"model": ErrorOut},
            413: {"model": ErrorOut},
        },
    )
    async def embeddings(self, request: Request):
        """Embed a WAV file: multipart field `file`, or a raw `audio/wav` body.

        Any rate and channel count (mixed to mono, resampled), at most 60 s.
        Returns the model's raw (not length-normalised) 192-dim embedding.
        The token is checked and a declared size capped before the body is
        read; decoding runs in a thread, off the replica's event loop.
        """
        if not self._authorized(request):
            return _unauthorized()
        cap = upload_cap(self.settings.max_upload_s)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            return _bad(413, "too_long", f"upload larger than {cap} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                return _bad(413, "too_long", f"upload larger than {cap} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        data = body
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            request._body = body  # let Starlette parse what we already read
            try:
                form = await request.form()
            except Exception as exc:
                return _bad(400, "bad_audio", f"unreadable multipart body: {exc}")
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                return _bad(400, "bad_audio", "multipart field 'file' is missing")
            data = await upload.read()
        try:
            audio, duration = await asyncio.to_thread(
                decode_wav, data, self.settings.max_upload_s
            )
        except AudioError as exc:
            status = 413 if exc.code == "too_long" else 400
            return _bad(status, exc.code, str(exc))
        [emb] = await self.embedder.embed.remote([audio])
        return {
            "embedding": np.asarray(emb, dtype=float).tolist(),
            "dim": EMBEDDING_DIM,
            "duration_s": round(duration, 4),
            "level_dbfs": round(levels.rms_dbfs(audio), 2),
        }

    # ------------------------------------------------------------- WebSocket
    @app.websocket("/v1/stream")
    async def stream(self, ws: WebSocket) -> None:
        """Protocol v1; see docs/protocol.md."""
        await ws.accept(subprotocol=accepted_subprotocol(ws.headers))
        if not self._authorized(ws):
            await _fatal(ws, "unauthorized", "missing or wrong API token")
            return
        if not self._origin_allowed(ws):
            await _fatal(ws, "unauthorized", "this Origin is not allowed")
            return
        if self._sessions_held(ws.query_params.get("session")) >= (
            self.settings.max_sessions
        ):
            await _fatal(ws, "overloaded", "too many sessions; try again later")
            return
        self.active += 1
        metrics.set_active(self.active)
        try:
            opened = await self._open_session(ws)
            if opened is not None:
                await self._pump(ws, *opened)
        finally:
            self.active -= 1
            metrics.set_active(self.active)

    def _sessions_held(self, resuming: str | None) -> int:
        """Open connections plus sessions that dropped and may still resume
        (until their TTL), which hold an actor each: without them, a client
        that connects and drops could fill the session tier. A resume does
        not count its own session twice."""
        now = time.monotonic()
        self._detached = {s: t for s, t in self._detached.items() if t > now}
        return self.active + sum(1 for s in self._detached if s != resuming)

    def _authorized(self, conn: Request | WebSocket) -> bool:
        """The API token, if one is set, from the request (see
        `given_token`), compared in constant time."""
        expected = self.settings.api_token
        if not expected:
            return True
        given = given_token(conn.headers, conn.query_params)
        return hmac.compare_digest(given.encode(), expected.encode())

    def _origin_allowed(self, ws: WebSocket) -> bool:
        """Browsers send Origin; non-browser clients may omit it."""
        allowed = self.settings.origins
        origin = ws.headers.get("origin")
        if not allowed or origin is None:
            return True
        return origin.strip().rstrip("/").lower() in allowed

    async def _open_session(self, ws: WebSocket):
        """Create or resume the session; returns (actor, conn, id, resume
        token, resumed)."""
        sid = ws.query_params.get("session")
        resumed = sid is not None
        if resumed:
            token = given_resume_token(ws.headers, ws.query_params)
            try:
                actor = ray.get_actor(actor_name(sid), namespace=NAMESPACE)
                conn = await actor.attach.remote(token, sid)
            except Exception:
                conn = 0
            if not conn:
                await _fatal(
                    ws, "session_expired", "no such session, or its TTL has passed"
                )
                return None
            self._detached.pop(sid, None)
        else:
            opened = await self._new_session()
            if opened is None:
                await _fatal(ws, "overloaded", "could not start a session; try later")
                return None
            actor, conn, sid, token = opened
        ready = {"type": "ready", **self.settings.info()}
        ready.update(session_id=sid, resume_token=token)
        await ws.send_text(json.dumps(ready))
        metrics.session_opened(resumed=resumed)
        logger.info(
            "session %s attached (connection %d)", sid, conn, extra={"session_id": sid}
        )
        return actor, conn, sid, token, resumed

    async def _new_session(self):
        """A warm pooled SessionActor, or a new one if the pool is empty.
        Returns (actor, conn, id, token) or None.

        A pooled actor was attached when it was warmed (`SessionActor.warm`),
        so `ready` goes out with no call on its way: in a burst, every call
        waits behind all the others' for two busy cores. The pool's keep-alive
        drops actors that died; if one dies after its last keep-alive, the
        session's first call finds it dead and `_replace_unused` re-creates
        it under the same id before anything but `ready` was sent.
        """
        self._last_open = time.monotonic()
        self._fill_pool()
        if self._pool:
            actor, sid, token = self._pool.pop(0)
            return actor, FIRST_CONN, sid, token
        sid, token = secrets.token_hex(16), secrets.token_urlsafe(32)
        actor = self._spawn(sid, token)
        try:
            conn = await asyncio.wait_for(
                _await(actor.attach.remote()), SESSION_START_TIMEOUT_S
            )
            return actor, conn, sid, token
        except Exception as exc:
            logger.error("could not start a SessionActor: %r", exc)
            ray.kill(actor, no_restart=True)
            return None

    def _fill_pool(self) -> None:
        """Start refilling the warm pool in the background (one at a time:
        starting workers in parallel on a busy node only slows them all)."""
        if self._pool_task is None or self._pool_task.done():
            self._pool_task = asyncio.get_running_loop().create_task(self._keep_pool())
        self._pool_wanted.set()

    async def _keep_pool(self) -> None:
        """Keep the pool full, and its actors alive (`_keep_warm`)."""
        warm = asyncio.get_running_loop().create_task(self._keep_warm())
        try:
            while True:
                self._pool_wanted.clear()
                failed = False
                while len(self._pool) < self.settings.session_pool:
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
                    self._pool.append((actor, sid, token))
                    self._pooled_at[sid] = time.monotonic()
                if failed:
                    await asyncio.sleep(KEEPALIVE_S)
                    continue
                # Full: refill as soon as a session takes one (it used to
                # wait out this round's KEEPALIVE_S, up to 15 s, so whether
                # a refill landed on a burst's first streaming seconds was
                # chance).
                try:
                    await asyncio.wait_for(self._pool_wanted.wait(), KEEPALIVE_S)
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
            await self._drop_dead_pooled()
            self._trim_pool()

    def _trim_pool(self) -> None:
        """End the actors beyond the pool's size that sat unused in it for
        POOL_TRIM_S (each holds ~34 MiB)."""
        now = time.monotonic()
        at = [self._pooled_at.get(sid, now) for _, sid, _ in self._pool]
        for i in pool_excess(at, self.settings.session_pool, now):
            ray.kill(self._pool.pop(i)[0], no_restart=True)
        self._pooled_at = {
            sid: self._pooled_at[sid]
            for _, sid, _ in self._pool
            if sid in self._pooled_at
        }

    async def _drop_dead_pooled(self) -> None:
        dead = await _dead_after_warm(list(self._pool))
        # Sessions may have taken pooled actors meanwhile.
        self._pool = [e for e in self._pool if all(e is not d for d in dead)]

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
        if not self.settings.session_recycle or len(self._pool) >= room:
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
        if conn != FIRST_CONN or len(self._pool) >= room:
            return False
        # First out: the next session gets the actor whose pages were just
        # in use; the pool's oldest idle ones are at the end, to be trimmed.
        self._pool.insert(0, (actor, new_sid, token))
        self._pooled_at[new_sid] = time.monotonic()
        return True

    async def _replace_unused(self, sid: str, token: str):
        """A new session's pooled actor died (after the pool's last
        keep-alive) before the session's first call: the same session,
        re-created and attached, so that the client never notices; and the
        pool's other dead actors dropped now (a lost node takes several).
        Returns (actor, conn), or None."""
        self._sweep = asyncio.get_running_loop().create_task(self._drop_dead_pooled())
        actor = await self._restore(sid, token, {})
        if actor is None:
            return None
        try:
            conn = await asyncio.wait_for(
                _await(actor.attach.remote()), SESSION_START_TIMEOUT_S
            )
        except Exception:
            return None
        return actor, conn

    def __del__(self) -> None:
        """Serve calls this when the replica stops: end the idle sessions."""
        for actor, _, _ in getattr(self, "_pool", []):
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass

    def _spawn(self, sid: str, token: str):
        """A new named, detached SessionActor, placed by the settings."""
        return SessionActor.options(
            name=actor_name(sid),
            namespace=NAMESPACE,
            lifetime="detached",
            **session_actor_options(self.settings),
        ).remote(*session_actor_args(self.settings, self.embedding, sid, token))

    async def _restore(self, sid: str, token: str, enrollments: dict):
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
                actor = self._spawn(sid, token)
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

    async def _session_failed(
        self,
        ws: WebSocket,
        sid: str,
        token: str,
        enrolled: dict,
        exc: Exception,
        dead: bool = False,
    ) -> None:
        """The SessionActor failed: restore it if it died, tell the client."""
        logger.error(
            "session %s: actor failed: %r", sid, exc, extra={"session_id": sid}
        )
        if dead or isinstance(exc, ray.exceptions.RayActorError):
            await self._restore(sid, token, enrolled)
        await _fatal(
            ws,
            "internal",
            "the session failed unexpectedly; "
            "reconnect with resume_token to continue",
        )

    async def _pump(
        self, ws: WebSocket, actor, conn: int, sid: str, token: str, resumed: bool
    ) -> None:
        inbox = _Inbox(BACKLOG_BYTES)
        queue = inbox.queue
        reader = asyncio.create_task(_read_frames(ws, inbox))
        keepalive = asyncio.create_task(_keepalive(actor, conn, inbox))
        ended = False
        clean = False  # ended by the client's `end`: the actor may be recycled
        idle_s = (
            self.settings.idle_timeout_s if self.settings.idle_timeout_s > 0 else None
        )
        # A copy of the enrollments (embeddings only), to restore the session
        # should its actor's process die.
        enrolled: dict = {}
        # A new session whose actor has answered nothing yet (a pooled actor
        # may have died since the pool's last keep-alive).
        fresh = not resumed
        # Audio frames held back until the session can answer something new
        # (diglett/holdback.py): one actor call per hop, not one per frame.
        held: list = []
        rule = HoldRule()
        # A stream well ahead of real time is answered once per hop of wall
        # time, with every frame that came meanwhile (diglett/holdback.py).
        pace = StreamPace()
        due: float | None = None  # when `held` must go, if held for pace
        try:
            try:
                if resumed:  # a new session has none yet: no call to ask
                    enrolled = await actor.enrollments.remote()
            except Exception as exc:
                await self._session_failed(ws, sid, token, enrolled, exc)
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
                    await self._session_failed(ws, sid, token, enrolled, item.exc)
                    return
                new: list = []
                if item is None:
                    eof = True
                elif item is not _DUE:
                    new.append(item)
                while (
                    len(held) + len(new) < BATCH_FRAMES
                    and not eof
                    and not queue.empty()
                ):
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
                    if due is None and can_hold(frames, rule):
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
                            await self._replace_unused(sid, token) if fresh else None
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
                    await self._session_failed(ws, sid, token, enrolled, exc, True)
                    return
                except Exception as exc:
                    await self._session_failed(ws, sid, token, enrolled, exc)
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
                    task = asyncio.get_running_loop().create_task(
                        self._recycle_or_end(actor, sid)
                    )
                    self._recycling.add(task)
                    task.add_done_callback(self._recycling.discard)
                else:
                    ray.kill(actor, no_restart=True)
            else:
                self._detached[sid] = time.monotonic() + self.settings.session_ttl_s
                try:
                    await actor.detach.remote(conn)
                except Exception:
                    pass
                logger.info("session %s detached", sid, extra={"session_id": sid})
