"""Protocol v1 over one WebSocket, with resume after a dropped connection."""

from __future__ import annotations

import asyncio
import json
from typing import Callable
from urllib.parse import urlencode, urlsplit, urlunsplit, parse_qsl

ERROR_HINTS = {
    "unauthorized": "the server wants an API token: pass --token or set "
    "DIGLETT_API_TOKEN (environment or .env)",
    "session_expired": "the session is gone (its TTL passed or the server "
    "restarted): enroll the speakers again",
    "overloaded": "the server is busy; try again later",
    "rate_exceeded": "audio was sent faster than the server allows; "
    "use a lower --speed",
    "frame_too_large": "an audio frame held more than 1 s of audio",
    "internal": "the server failed unexpectedly; try again",
    "enroll_too_short": "record longer, or speak more (check the level meter)",
    "too_many_speakers": "the server holds at most max_speakers per session",
    "not_enrolled": "enroll at least one speaker before streaming",
    "unsupported_format": "the sample rate or encoding is not accepted",
    "bad_audio": "the server dropped an unreadable audio frame",
    "bad_message": "the server rejected a message",
}
FATAL = {
    "unauthorized",
    "session_expired",
    "overloaded",
    "rate_exceeded",
    "frame_too_large",
    "internal",
}
CLOSE_NAMES = {
    4401: "unauthorized",
    4404: "session_expired",
    1008: "rate_exceeded",
    1009: "frame_too_large",
    1011: "internal",
    1013: "overloaded",
}


class ClientError(Exception):
    """Ends the run with one clear line (never a traceback)."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


def describe(msg: dict) -> str:
    """One line for a server `error` message."""
    code = msg.get("code", "?")
    line = f"server error {code}: {msg.get('message', '')}".rstrip()
    hint = ERROR_HINTS.get(code)
    return f"{line} — {hint}" if hint else line


class Dropped(Exception):
    """The connection went away without a fatal error: try to resume."""


def with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(params)
    return urlunsplit(parts._replace(query=urlencode(query)))


class Connection:
    """One WebSocket to `/v1/stream`; a reader task sorts what arrives.

    `label` messages go to `on_label`, non-fatal errors to `on_error`, and
    everything else (`enrolled`, `format_ok`, `summary`, errors answering a
    request) to `replies`. `open_timeout_s` bounds the WebSocket handshake
    and `ready_timeout_s` the wait for `ready` after it (a server opening
    many sessions at once, with no warm actors, takes longer than one).
    """

    def __init__(
        self,
        url: str,
        token: str,
        on_label: Callable[[dict], None],
        on_error: Callable[[str], None],
        open_timeout_s: float = 30.0,
        ready_timeout_s: float = 60.0,
    ) -> None:
        self.url = url
        self.token = token
        self.open_timeout_s = open_timeout_s
        self.ready_timeout_s = ready_timeout_s
        self.on_label = on_label
        self.on_error = on_error
        self.ws = None
        self.ready: dict = {}
        self.replies: asyncio.Queue = asyncio.Queue()
        self.fatal: dict | None = None
        self.close_code: int | None = None
        self.closed = asyncio.Event()
        self._reader: asyncio.Task | None = None
        self.awaiting_reply = False

    async def open(self, session: str | None = None, resume_token: str = "") -> dict:
        import websockets
        from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI

        url = self.url
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        if session:  # the token in a header, not in a URL that may be logged
            url = with_query(url, session=session)
            headers["X-Diglett-Resume-Token"] = resume_token
        try:
            self.ws = await websockets.connect(
                url,
                additional_headers=headers,
                max_size=2**24,
                open_timeout=self.open_timeout_s,
                compression=None,  # PCM does not compress; deflate costs both ends CPU
            )
        except InvalidURI:
            raise ClientError(f"not a WebSocket URL: {self.url}") from None
        except InvalidStatus as exc:
            status = exc.response.status_code
            raise ClientError(
                f"{self.url} answered HTTP {status} instead of a WebSocket: "
                "is this the server's /v1/stream URL?"
            ) from None
        except asyncio.TimeoutError:
            raise Dropped(f"timed out connecting to {self.url}") from None
        except ConnectionRefusedError:
            raise Dropped(
                f"cannot reach {self.url}: connection refused (is the server "
                "running? `make serve` starts it)"
            ) from None
        except OSError as exc:
            raise Dropped(f"cannot reach {self.url}: {exc.strerror or exc}") from None
        try:
            first = json.loads(
                await asyncio.wait_for(self.ws.recv(), self.ready_timeout_s)
            )
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else None
            name = CLOSE_NAMES.get(code)
            if name in FATAL:
                raise ClientError(describe({"code": name}), name) from None
            raise Dropped(f"the server closed the connection ({code})") from None
        except (asyncio.TimeoutError, ValueError):
            raise ClientError("the server did not send a valid `ready`") from None
        if first.get("type") == "error":
            await self._drain_close()
            raise ClientError(describe(first), first.get("code"))
        if first.get("type") != "ready":
            raise ClientError(f"expected `ready`, got {first.get('type')!r}")
        self.ready = first
        self._reader = asyncio.create_task(self._read())
        return first

    async def _drain_close(self) -> None:
        try:
            await asyncio.wait_for(self.ws.wait_closed(), 5)
        except Exception:
            pass

    async def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for raw in self.ws:
                if isinstance(raw, bytes):
                    continue
                try:
                    msg = json.loads(raw)
                except ValueError:
                    continue
                kind = msg.get("type")
                if kind == "label":
                    self.on_label(msg)
                elif kind == "error" and msg.get("code") in FATAL:
                    self.fatal = msg
                elif kind == "error" and not self.awaiting_reply:
                    self.on_error(describe(msg))
                else:
                    await self.replies.put(msg)
        except ConnectionClosed:
            pass
        except Exception:
            pass
        finally:
            self.close_code = self.ws.close_code
            self.closed.set()
            await self.replies.put(None)

    def check(self) -> None:
        """Raise if the connection has ended: ClientError if fatal, else Dropped."""
        if not self.closed.is_set():
            return
        if self.fatal is not None:
            raise ClientError(describe(self.fatal), self.fatal.get("code"))
        name = CLOSE_NAMES.get(self.close_code)
        if name in FATAL and name != "internal":
            raise ClientError(describe({"code": name}), name)
        raise Dropped(f"connection lost (close code {self.close_code})")

    async def send(self, data) -> None:
        from websockets.exceptions import ConnectionClosed

        self.check()
        try:
            await self.ws.send(data)
        except ConnectionClosed:
            await asyncio.wait_for(self.closed.wait(), 5)
            self.check()
            raise Dropped("connection lost") from None

    async def send_json(self, msg: dict) -> None:
        await self.send(json.dumps(msg))

    async def reply(self, timeout: float = 120.0) -> dict:
        """The next non-label message (enrolled, format_ok, summary, error)."""
        try:
            msg = await asyncio.wait_for(self.replies.get(), timeout)
        except asyncio.TimeoutError:
            raise ClientError(f"no answer from the server in {timeout:.0f} s")
        if msg is None:
            self.check()
            raise Dropped("connection lost")
        return msg

    async def close(self) -> None:
        if self.ws is not None:
            try:
                await asyncio.wait_for(self.ws.close(), 5)
            except Exception:
                pass
        if self._reader is not None:
            self._reader.cancel()
