"""Per-client limits: sessions held and new sessions per second, by identity.

Pure bookkeeping, so every rule is tested in milliseconds
(tests/unit/test_client_limits.py); the ingress decides who a client is
(`client_keys`) and calls `ClientLimits` where a session opens, resumes,
drops and ends.

A client is known by up to two keys, each limited on its own:
- `token:<digest>`: the API token it presented, when the server has several
  (with one, every client shares it, and it tells no one apart); only a
  sha256 digest is kept, never the token;
- `addr:<ip>` (an IPv6 client by its /64): its address, when it provably is
  the client's (`client_address`) and is not a loopback address.
A client with neither key is held only by the replica's global limit: a
key that many clients share would be a global limit that any one of them
could use up for all.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Buckets of keys that hold no session are dropped once full (they would
# refill to the same state); swept at most this often.
PRUNE_EVERY_S = 10.0


def token_key(token: str) -> str:
    """The key of an API token: a digest, so the token itself is not kept."""
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:24]


def address_key(address: str | None) -> str | None:
    """The key of a client address, or None when it identifies no one:
    unknown, not an IP address, or loopback (this machine's own clients,
    and any reverse proxy on it, share it). IPv6 by /64, which one
    subscriber usually holds whole."""
    if not address:
        return None
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]"))
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:a.b.c.d is a.b.c.d
    if ip.is_loopback:
        return None
    if ip.version == 6:
        return f"addr:{ipaddress.ip_network(f'{ip}/64', strict=False)}"
    return f"addr:{ip}"


def forwarded_for(headers: Sequence[tuple[bytes, bytes]]) -> list[str]:
    """The hops of every X-Forwarded-For header of raw ASGI `headers`, in
    order (the client's claim first, the nearest proxy's entry last)."""
    out: list[str] = []
    for name, value in headers:
        if name.lower() == b"x-forwarded-for":
            out += [h.strip() for h in value.decode("latin-1").split(",")]
    return [h for h in out if h]


def client_address(
    via_serve_proxy: bool,
    peer: str | None,
    forwarded: list[str],
    trusted_hops: int,
) -> str | None:
    """The client's address as far as it can be known, else None.

    - `trusted_hops` > 0: that many proxies in front of Ray Serve each append
      the address they saw to X-Forwarded-For (the operator's promise, as
      with uvicorn's forwarded-allow-ips; Serve's HAProxy passes the header
      on unchanged): the entry `trusted_hops` from the end is the client's.
      Fewer entries: unknown (the connection did not come that way).
    - 0, through Serve's Python proxy (`via_serve_proxy`): `peer` (the ASGI
      scope's client) is the proxy's TCP peer, unless an X-Forwarded-For
      came with it: uvicorn replaces the peer by the header's claim when
      the peer is loopback (its default FORWARDED_ALLOW_IPS), so then it
      is unknown.
    - 0, through Serve's HAProxy: unknown. The peer is HAProxy itself
      (127.0.0.1 on the same node, the node's address otherwise), which adds
      no X-Forwarded-For and no PROXY header; and since it connects from
      127.0.0.1, uvicorn has already put a client's own X-Forwarded-For
      claim in `peer`.
    """
    if trusted_hops > 0:
        return forwarded[-trusted_hops] if len(forwarded) >= trusted_hops else None
    if via_serve_proxy and not forwarded:
        return peer
    return None


def client_keys(token: str | None, tokens: int, address: str | None) -> list[str]:
    """The keys a client is limited by (see the module's docstring):
    `token` is the API token it presented, among `tokens` configured."""
    keys = [token_key(token)] if token and tokens > 1 else []
    addr = address_key(address)
    return keys + ([addr] if addr else [])


@dataclass
class _Bucket:
    """A token bucket: `tokens` at time `at`, refilling at `rate` per second
    up to `burst`."""

    tokens: float
    at: float

    def level(self, now: float, rate: float, burst: float) -> float:
        return min(burst, self.tokens + max(0.0, now - self.at) * rate)


class ClientLimits:
    """Sessions held and new sessions per second, per client key, on one
    ingress replica.

    A session counts against its keys from `opened` until `ended`, or until
    the end of its resume window after `dropped` (it still holds an actor
    then). A resume of a session already counted does not count it again.
    `max_sessions` or `new_per_s` 0: that rule is off.
    """

    def __init__(self, max_sessions: int, new_per_s: float, new_burst: float) -> None:
        self.max_sessions = max_sessions
        self.new_per_s = new_per_s
        self.new_burst = max(1.0, new_burst)
        # session id -> (its keys, resumable until (None: connected))
        self._sessions: dict[str, tuple[tuple[str, ...], float | None]] = {}
        self._held: dict[str, int] = {}  # key -> sessions it holds
        self._buckets: dict[str, _Bucket] = {}
        self._pruned_at = float("-inf")

    def refuse_new(self, keys: Iterable[str], now: float) -> str | None:
        """Why a new session for a client with these keys is refused, or
        None, in which case one new-session token of each key is spent."""
        keys = tuple(keys)
        self._prune(now)
        for key in keys:
            held = self._held.get(key, 0)
            if self.max_sessions and held >= self.max_sessions:
                return (
                    f"this client ({_who(key)}) holds {held} sessions, the "
                    f"limit is {self.max_sessions} (sessions dropped within "
                    "their resume window count); try again later"
                )
        if self.new_per_s:
            for key in keys:
                if self._level(key, now) < 1.0:
                    return (
                        f"new sessions from this client ({_who(key)}) come "
                        f"faster than {self.new_per_s:g}/s (burst "
                        f"{self.new_burst:g}); try again later"
                    )
            self.charge(keys, now)
        return None

    def charge(self, keys: Iterable[str], now: float) -> None:
        """Spend one new-session token of each key (down to 0, never
        refusing): a resume that found no session costs like a new one."""
        if not self.new_per_s:
            return
        for key in keys:
            level = self._level(key, now)
            self._buckets[key] = _Bucket(max(0.0, level - 1.0), now)

    def opened(self, sid: str, keys: Iterable[str]) -> None:
        """A session is connected: new, or resumed here (then it keeps the
        keys it was counted under, if this replica counted it)."""
        known = self._sessions.get(sid)
        if known is not None:
            self._sessions[sid] = (known[0], None)
            return
        keys = tuple(keys)
        self._sessions[sid] = (keys, None)
        for key in keys:
            self._held[key] = self._held.get(key, 0) + 1

    def dropped(self, sid: str, resumable_until: float) -> None:
        """Its connection dropped; it may resume until `resumable_until`."""
        known = self._sessions.get(sid)
        if known is not None:
            self._sessions[sid] = (known[0], resumable_until)

    def ended(self, sid: str) -> None:
        """The session is gone (ended, failed, or its actor was killed)."""
        known = self._sessions.pop(sid, None)
        if known is None:
            return
        for key in known[0]:
            left = self._held.get(key, 0) - 1
            if left > 0:
                self._held[key] = left
            else:
                self._held.pop(key, None)

    def held(self, key: str) -> int:
        return self._held.get(key, 0)

    def tracked_keys(self) -> int:
        """Keys with any state (held sessions or a bucket not yet full)."""
        return len(set(self._held) | set(self._buckets))

    def _level(self, key: str, now: float) -> float:
        bucket = self._buckets.get(key)
        if bucket is None:
            return self.new_burst
        return bucket.level(now, self.new_per_s, self.new_burst)

    def _prune(self, now: float) -> None:
        """End the resume windows that passed; drop full buckets."""
        for sid, (_, until) in list(self._sessions.items()):
            if until is not None and until <= now:
                self.ended(sid)
        if now - self._pruned_at < PRUNE_EVERY_S:
            return
        self._pruned_at = now
        self._buckets = {
            k: b
            for k, b in self._buckets.items()
            if b.level(now, self.new_per_s, self.new_burst) < self.new_burst
        }


def _who(key: str) -> str:
    """A key as a refusal names it: the address, never a token's digest."""
    kind, _, value = key.partition(":")
    return f"address {value}" if kind == "addr" else "its API token"
