"""Access rules and data hygiene: Origin allow-list, idle timeout, no audio on disk.

The Origin and idle tests run against their own copy of the ingress (beside
the shared test app, with a stub embedding tier: no model load); the log
test drives a real session on the shared app and then searches everything
this Ray instance wrote for the audio and the embeddings.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from ray import serve
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from conftest import API_TOKEN, load16, needs_model, needs_speakers, to_s16, utterances
from test_faults import deploy_app

pytestmark = [needs_model, needs_speakers, pytest.mark.serve]
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
APP = f"sec{os.getpid()}"
IDLE_S = 2.0


@serve.deployment(name="EmbeddingDeployment", ray_actor_options={"num_cpus": 0})
class StubEmbedding:
    """Constant embeddings: enough for the ingress, no model."""

    async def embed(self, signals):
        return [np.ones(192, dtype=np.float32) for _ in signals]

    async def info(self):
        return {}


@pytest.fixture(scope="module")
def sec_server(server):
    env = {
        "DIGLETT_ALLOWED_ORIGINS": "https://ok.example, http://localhost:3000/",
        "DIGLETT_IDLE_TIMEOUT_S": str(IDLE_S),
    }
    prefix = deploy_app(APP, env, embedding=StubEmbedding)
    base = server["ws"].rsplit("/v1/stream", 1)[0]
    yield f"{base}{prefix}/v1/stream"
    serve.delete(APP)


def drain(ws, timeout: float = 30) -> tuple[list[dict], int | None]:
    out = []
    try:
        while True:
            out.append(json.loads(ws.recv(timeout=timeout)))
    except ConnectionClosed as exc:
        return out, exc.rcvd.code if exc.rcvd else None


@pytest.mark.parametrize(
    "origin",
    [None, "https://ok.example", "HTTPS://OK.example/", "http://localhost:3000"],
)
def test_allowed_origins(sec_server, origin):
    with connect(sec_server, origin=origin, additional_headers=AUTH) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "ready"


@pytest.mark.parametrize(
    "origin", ["https://evil.example", "https://ok.example.evil.com", "null"]
)
def test_disallowed_origin(sec_server, origin):
    with connect(sec_server, origin=origin, additional_headers=AUTH) as ws:
        msgs, code = drain(ws)
    assert code == 4401
    assert [m["code"] for m in msgs] == ["unauthorized"]
    assert "Origin" in msgs[0]["message"]


def test_idle_connection_is_closed(sec_server):
    t0 = time.monotonic()
    with connect(sec_server, additional_headers=AUTH) as ws:
        ready = json.loads(ws.recv(timeout=30))
        msgs, code = drain(ws)
    assert code == 4404 and [m["code"] for m in msgs] == ["session_expired"]
    assert IDLE_S <= time.monotonic() - t0 < IDLE_S + 10
    # The session ended with it: a resume finds nothing.
    q = f"?session={ready['session_id']}&resume_token={ready['resume_token']}"
    with connect(sec_server + q, additional_headers=AUTH) as ws:
        msgs, code = drain(ws)
    assert code == 4404


def test_busy_connection_is_not_idle(sec_server):
    with connect(sec_server, additional_headers=AUTH) as ws:
        json.loads(ws.recv(timeout=30))
        for _ in range(5):  # a frame every second for 2.5 idle periods
            ws.send(json.dumps({"type": "enroll_end"}))
            assert json.loads(ws.recv(timeout=30))["code"] == "bad_message"
            time.sleep(1.0)
        ws.send(json.dumps({"type": "end"}))
        msgs, code = drain(ws)
    assert code == 1000 and msgs[-1]["type"] == "summary"


FLOATS = re.compile(rb"(-?\d+\.\d+(e-?\d+)?[,\s]+){16}")
AUDIO_SUFFIXES = {".wav", ".npy", ".npz", ".pcm", ".raw", ".flac", ".pkl", ".pt"}


def test_no_audio_embeddings_or_tokens_in_logs_or_on_disk(server):
    import ray

    session_dir = Path(ray._private.worker._global_node.get_session_dir_path())
    u = utterances()
    x = load16(u["LS-19"][0])[: 5 * 16000]
    pcm = to_s16(x)
    # The protocol's query-string forms (what v1 clients send), which every
    # log must redact: the API token, then a resume by token in the URL.
    url = f"{server['ws']}?token={API_TOKEN}"
    with connect(url, max_size=2**24) as ws:
        ready = json.loads(ws.recv(timeout=60))
    sid, resume_token = ready["session_id"], ready["resume_token"]
    url = f"{url}&session={sid}&resume_token={resume_token}"
    with connect(url, max_size=2**24) as ws:
        assert json.loads(ws.recv(timeout=60))["session_id"] == sid
        ws.send(json.dumps({"type": "enroll", "speaker": "alice"}))
        for i in range(0, len(pcm), 16000):
            ws.send(pcm[i : i + 16000])
        ws.send(json.dumps({"type": "enroll_end"}))
        assert json.loads(ws.recv(timeout=120))["type"] == "enrolled"
        ws.send(json.dumps({"type": "stream"}))
        for i in range(0, len(pcm), 8000):
            ws.send(pcm[i : i + 8000])
        ws.send(b"\x01\x02\x03")  # a bad frame: its error must not echo bytes
        ws.send(json.dumps({"type": "end"}))
        msgs, code = drain(ws, 120)
    assert code == 1000
    time.sleep(2.0)  # let the log monitors flush
    # Distinctive stretches of the PCM sent, as bytes and as a repr would show.
    loud = int(np.argmax(np.abs(x)))
    probes = [pcm[2 * loud : 2 * loud + 32], pcm[40000:40032]]
    probes += [resume_token.encode(), API_TOKEN.encode()]  # secrets, never logged
    probes += [repr(p)[2:34].encode() for p in probes] + [
        p.hex().encode() for p in probes
    ]
    found = []
    for path in session_dir.rglob("*"):
        try:
            if not path.is_file() or path.stat().st_size > 200 * 2**20:
                continue
        except OSError:
            continue
        if path.suffix.lower() in AUDIO_SUFFIXES:
            found.append(f"{path}: audio-like file")
        if "sockets" in path.parts or path.suffix in {".so", ".pyc"}:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        for p in probes:
            if p in data:
                found.append(f"{path}: holds sent audio or a token ({p[:8]!r}…)")
        if path.suffix in {".log", ".out", ".err"} and FLOATS.search(data):
            found.append(f"{path}: a run of 16 numbers (an array dump?)")
    assert not found, found


def test_haproxys_admin_socket_is_closed_to_other_users(server):
    """Serve makes HAProxy's admin socket `mode 666 level admin`; it lives in
    a directory only the server's user may enter (serve_app/serve_env.py)."""
    import stat

    configured = Path(os.environ["RAY_SERVE_HAPROXY_SOCKET_PATH"])
    folder = configured.parent  # Serve puts each node's socket a level below
    deadline = time.monotonic() + 30
    while not (socks := [p for p in folder.rglob("*.sock") if p.is_socket()]):
        assert time.monotonic() < deadline, f"no socket under {folder}"
        time.sleep(0.5)
    assert any(p.name == configured.name for p in socks), socks
    st = folder.lstat()
    assert st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700


