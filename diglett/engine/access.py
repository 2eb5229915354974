"""Where a client's secrets come from, and how they are kept out of logs.

Pure functions on headers, query strings and URLs, so that every rule is
tested in milliseconds (tests/unit/test_access.py); the ingress applies them.

Secrets travel three ways (docs/protocol.md, "Authentication"):
- headers, for programs: `Authorization: Bearer <api token>`,
  `X-Diglett-Resume-Token: <resume token>`;
- WebSocket subprotocols, for browsers, which cannot set headers:
  `diglett.v1` plus `diglett.token.<api token>` and/or
  `diglett.resume.<resume token>` (the server answers `diglett.v1`);
- the query string (`?token=`, `?resume_token=`), which clients of
  protocol v1 rely on and which is accepted but redacted from every log.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable, Mapping

SUBPROTOCOL = "diglett.v1"
TOKEN_PREFIX = "diglett.token."
RESUME_PREFIX = "diglett.resume."
RESUME_HEADER = "x-diglett-resume-token"
REDACTED = "REDACTED"

# `token=…` or `resume_token=…` in a query string, up to the next separator.
_SECRET_IN_QUERY = re.compile(
    r"(?P<key>(?:[?&;]|%3[Ff]|%26)(?:resume_token|token)(?:=|%3[Dd]))"
    r"(?P<value>[^&;\s\"'#]*)"
)


def offered_subprotocols(headers: Mapping[str, str]) -> list[str]:
    """The subprotocols a WebSocket handshake offers, in order."""
    raw = headers.get("sec-websocket-protocol", "")
    return [p.strip() for p in raw.split(",") if p.strip()]


def _from_subprotocols(headers: Mapping[str, str], prefix: str) -> str:
    for p in offered_subprotocols(headers):
        if p.startswith(prefix):
            return p[len(prefix) :]
    return ""


def given_token(headers: Mapping[str, str], query: Mapping[str, str]) -> str:
    """The API token a request presents: the bearer header, else the
    subprotocol form, else `?token=`; "" when none."""
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return _from_subprotocols(headers, TOKEN_PREFIX) or query.get("token", "")


def matching_token(given: str, tokens: Iterable[str]) -> str | None:
    """The configured token `given` equals, or None; every token is compared
    in constant time, so the time taken says nothing about which matched."""
    found = None
    for token in tokens:
        if hmac.compare_digest(given.encode(), token.encode()):
            found = token
    return found


def given_resume_token(headers: Mapping[str, str], query: Mapping[str, str]) -> str:
    """The resume token a reconnect presents: the header, else the
    subprotocol form, else `?resume_token=`; "" when none."""
    return (
        headers.get(RESUME_HEADER, "").strip()
        or _from_subprotocols(headers, RESUME_PREFIX)
        or query.get("resume_token", "")
    )


def accepted_subprotocol(headers: Mapping[str, str]) -> str | None:
    """What the server answers: `diglett.v1` when the client offered it
    (a browser fails a handshake that offered subprotocols and got none)."""
    return SUBPROTOCOL if SUBPROTOCOL in offered_subprotocols(headers) else None


def redact(text: str) -> str:
    """`text` with the values of `token` and `resume_token` query
    parameters (also percent-encoded ones) replaced by REDACTED."""
    return _SECRET_IN_QUERY.sub(lambda m: m["key"] + REDACTED, text)
