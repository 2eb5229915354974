"""The FastAPI ingress under Ray Serve: `/v1/stream` and the HTTP endpoints.

Per WebSocket connection it creates (or, on resume, finds) a SessionActor
and hands the socket to the stream pump. Its parts, by job: the routes,
the checks before a session opens (token, origin, limits) and the opening
here; the `/v1/embeddings` upload in serve_app/uploads.py; the pump in
serve_app/pump.py; the warm pool of SessionActors, and
their recycling, in serve_app/pool.py; recovery from a dead actor in
serve_app/recovery.py.
"""

# No `from __future__ import annotations`: FastAPI must resolve the
# endpoint annotations at run time inside the replica.

import asyncio
import json
import logging
import secrets
import time

import ray
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from ray import serve
from ray.serve.handle import DeploymentHandle

from actors.session_actor import (
    session_actor_args,
    FIRST_CONN,
    NAMESPACE,
    SessionActor,
    actor_name,
)
from diglett import __version__, logging_setup
from diglett.engine.access import (
    accepted_subprotocol,
    given_resume_token,
    given_token,
    matching_token,
)
from diglett.engine.client_limits import (
    ClientLimits,
    client_address,
    client_keys,
    forwarded_for,
)
from diglett.priority import lower_cpu_priority
from diglett.settings import Settings
from serve_app import metrics, recovery
from serve_app.calls import SESSION_START_TIMEOUT_S, _await
from serve_app.demo import router as demo_router
from serve_app.placement import session_actor_options
from serve_app.pool import SessionPool
from serve_app.pump import _fatal, pump
from serve_app.serve_env import ROUTE_PROXY, request_route
from serve_app.uploads import ErrorOut, EmbeddingOut, embed_upload, unauthorized

logger = logging.getLogger("ray.serve")

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
        self.pool = SessionPool(self.settings, self._spawn)
        # Sessions that dropped here, resumable until then (monotonic time).
        self._detached: dict[str, float] = {}
        s = self.settings
        self.clients = ClientLimits(
            s.client_max_sessions, s.client_new_per_s, s.client_new_burst
        )
        try:
            self.pool.fill()
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
            return unauthorized()
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
            return unauthorized()
        return await embed_upload(request, self.settings.max_upload_s, self.embedder)

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
        resuming = ws.query_params.get("session")
        if self._sessions_held(resuming) >= self.settings.max_sessions:
            await _fatal(ws, "overloaded", "too many sessions; try again later")
            return
        keys = self._client_keys(ws)
        # A resume is never refused by the per-client rules: its session
        # is counted already, and refusing it would lose the enrollments.
        refused = None if resuming else self.clients.refuse_new(keys, time.monotonic())
        if refused:
            await _fatal(ws, "overloaded", refused)
            return
        self.active += 1
        metrics.set_active(self.active)
        opened = None
        try:
            opened = await self._open_session(ws)
            if opened is not None:
                self.clients.opened(opened[2], keys)
                await self._pump(ws, *opened)
            elif resuming:  # no such session: it costs what a new one would
                self.clients.charge(keys, time.monotonic())
        finally:
            self.active -= 1
            metrics.set_active(self.active)
            if opened is not None:
                until = self._detached.get(opened[2])
                if until is None:
                    self.clients.ended(opened[2])
                else:
                    self.clients.dropped(opened[2], until)

    def _sessions_held(self, resuming: str | None) -> int:
        """Open connections plus sessions that dropped and may still resume
        (until their TTL), which hold an actor each: without them, a client
        that connects and drops could fill the session tier. A resume does
        not count its own session twice."""
        now = time.monotonic()
        self._detached = {s: t for s, t in self._detached.items() if t > now}
        return self.active + sum(1 for s in self._detached if s != resuming)

    def _authorized(self, conn: Request | WebSocket) -> bool:
        """One of the API tokens, if any is set, from the request (see
        `given_token`), compared in constant time."""
        tokens = self.settings.api_tokens
        if not tokens:
            return True
        given = given_token(conn.headers, conn.query_params)
        return matching_token(given, tokens) is not None

    def _client_keys(self, ws: WebSocket) -> list[str]:
        """Who an authorized client is, for the per-client limits
        (diglett/engine/client_limits.py)."""
        server = ws.scope.get("server") or (None, None)
        peer = (ws.scope.get("client") or (None, None))[0]
        address = client_address(
            request_route(server[1]) == ROUTE_PROXY,
            peer,
            forwarded_for(ws.scope.get("headers") or []),
            self.settings.forwarded_hops,
        )
        token = given_token(ws.headers, ws.query_params)
        return client_keys(token, len(self.settings.api_tokens), address)

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
        pooled = self.pool.take()
        if pooled is not None:
            actor, sid, token = pooled
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

    def _spawn(self, sid: str, token: str):
        """A new named, detached SessionActor, placed by the settings."""
        return SessionActor.options(
            name=actor_name(sid),
            namespace=NAMESPACE,
            lifetime="detached",
            **session_actor_options(self.settings),
        ).remote(*session_actor_args(self.settings, self.embedding, sid, token))

    async def _pump(
        self, ws: WebSocket, actor, conn: int, sid: str, token: str, resumed: bool
    ) -> None:
        """The connection's stream pump (serve_app/pump.py), with this
        replica as its owner."""
        await pump(self, ws, actor, conn, sid, token, resumed)

    async def _session_failed(
        self,
        ws: WebSocket,
        sid: str,
        token: str,
        enrolled: dict,
        exc: Exception,
        dead: bool = False,
    ) -> None:
        """The SessionActor failed: restore it if it died, tell the client
        (serve_app/recovery.py)."""
        await recovery.session_failed(ws, self._spawn, sid, token, enrolled, exc, dead)

    async def _replace_unused(self, sid: str, token: str):
        """A new session's actor died before its first call: the same
        session re-created and attached (serve_app/recovery.py). Returns
        (actor, conn), or None."""
        return await recovery.replace_unused(self.pool, self._spawn, sid, token)

    def __del__(self) -> None:
        """Serve calls this when the replica stops: end the idle sessions."""
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.close()
