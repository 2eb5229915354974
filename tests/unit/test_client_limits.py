"""Per-client limits in milliseconds: who a client is, sessions held, new
sessions per second, resume windows and bounded bookkeeping."""

from __future__ import annotations

import pytest

from diglett.engine.access import matching_token
from diglett.engine.client_limits import (
    PRUNE_EVERY_S,
    ClientLimits,
    address_key,
    client_address,
    client_keys,
    forwarded_for,
    token_key,
)
from diglett.settings import Settings

A, B = "addr:203.0.113.7", "addr:203.0.113.8"


def test_address_keys_skip_loopback_and_group_ipv6_by_64():
    assert address_key("203.0.113.7") == A
    assert address_key("::ffff:203.0.113.7") == A
    for shared in ("127.0.0.1", "127.8.0.1", "::1", "::ffff:127.0.0.1", "", None):
        assert address_key(shared) is None
    assert address_key("not an address") is None
    one = address_key("2001:db8:1:2::5")
    assert one == address_key("2001:db8:1:2:ffff::9") == "addr:2001:db8:1:2::/64"
    assert one != address_key("2001:db8:1:3::5")


def test_forwarded_for_joins_every_header_in_order():
    headers = [
        (b"host", b"x"),
        (b"x-forwarded-for", b"198.51.100.1, 10.0.0.2"),
        (b"X-Forwarded-For", b" 203.0.113.7 "),
    ]
    assert forwarded_for(headers) == ["198.51.100.1", "10.0.0.2", "203.0.113.7"]
    assert forwarded_for([(b"x-forwarded-for", b" , ")]) == []


def test_a_client_sent_forwarded_for_is_not_believed_without_trusted_hops():
    claim = ["198.51.100.66"]
    # Through HAProxy the peer is HAProxy (or, from 127.0.0.1, uvicorn has
    # put the claim there already): unknown either way.
    assert client_address(False, "198.51.100.66", claim, 0) is None
    assert client_address(False, "10.1.2.3", [], 0) is None
    # Through Serve's Python proxy the peer is the client, unless a header
    # came with it (uvicorn may have replaced the peer by the claim).
    assert client_address(True, "203.0.113.7", [], 0) == "203.0.113.7"
    assert client_address(True, "198.51.100.66", claim, 0) is None


def test_trusted_hops_take_the_entry_the_nearest_trusted_proxy_added():
    chain = ["198.51.100.66", "203.0.113.7"]  # a client's claim, then the LB's
    assert client_address(False, "127.0.0.1", chain, 1) == "203.0.113.7"
    assert client_address(True, "10.0.0.9", chain, 2) == "198.51.100.66"
    assert client_address(False, "127.0.0.1", chain[1:], 2) is None
    assert client_address(False, "127.0.0.1", [], 1) is None


def test_a_token_identifies_a_client_only_among_several():
    assert client_keys("tok-a", 1, None) == []
    assert client_keys("tok-a", 2, None) == [token_key("tok-a")]
    assert client_keys("tok-a", 2, "203.0.113.7") == [token_key("tok-a"), A]
    assert client_keys(None, 0, "203.0.113.7") == [A]
    assert "tok-a" not in token_key("tok-a") and token_key("a") != token_key("b")


def test_several_api_tokens_each_match():
    s = Settings(api_token="tok-a, tok-b,")
    assert s.api_tokens == ("tok-a", "tok-b")
    assert matching_token("tok-b", s.api_tokens) == "tok-b"
    assert matching_token("tok-a,tok-b", s.api_tokens) is None
    assert matching_token("", s.api_tokens) is None
    assert Settings().api_tokens == ()


def test_sessions_held_are_limited_per_key_and_others_are_unaffected():
    lim = ClientLimits(max_sessions=2, new_per_s=0, new_burst=0)
    for sid in ("s1", "s2"):
        assert lim.refuse_new([A], 0.0) is None
        lim.opened(sid, [A])
    why = lim.refuse_new([A], 0.0)
    assert why and "address 203.0.113.7" in why and "limit is 2" in why
    assert lim.refuse_new([B], 0.0) is None
    assert lim.refuse_new([], 0.0) is None  # no key: only the global limit
    lim.ended("s1")
    assert lim.refuse_new([A], 0.0) is None