# ------------------------------------------------------- per-client limits
# Two more copies of the app (stub embedding tier), each with small limits:
# one behind a pretend load balancer that appends X-Forwarded-For (one
# trusted hop), one with two API tokens and no trusted hop.
OTHER_TOKEN = "other-token-9876543210"
LIMITS = {
    "DIGLETT_CLIENT_MAX_SESSIONS": "2",
    "DIGLETT_CLIENT_NEW_PER_S": "0.001",  # no refill within a test
    "DIGLETT_CLIENT_NEW_BURST": "3",
    "DIGLETT_SESSION_TTL_S": "60",
}


@pytest.fixture(scope="module")
def by_address(server):
    name = f"lima{os.getpid()}"
    prefix = deploy_app(
        name, {**LIMITS, "DIGLETT_FORWARDED_HOPS": "1"}, embedding=StubEmbedding
    )
    yield server["ws"].rsplit("/v1/stream", 1)[0] + prefix + "/v1/stream"
    serve.delete(name)


@pytest.fixture(scope="module")
def by_token(server):
    name = f"limt{os.getpid()}"
    env = {**LIMITS, "DIGLETT_API_TOKEN": f"{API_TOKEN},{OTHER_TOKEN}"}
    env.update(DIGLETT_CLIENT_NEW_PER_S="5", DIGLETT_CLIENT_NEW_BURST="50")
    prefix = deploy_app(name, env, embedding=StubEmbedding)
    yield server["ws"].rsplit("/v1/stream", 1)[0] + prefix + "/v1/stream"
    serve.delete(name)