def test_a_token_is_never_named_in_a_refusal():
    lim = ClientLimits(max_sessions=1, new_per_s=0, new_burst=0)
    key = token_key("secret-token")
    lim.opened("s1", [key])
    why = lim.refuse_new([key], 0.0)
    assert why and "its API token" in why and key.split(":")[1] not in why


def test_a_dropped_session_counts_until_its_resume_window_ends():
    lim = ClientLimits(max_sessions=1, new_per_s=0, new_burst=0)
    lim.opened("s1", [A])
    lim.dropped("s1", resumable_until=60.0)
    assert lim.refuse_new([A], 59.0) is not None
    assert lim.refuse_new([A], 60.0) is None
    assert lim.held(A) == 0


def test_a_resume_does_not_count_its_session_twice():
    lim = ClientLimits(max_sessions=1, new_per_s=0, new_burst=0)
    lim.opened("s1", [A])
    lim.dropped("s1", 60.0)
    lim.opened("s1", [A])  # resumed here
    assert lim.held(A) == 1
    lim.dropped("s1", 120.0)
    assert lim.refuse_new([A], 61.0) is not None  # the new window holds
    # A session this replica never counted (opened on another) counts now.
    lim.opened("elsewhere", [B])
    assert lim.held(B) == 1


def test_new_sessions_per_second_refill_and_other_keys_keep_their_own():
    lim = ClientLimits(max_sessions=0, new_per_s=2.0, new_burst=3)
    assert [lim.refuse_new([A], 0.0) for _ in range(3)] == [None] * 3
    why = lim.refuse_new([A], 0.0)
    assert why and "faster than 2/s (burst 3)" in why
    assert lim.refuse_new([B], 0.0) is None
    assert lim.refuse_new([A], 0.49) is not None
    assert lim.refuse_new([A], 0.5) is None  # one token back after 0.5 s
    assert lim.refuse_new([A], 0.5) is not None


def test_a_refusal_spends_nothing_and_a_failed_resume_spends_one():
    lim = ClientLimits(max_sessions=1, new_per_s=1.0, new_burst=2)
    lim.opened("s1", [A])
    for _ in range(5):  # refused for sessions held: no token spent
        assert lim.refuse_new([A, B], 0.0) is not None
    assert lim.refuse_new([B], 0.0) is None  # B still had its whole burst
    lim.charge([B], 0.0)
    assert "faster than" in (lim.refuse_new([B], 0.0) or "")
    lim.charge([B], 0.0)  # never below 0: one second refills one
    assert lim.refuse_new([B], 1.0) is None


def test_bookkeeping_forgets_idle_clients():
    lim = ClientLimits(max_sessions=5, new_per_s=1.0, new_burst=2)
    for i in range(100):
        assert lim.refuse_new([f"addr:198.51.100.{i}"], 0.0) is None
    assert lim.tracked_keys() == 100
    lim.refuse_new([A], PRUNE_EVERY_S + 2.0)  # all refilled by then
    assert lim.tracked_keys() == 1
    lim.opened("s1", [B])
    lim.dropped("s1", 5.0)
    lim.refuse_new([A], 2 * PRUNE_EVERY_S + 4.0)
    assert lim.held(B) == 0 and lim.tracked_keys() == 1  # A: just charged


@pytest.mark.parametrize(
    "env",
    [
        {"DIGLETT_CLIENT_MAX_SESSIONS": "-1"},
        {"DIGLETT_CLIENT_NEW_PER_S": "-0.5"},
        {"DIGLETT_FORWARDED_HOPS": "-1"},
    ],
)
def test_negative_limits_are_refused(env):
    with pytest.raises(ValueError):
        Settings.from_env(env, dotenv=False)