def as_client(address: str | None = None, token: str = API_TOKEN) -> dict:
    """Headers of a client with `token`, as the load balancer forwards it
    from `address` (the client's own claim first, which must not count)."""
    headers = {"Authorization": f"Bearer {token}"}
    if address:
        headers["X-Forwarded-For"] = f"198.51.100.66, {address}"
    return headers


def refused(url: str, headers: dict) -> tuple[str, str, int | None]:
    with connect(url, additional_headers=headers) as ws:
        msgs, code = drain(ws)
    assert len(msgs) == 1, msgs
    return msgs[0]["code"], msgs[0]["message"], code


def ready(ws) -> dict:
    msg = json.loads(ws.recv(timeout=30))
    assert msg["type"] == "ready", msg
    return msg


def end(ws) -> None:
    ws.send(json.dumps({"type": "end"}))
    _, code = drain(ws)
    assert code == 1000


def test_sessions_per_address(by_address):
    a = as_client("203.0.113.7")
    with (
        connect(by_address, additional_headers=a) as w1,
        connect(by_address, additional_headers=a) as w2,
    ):
        ready(w1), ready(w2)
        code, message, close = refused(by_address, a)
        assert (code, close) == ("overloaded", 1013)
        assert "address 203.0.113.7" in message and "limit is 2" in message
        # Another address, and the same one with another claim in front.
        with connect(by_address, additional_headers=as_client("203.0.113.8")) as w:
            ready(w)
            end(w)
        end(w1), end(w2)
    with connect(by_address, additional_headers=a) as w:  # freed by `end`
        ready(w)
        end(w)


def test_new_sessions_per_second_per_address(by_address):
    c = as_client("203.0.113.9")
    for _ in range(3):  # the burst
        with connect(by_address, additional_headers=c) as ws:
            ready(ws)
            end(ws)
    code, message, close = refused(by_address, c)
    assert (code, close) == ("overloaded", 1013)
    assert "address 203.0.113.9" in message and "faster than 0.001/s" in message
    with connect(by_address, additional_headers=as_client("203.0.113.10")) as ws:
        ready(ws)
        end(ws)


def test_a_resume_is_not_refused_by_the_connection_rate(by_address):
    e = as_client("203.0.113.11")
    with connect(by_address, additional_headers=e) as ws:
        first = ready(ws)  # then dropped without `end`: resumable
    for _ in range(2):
        with connect(by_address, additional_headers=e) as ws:
            ready(ws)
            end(ws)
    assert "faster than" in refused(by_address, e)[1]
    q = f"?session={first['session_id']}&resume_token={first['resume_token']}"
    with connect(by_address + q, additional_headers=e) as ws:
        assert ready(ws)["session_id"] == first["session_id"]
        end(ws)


def test_sessions_per_token_when_there_are_several(by_token):
    one, other = as_client(token=API_TOKEN), as_client(token=OTHER_TOKEN)
    with (
        connect(by_token, additional_headers=one) as w1,
        connect(by_token, additional_headers=one) as w2,
    ):
        ready(w1), ready(w2)
        code, message, close = refused(by_token, one)
        assert (code, close) == ("overloaded", 1013)
        assert "its API token" in message and API_TOKEN not in message
        with connect(by_token, additional_headers=other) as w:
            ready(w)
            end(w)
        end(w1), end(w2)


def test_a_forwarded_for_is_not_believed_without_a_trusted_hop(by_token):
    """No trusted hop: a claimed X-Forwarded-For names no one, so claiming
    another client's address cannot use up its limit (through HAProxy from
    127.0.0.1, uvicorn puts the claim in the ASGI scope's client)."""
    claim = {"X-Forwarded-For": "203.0.113.7"}
    tokens = [API_TOKEN, OTHER_TOKEN, API_TOKEN, OTHER_TOKEN]
    sockets = [
        connect(by_token, additional_headers={**as_client(token=t), **claim})
        for t in tokens
    ]
    try:
        for ws in sockets:
            ready(ws)
    finally:
        for ws in sockets:
            end(ws)
