"""End to end: the Serve app on local Ray, driven over the real protocol.

Every message type and every error code of protocol v1 goes over a real
WebSocket to the real ingress, SessionActors and embedding replica.
"""

from __future__ import annotations

import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
import soundfile as sf
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect
from websockets.typing import Subprotocol

from actors.session_actor import actor_name
from conftest import (
    API_TOKEN,
    E2E_ENV,
    load16,
    needs_model,
    needs_speakers,
    to_s16,
    utterances,
)

pytestmark = [needs_model, needs_speakers, pytest.mark.serve]
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


def open_ws(server, query: str = "", headers=AUTH):
    url = server["ws"] + (("?" + query) if query else "")
    return connect(url, additional_headers=headers, open_timeout=30, max_size=2**24)


def recv(ws, timeout: float = 60.0) -> dict:
    return json.loads(ws.recv(timeout=timeout))


def drain(ws, timeout: float = 60.0) -> tuple[list[dict], int | None]:
    """All messages until the server closes; returns (messages, close code)."""
    out = []
    try:
        while True:
            out.append(recv(ws, timeout))
    except ConnectionClosed as exc:
        return out, exc.rcvd.code if exc.rcvd else None


def send_audio(ws, x: np.ndarray, chunk_s: float = 0.25) -> None:
    n = int(chunk_s * 16000)
    for i in range(0, x.size, n):
        ws.send(to_s16(x[i : i + n]))


def stream_and_end(ws, x: np.ndarray) -> tuple[list[dict], int | None]:
    """Stream `x`, then `end`; all messages until the close, and its code."""
    ws.send(json.dumps({"type": "stream"}))
    send_audio(ws, x)
    ws.send(json.dumps({"type": "end"}))
    return drain(ws)


def enroll(ws, name: str, x: np.ndarray) -> dict:
    ws.send(json.dumps({"type": "enroll", "speaker": name}))
    send_audio(ws, x)
    ws.send(json.dumps({"type": "enroll_end"}))
    return recv(ws)


@pytest.fixture(scope="module")
def voices():
    u = utterances()
    return {
        "a_enroll": load16(u["LS-19"][0])[: 5 * 16000],
        "a_test": load16(u["LS-19"][3])[: 4 * 16000],
        "b_enroll": load16(u["LS-26"][0])[: 5 * 16000],
        "b_test": load16(u["LS-26"][3])[: 4 * 16000],
        "c_test": load16(u["VCTK-p227"][0])[: 4 * 16000],
    }


def test_http_endpoints(server):
    with httpx.Client(base_url=server["http"], timeout=60) as c:
        assert c.get("/healthz").json() == {"status": "ok", "route": "direct"}
        denied = c.get("/v1/info")  # a token is configured: every /v1 route needs it
        assert denied.status_code == 401 and denied.json()["code"] == "unauthorized"
        assert c.get("/v1/info", params={"token": "wrong"}).status_code == 401
        assert c.get("/v1/info", params={"token": API_TOKEN}).status_code == 200
        info = c.get("/v1/info", headers=AUTH).json()
        assert info["protocol"] == 1 and info["sample_rate"] == 16000
        assert info["model"] == "speechbrain/spkrec-ecapa-voxceleb"
        assert {"window_s", "hop_s", "threshold", "max_speakers"} <= set(info)
        assert c.get("/docs").status_code == 200
        assert "/v1/embeddings" in c.get("/openapi.json").json()["paths"]


def test_healthz_tells_requests_through_serves_proxy_from_direct_ones(server):
    """HAProxy's fallback, Serve's Python proxy, is what a connection takes
    before HAProxy lists the ingress; `route` lets `diglett serve` and the
    benchmarks wait for the direct path (serve_app/serve_env.py)."""
    from ray.serve._private.constants import RAY_SERVE_FALLBACK_PROXY_HTTP_PORT

    fallback = f"http://127.0.0.1:{RAY_SERVE_FALLBACK_PROXY_HTTP_PORT}"
    assert httpx.get(fallback + "/healthz", timeout=60).json() == {
        "status": "ok",
        "route": "proxy",
    }
    assert httpx.get(server["http"] + "/healthz", timeout=60).json()["route"] == (
        "direct"
    )


def test_embeddings_endpoint(server, voices):
    # 48 kHz stereo in: mixed to mono and resampled by the server.
    x16 = voices["a_test"]
    x48 = np.repeat(x16, 3)
    buf = io.BytesIO()
    sf.write(buf, np.stack([x48, x48], axis=1), 48000, format="WAV")
    wav = buf.getvalue()
    with httpx.Client(base_url=server["http"], timeout=120) as c:
        denied = c.post("/v1/embeddings", content=wav)
        assert denied.status_code == 401 and denied.json()["code"] == "unauthorized"
    with httpx.Client(base_url=server["http"], timeout=120, headers=AUTH) as c:
        r1 = c.post("/v1/embeddings", files={"file": ("a.wav", wav, "audio/wav")})
        assert r1.status_code == 200, r1.text
        body = r1.json()
        assert body["dim"] == 192 and len(body["embedding"]) == 192
        assert body["duration_s"] == pytest.approx(4.0, abs=0.01)
        assert -40 < body["level_dbfs"] < 0
        r2 = c.post(
            "/v1/embeddings", content=wav, headers={"Content-Type": "audio/wav"}
        )
        assert r2.status_code == 200
        e1, e2 = np.array(body["embedding"]), np.array(r2.json()["embedding"])
        assert np.allclose(e1, e2, atol=1e-4)
        assert np.linalg.norm(e1) > 1.5  # raw, not length-normalised
        bad = c.post("/v1/embeddings", content=b"RIFF....not a wav")
        assert bad.status_code == 400 and bad.json()["code"] == "bad_audio"
        nofield = c.post("/v1/embeddings", files={"other": ("a.wav", wav)})
        assert nofield.status_code == 400 and nofield.json()["code"] == "bad_audio"
        long = io.BytesIO()
        sf.write(long, np.zeros(61 * 8000, dtype=np.float32), 8000, format="WAV")
        r413 = c.post("/v1/embeddings", content=long.getvalue())
        assert r413.status_code == 413


def test_an_oversized_upload_is_refused_before_it_is_read(server):
    """A declared Content-Length over the cap gets 413 at once: the server
    does not wait for (or buffer) the gigabytes announced."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(server["http"])
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {API_TOKEN}\r\n".encode()
            + b"Content-Type: audio/wav\r\nContent-Length: 9000000000\r\n\r\nRIFF"
        )
        head = sock.recv(4096).decode("latin-1")
    assert head.startswith("HTTP/1.1 413"), head[:200]


def test_full_conversation(server, voices):
    with open_ws(server) as ws:
        ready = recv(ws)
        assert ready["type"] == "ready" and ready["protocol"] == 1
        assert len(ready["session_id"]) >= 32 and len(ready["resume_token"]) >= 32
        for key in ("window_s", "hop_s", "enroll_min_s", "enroll_max_s", "threshold"):
            assert key in ready
        got = enroll(ws, "alice", voices["a_enroll"])
        assert got["type"] == "enrolled" and got["speaker"] == "alice"
        assert got["duration_s"] == pytest.approx(5.0, abs=0.01)
        assert 2.0 < got["speech_s"] <= 5.0 and isinstance(got["warnings"], list)
        assert enroll(ws, "bob", voices["b_enroll"])["type"] == "enrolled"
        ws.send(json.dumps({"type": "stream"}))
        silence = np.zeros(16000, dtype=np.float32)
        conv = np.concatenate([voices["a_test"], silence, voices["b_test"]])
        send_audio(ws, conv, chunk_s=0.1)
        ws.send(json.dumps({"type": "end"}))
        msgs, code = drain(ws)
    assert code == 1000
    labels = [m for m in msgs if m["type"] == "label"]
    summary = msgs[-1]
    assert summary["type"] == "summary"
    assert [m["seq"] for m in labels] == list(range(len(labels)))
    assert len(labels) == conv.size // 8000
    for prev, nxt in zip(labels, labels[1:]):
        assert nxt["start_s"] == prev["end_s"]
    for m in labels:
        assert m["latency_ms"] >= 0 and -120 <= m["level_dbfs"] <= 0
        if m["label"] != "silence":
            assert set(m["scores"]) == {"alice", "bob"}
    first = [m["label"] for m in labels[2:8]]
    last = [m["label"] for m in labels[-6:]]
    assert first.count("alice") >= 5, first
    assert last.count("bob") >= 5, last
    assert "silence" in [m["label"] for m in labels[8:10]]
    assert summary["labels"] == len(labels)
    assert summary["audio_s"] == pytest.approx(conv.size / 16000, abs=1e-3)
    assert sum(summary["talk_s"].values()) == pytest.approx(summary["audio_s"])


def test_format_48k_float_and_restart(server, voices):
    with open_ws(server) as ws:
        recv(ws)
        ws.send(
            json.dumps(
                {"type": "format", "sample_rate": 48000, "encoding": "pcm_f32le"}
            )
        )
        ok = recv(ws)
        assert ok == {
            "type": "format_ok",
            "sample_rate": 48000,
            "encoding": "pcm_f32le",
        }
        x48 = np.interp(
            np.arange(voices["a_enroll"].size * 3) / 3,
            np.arange(voices["a_enroll"].size),
            voices["a_enroll"],
        ).astype("<f4")
        ws.send(json.dumps({"type": "enroll", "speaker": "alice"}))
        for i in range(0, x48.size, 24000):
            ws.send(x48[i : i + 24000].tobytes())
        ws.send(json.dumps({"type": "enroll_end"}))
        assert recv(ws)["type"] == "enrolled"
        ws.send(json.dumps({"type": "format", "sample_rate": 16000}))
        assert recv(ws)["code"] == "bad_message"  # after audio has flowed
        ws.send(json.dumps({"type": "stream"}))
        ws.send(np.zeros(48000 + 24000, dtype="<f4")[:48000].tobytes())  # 1 s
        ws.send(np.zeros(12000, dtype="<f4").tobytes())  # 0.25 s
        ws.send(json.dumps({"type": "stream"}))  # ends the stream, restarts
        first = [recv(ws) for _ in range(3)]
        assert [m["seq"] for m in first] == [0, 1, 2]
        assert first[-1]["end_s"] == pytest.approx(1.25, abs=0.01)
        assert all(m["label"] == "silence" for m in first)
        assert all("scores" not in m for m in first)
        ws.send(np.zeros(24000, dtype="<f4").tobytes())
        ws.send(json.dumps({"type": "end"}))
        msgs, code = drain(ws)
    assert [m["seq"] for m in msgs if m["type"] == "label"] == [0]
    assert msgs[-1]["type"] == "summary" and msgs[-1]["labels"] == 4
    assert code == 1000


def test_recoverable_errors(server, voices):
    with open_ws(server) as ws:
        recv(ws)
        cases = [
            ("not json", "bad_message"),
            ("[1, 2]", "bad_message"),
            ('{"type": "dance"}', "bad_message"),
            ('{"type": "enroll", "speaker": 7}', "bad_message"),
            ('{"type": "enroll", "speaker": "noise"}', "bad_message"),
            ('{"type": "enroll", "speaker": "a/b"}', "bad_message"),
            ('{"type": "enroll_end"}', "bad_message"),
            ('{"type": "stream"}', "not_enrolled"),
            ('{"type": "format", "sample_rate": 4000}', "unsupported_format"),
            (
                '{"type": "format", "sample_rate": 16000, "encoding": "mp3"}',
                "unsupported_format",
            ),
            ('{"type": "format", "sample_rate": "16000"}', "bad_message"),
            ("[" * 100000 + "]" * 100000, "bad_message"),
        ]
        for text, code in cases:
            ws.send(text)
            m = recv(ws)
            assert m["type"] == "error" and m["code"] == code, (text[:40], m)
            assert m["message"]
        # Stray audio: only the first frame after a control message is answered.
        ws.send(b"\x00\x00" * 10)
        ws.send(b"\x00\x00" * 10)
        assert recv(ws)["code"] == "bad_message"
        ws.send(json.dumps({"type": "enroll", "speaker": "alice"}))
        ws.send(b"\x00\x00\x00")  # a byte short of whole samples
        assert recv(ws)["code"] == "bad_audio"
        ws.send(json.dumps({"type": "stream"}))  # still enrolling
        assert recv(ws)["code"] == "bad_message"
        send_audio(ws, voices["a_enroll"][: 2 * 16000])
        ws.send(json.dumps({"type": "enroll_end"}))
        assert recv(ws)["code"] == "enroll_too_short"
        assert enroll(ws, "alice", voices["a_enroll"])["type"] == "enrolled"
        assert enroll(ws, "bob", voices["b_enroll"])["type"] == "enrolled"
        ws.send(json.dumps({"type": "enroll", "speaker": "carol"}))
        assert recv(ws)["code"] == "too_many_speakers"
        # Re-enrolling an existing name replaces it.
        got = enroll(ws, "alice", voices["a_enroll"])
        assert got["type"] == "enrolled" and got["speaker"] == "alice"
        ws.send(
            json.dumps(
                {"type": "format", "sample_rate": 16000, "encoding": "pcm_f32le"}
            )
        )
        assert recv(ws)["code"] == "bad_message"
        ws.send(json.dumps({"type": "end"}))
        msgs, code = drain(ws)
    assert msgs[-1]["type"] == "summary" and code == 1000


def test_bad_float_audio(server, voices):
    with open_ws(server) as ws:
        recv(ws)
        ws.send(
            json.dumps(
                {"type": "format", "sample_rate": 16000, "encoding": "pcm_f32le"}
            )
        )
        recv(ws)
        ws.send(json.dumps({"type": "enroll", "speaker": "alice"}))
        ws.send(np.array([0.1, np.nan, 0.2], dtype="<f4").tobytes())
        assert recv(ws)["code"] == "bad_audio"
        ws.send(np.array([np.inf], dtype="<f4").tobytes())
        assert recv(ws)["code"] == "bad_audio"


@pytest.mark.parametrize(
    "query,headers",
    [("", {}), ("", {"Authorization": "Bearer wrong"}), ("token=wrong", {})],
)
def test_unauthorized(server, query, headers):
    with open_ws(server, query, headers) as ws:
        msgs, code = drain(ws)
    assert code == 4401
    assert [m["type"] for m in msgs] == ["error"] and msgs[0]["code"] == "unauthorized"


def test_token_in_query(server):
    with open_ws(server, f"token={API_TOKEN}", {}) as ws:
        assert recv(ws)["type"] == "ready"


def test_frame_too_large(server):
    with open_ws(server) as ws:
        recv(ws)
        ws.send(json.dumps({"type": "enroll", "speaker": "alice"}))
        ws.send(b"\x00\x00" * 16000)  # exactly 1 s: fine
        ws.send(b"\x00\x00" * 16001)
        msgs, code = drain(ws)
    assert code == 1009 and msgs[-1]["code"] == "frame_too_large"


def test_rate_exceeded(server):
    with open_ws(server) as ws:
        recv(ws)
        ws.send(json.dumps({"type": "enroll", "speaker": "alice"}))
        for _ in range(150):  # 150 s of audio at once: past the 60 s burst
            try:
                ws.send(b"\x00\x00" * 16000)
            except ConnectionClosed:
                break
        msgs, code = drain(ws)
    assert code == 1008 and msgs[-1]["code"] == "rate_exceeded"


def test_session_expired(server):
    with open_ws(server, "session=deadbeef&resume_token=nope") as ws:
        msgs, code = drain(ws)
    assert code == 4404 and msgs[0]["code"] == "session_expired"


def test_resume_keeps_enrollments(server, voices):
    with open_ws(server) as ws:
        ready = recv(ws)
        assert enroll(ws, "alice", voices["a_enroll"])["type"] == "enrolled"
    sid, token = ready["session_id"], ready["resume_token"]
    with open_ws(server, f"session={sid}&resume_token=wrong") as ws:
        msgs, code = drain(ws)
        assert code == 4404
    with open_ws(server, f"session={sid}&resume_token={token}") as ws:
        again = recv(ws)
        assert again["type"] == "ready" and again["session_id"] == sid
        msgs, code = stream_and_end(ws, voices["a_test"][:16000])
    labels = [m for m in msgs if m["type"] == "label"]
    assert len(labels) == 2 and code == 1000
    assert all("alice" in m.get("scores", {"alice": 0}) for m in labels)


def test_secrets_outside_the_url_header_and_subprotocol_forms(server, voices):
    """Programs send the API token and the resume token as headers; browsers,
    which cannot, as WebSocket subprotocols (the server answers diglett.v1)."""
    url = server["ws"]
    proto = [Subprotocol("diglett.v1"), Subprotocol(f"diglett.token.{API_TOKEN}")]
    with connect(url, subprotocols=proto, open_timeout=30) as ws:
        assert ws.subprotocol == "diglett.v1"
        ready = recv(ws)
        assert enroll(ws, "alice", voices["a_enroll"])["type"] == "enrolled"
    sid, token = ready["session_id"], ready["resume_token"]
    resume = proto + [Subprotocol(f"diglett.resume.{token}")]
    with connect(f"{url}?session={sid}", subprotocols=resume, open_timeout=30) as ws:
        assert recv(ws)["session_id"] == sid
    with open_ws(
        server, f"session={sid}", {**AUTH, "X-Diglett-Resume-Token": "no"}
    ) as ws:
        assert drain(ws)[1] == 4404
    headers = {**AUTH, "X-Diglett-Resume-Token": token}
    with open_ws(server, f"session={sid}", headers) as ws:
        assert recv(ws)["session_id"] == sid
        msgs, code = stream_and_end(ws, voices["a_test"][:16000])
    assert code == 1000 and all(
        "alice" in m.get("scores", {"alice": 0}) for m in msgs if m["type"] == "label"
    )


def test_resume_after_ttl_fails(server, voices):
    with open_ws(server) as ws:
        ready = recv(ws)
    time.sleep(7)  # TTL is 4 s in the test server
    q = f"session={ready['session_id']}&resume_token={ready['resume_token']}"
    with open_ws(server, q) as ws:
        msgs, code = drain(ws)
    assert code == 4404


def test_internal_error_when_session_dies(server):
    import ray

    from actors.session_actor import NAMESPACE, actor_name

    with open_ws(server) as ws:
        ready = recv(ws)
        # One answered call first: a session whose actor died before any
        # call is re-created unnoticed (the pooled-actor test below).
        ws.send(json.dumps({"type": "format", "sample_rate": 16000}))
        assert recv(ws)["type"] == "format_ok"
        ray.kill(ray.get_actor(actor_name(ready["session_id"]), namespace=NAMESPACE))
        time.sleep(1.0)
        try:  # the ingress may already have noticed, and closed
            ws.send(json.dumps({"type": "stream"}))
        except ConnectionClosed:
            pass
        msgs, code = drain(ws)
    assert code == 1011 and msgs[-1]["code"] == "internal"


def test_stalled_embedding_tier_is_overloaded_and_the_session_resumes(server, voices):
    """The embedding replica stops answering (SIGSTOP: a hung GPU, a
    stalled node): after EMBED_TIMEOUT_S the client is told `overloaded`
    (1013, try again later), not left waiting; once the tier answers again,
    the session resumes with its enrollments."""
    import os
    import signal

    from ray import serve

    from actors.session_actor import EMBED_TIMEOUT_S

    handle = serve.get_deployment_handle("EmbeddingDeployment", app_name="diglett")
    pid = handle.info.remote().result(timeout_s=30)["pid"]
    with open_ws(server) as ws:
        ready = recv(ws)
        assert enroll(ws, "alice", voices["a_enroll"])["type"] == "enrolled"
        assert enroll(ws, "bob", voices["b_enroll"])["type"] == "enrolled"
        ws.send(json.dumps({"type": "stream"}))
        send_audio(ws, voices["a_test"][:16000])
        assert recv(ws)["type"] == "label"
        os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            send_audio(ws, voices["a_test"][16000:32000])
            msgs, code = drain(ws, timeout=EMBED_TIMEOUT_S + 30)
            waited = time.monotonic() - t0
        finally:
            os.kill(pid, signal.SIGCONT)
    errors = [m for m in msgs if m["type"] == "error"]
    assert code == 1013 and [e["code"] for e in errors] == ["overloaded"], msgs
    assert "resume_token" in errors[0]["message"]
    assert EMBED_TIMEOUT_S - 1 <= waited <= EMBED_TIMEOUT_S + 10
    q = f"session={ready['session_id']}&resume_token={ready['resume_token']}"
    with open_ws(server, q) as ws:  # within the test server's 4 s TTL
        assert recv(ws)["session_id"] == ready["session_id"]
        msgs, code = stream_and_end(ws, voices["b_test"][:32000])
    labels = [m for m in msgs if m["type"] == "label" and m["label"] != "silence"]
    assert code == 1000 and labels
    assert all(set(m["scores"]) == {"alice", "bob"} for m in labels)
    assert [m["label"] for m in labels].count("bob") >= len(labels) / 2, labels


def test_overloaded(server):
    """DIGLETT_MAX_SESSIONS=8 in the test server: open connections and
    dropped sessions that may still resume count until their TTL."""
    ttl = float(E2E_ENV["DIGLETT_SESSION_TTL_S"])
    time.sleep(ttl + 1.0)  # earlier tests' dropped sessions expire
    opened = []
    try:
        for _ in range(8):
            ws = open_ws(server)
            assert recv(ws)["type"] == "ready"
            opened.append(ws)
        with open_ws(server) as ws:
            msgs, code = drain(ws)
        assert code == 1013 and msgs[0]["code"] == "overloaded"
    finally:
        for ws in opened:
            ws.close()
    time.sleep(1.0)
    with open_ws(server) as ws:  # eight dropped sessions, still resumable
        msgs, code = drain(ws)
    assert code == 1013 and msgs[0]["code"] == "overloaded"
    time.sleep(ttl + 1.0)
    with open_ws(server) as ws:
        assert recv(ws)["type"] == "ready"


def test_two_sessions_are_isolated(server, voices):
    results: dict[str, list[dict]] = {}

    def run(key: str, names: list[str], test: np.ndarray) -> None:
        with open_ws(server) as ws:
            recv(ws)
            for n in names:
                assert enroll(ws, n, voices[f"{n[0]}_enroll"])["type"] == "enrolled"
            ws.send(json.dumps({"type": "stream"}))
            send_audio(ws, test, chunk_s=0.1)
            ws.send(json.dumps({"type": "end"}))
            results[key] = drain(ws)[0]

    threads = [
        threading.Thread(target=run, args=("one", ["alice", "bob"], voices["a_test"])),
        threading.Thread(target=run, args=("two", ["bea"], voices["b_test"])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    for key, names in (("one", {"alice", "bob"}), ("two", {"bea"})):
        labels = [m for m in results[key] if m["type"] == "label"]
        assert labels, key
        for m in labels:
            assert set(m.get("scores", names)) == names
    one = [m["label"] for m in results["one"] if m["type"] == "label"]
    two = [m["label"] for m in results["two"] if m["type"] == "label"]
    assert one.count("alice") >= len(one) - 3
    assert two.count("bea") >= len(two) - 3


def test_backlog_larger_than_a_batch(server, voices):
    """A request with more windows than `max_batch_size` (a client's backlog)
    is embedded in batch-sized parts, in order, not refused by `@serve.batch`."""
    from ray import serve

    x = voices["a_enroll"]
    n = 40  # > the default batch size of 32
    assert x.size >= 24000 + (n - 1) * 400
    windows = [x[k * 400 : k * 400 + 24000] for k in range(n)]
    handle = serve.get_deployment_handle("EmbeddingDeployment", app_name="diglett")
    together = handle.embed.remote(windows).result(timeout_s=120)
    alone = [handle.embed.remote([w]).result(timeout_s=60)[0] for w in windows[::13]]
    assert len(together) == n
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    sims = np.array([[np.dot(unit(g), unit(w)) for w in alone] for g in together[::13]])
    # In order (each part's result is its own window's), and the same values
    # up to int8's per-batch activation scales (0.9925 seen; fp32: 0.9999).
    assert list(sims.argmax(axis=1)) == list(range(len(alone)))
    assert sims.diagonal().min() > 0.98


def test_backlog_past_the_bound_is_overloaded(server, voices):
    """Audio sent far faster than the session labels it (96 kHz f32, 15 MB at
    once; within the rate limit's 60 s burst) ends with `overloaded`, instead
    of piling up in the ingress's memory."""
    rng = np.random.default_rng(0)
    frame = (0.3 * rng.standard_normal(96000)).astype("<f4").tobytes()
    fmt = {"type": "format", "sample_rate": 96000, "encoding": "pcm_f32le"}
    with open_ws(server) as ws:
        recv(ws)
        ws.send(json.dumps(fmt))
        assert recv(ws)["type"] == "format_ok"
        ws.send(json.dumps({"type": "enroll", "speaker": "alice"}))
        speech = np.repeat(voices["a_enroll"], 6).astype("<f4")  # 96 kHz
        for i in range(0, speech.size, 48000):
            ws.send(speech[i : i + 48000].tobytes())
        ws.send(json.dumps({"type": "enroll_end"}))
        assert recv(ws)["type"] == "enrolled"
        ws.send(json.dumps({"type": "stream"}))
        for _ in range(40):
            try:
                ws.send(frame)
            except ConnectionClosed:
                break
        msgs, code = drain(ws)
    assert code == 1013 and msgs[-1]["code"] == "overloaded"
    assert "real time" in msgs[-1]["message"]


def session_actor_names() -> set[str]:
    """The names of the live SessionActors (sessions and the warm pool)."""
    import ray

    from actors.session_actor import NAMESPACE

    return {
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == NAMESPACE and a["name"].startswith("session-")
    }


def full_pool(pool: int) -> set[str]:
    """The names of the live SessionActors, once there are `pool` of them
    and the set held still for 2 s (or after 90 s): with no session open,
    the warm pool. Sessions an earlier test dropped live on for the test
    server's TTL and are counted until they end, so it waits that out."""
    time.sleep(float(E2E_ENV["DIGLETT_SESSION_TTL_S"]) + 1.0)
    deadline = time.monotonic() + 90
    last: set[str] = set()
    while time.monotonic() < deadline:
        names = session_actor_names()
        if len(names) >= pool and names == last:
            return names
        last = names
        time.sleep(2.0)
    return session_actor_names()


def test_new_session_comes_from_the_warm_pool(server):
    """A new connection gets an already started SessionActor (no worker
    start-up on the path to `ready`), and the pool refills."""
    from diglett.settings import Settings

    pool = Settings.from_env().session_pool
    before = full_pool(pool)
    assert len(before) >= pool
    with open_ws(server) as ws:
        sid = recv(ws)["session_id"]
    assert actor_name(sid) in before


def test_a_cleanly_ended_session_hands_its_actor_on_reset(server, voices):
    """After `end`, the session's SessionActor goes back to the warm pool,
    first out, reset: the next new session runs in the same process under
    an id that names the same actor, with none of the old session's
    enrollments; neither the old session nor the old token resumes."""
    import ray

    from actors.session_actor import NAMESPACE, recycled_session_id

    def pid_of(sid: str) -> int:
        actor = ray.get_actor(actor_name(sid), namespace=NAMESPACE)
        return ray.get(actor.stats.remote(), timeout=30)["pid"]

    with open_ws(server) as ws:
        ready = recv(ws)
        assert enroll(ws, "alice", voices["a_enroll"])["type"] == "enrolled"
        # A session that has not ended refuses to be recycled.
        live = ray.get_actor(actor_name(ready["session_id"]), namespace=NAMESPACE)
        again = recycled_session_id(ready["session_id"])
        assert ray.get(live.recycle.remote(again, "x"), timeout=30) == 0
        msgs, code = stream_and_end(ws, voices["a_test"][:16000])
        assert code == 1000 and all(
            set(m.get("scores", {"alice": 0})) == {"alice"}
            for m in msgs
            if m["type"] == "label"
        )
    old, token = ready["session_id"], ready["resume_token"]
    pid = pid_of(old)  # alive after its session ended (it used to be killed)
    deadline = time.monotonic() + 20  # the ingress recycles after the close
    while True:
        ws = open_ws(server)
        nxt = recv(ws)
        if nxt["session_id"] == recycled_session_id(old):
            break
        ws.close()
        assert time.monotonic() < deadline, "the ended session's actor never came back"
        time.sleep(0.2)
    with ws:
        assert nxt["resume_token"] != token and pid_of(nxt["session_id"]) == pid
        ws.send(json.dumps({"type": "stream"}))
        assert recv(ws)["code"] == "not_enrolled"
        assert enroll(ws, "bob", voices["b_enroll"])["type"] == "enrolled"
        msgs, code = stream_and_end(ws, voices["b_test"][:16000])
    scored = [m["scores"] for m in msgs if "scores" in m]
    assert code == 1000 and scored and all(set(s) == {"bob"} for s in scored)
    for sid in (old, nxt["session_id"]):
        with open_ws(server, f"session={sid}&resume_token={token}") as ws:
            assert drain(ws)[1] == 4404


def test_the_pool_refills_soon_after_a_session_takes_from_it(server):
    """Right after the pool filled, its keeper waits KEEPALIVE_S (15 s)
    before looking again; a session taking an actor must wake it, so the
    refill starts once no session opened for POOL_QUIET_S (2 s)."""
    from diglett.settings import Settings

    pool = Settings.from_env().session_pool
    full_pool(pool)
    with open_ws(server) as ws:
        recv(ws)
        t0 = time.monotonic()
        while len(session_actor_names()) < pool + 1 and time.monotonic() - t0 < 30:
            time.sleep(0.25)
        took = time.monotonic() - t0
        assert len(session_actor_names()) >= pool + 1
    assert took < 10.0, f"refilled after {took:.1f} s"


def test_a_pooled_actor_that_died_is_replaced_unnoticed(server, voices):
    """`ready` comes from the pool with no call to the actor; if that actor
    died since the pool's last keep-alive, the session's first call finds it
    dead, and the session is re-created under the same id: the client sees
    nothing of it."""
    import ray
    from ray.exceptions import RayActorError

    from actors.session_actor import NAMESPACE, recycled_session_id
    from diglett.settings import Settings

    pool = Settings.from_env().session_pool
    for _ in range(2):  # the pool's keep-alive may drop the dead first: again
        killed = full_pool(pool)
        actors = [ray.get_actor(n, namespace=NAMESPACE) for n in killed]
        for a in actors:
            ray.kill(a, no_restart=True)
        for a in actors:  # dead for sure before the next session opens
            for _ in range(100):
                try:
                    ray.get(a.warm.remote(), timeout=30)
                except RayActorError:
                    break
                time.sleep(0.1)
            else:
                pytest.fail("ray.kill did not end a pooled actor in 10 s")
        with open_ws(server) as ws:
            ready = recv(ws)
            if actor_name(ready["session_id"]) not in killed:
                continue
            assert enroll(ws, "alice", voices["a_enroll"])["type"] == "enrolled"
            msgs, code = stream_and_end(ws, voices["a_test"][:16000])
        break
    else:
        pytest.fail("every new session got a live actor: no dead one was pooled")
    assert code == 1000 and [m["type"] for m in msgs].count("label") == 2
    assert not [m for m in msgs if m["type"] == "error"]
    # The next sessions get live actors: the pool's other dead ones are gone
    # (the re-created one, recycled after its clean end, is alive).
    for _ in range(2):
        with open_ws(server) as ws:
            sid = recv(ws)["session_id"]
            revived = recycled_session_id(ready["session_id"])
            assert actor_name(sid) not in killed or sid == revived
            actor = ray.get_actor(actor_name(sid), namespace=NAMESPACE)
            ray.get(actor.stats.remote(), timeout=30)


def test_cpu_replica_threads_and_int8(server):
    """Ray gives a 1-CPU actor OMP_NUM_THREADS=1; the CPU replica sets torch
    to all cores but one (DIGLETT_TORCH_THREADS=0), and it runs the int8
    model by default (DIGLETT_CPU_PRECISION)."""
    import os

    from ray import serve

    handle = serve.get_deployment_handle("EmbeddingDeployment", app_name="diglett")
    info = handle.info.remote().result(timeout_s=30)
    if info["device"] == "cpu":
        cores = len(os.sched_getaffinity(0))
        assert info["torch_threads"] == int(
            os.environ.get("DIGLETT_TORCH_THREADS") or max(1, cores - 1)
        )
        assert info["precision"] == os.environ.get("DIGLETT_CPU_PRECISION", "int8")
        if info["precision"] == "int8" and os.environ["DIGLETT_CPU_COMPILE"] == "0":
            assert info["cpu_int8"] == "traced"  # see conftest


def test_serving_processes_yield_the_cpu_to_the_model(server):
    """SessionActors run at DIGLETT_SERVING_NICE, all their threads; so do
    the embedding replica's threads but the one that runs the model."""
    import os

    import ray
    from ray import serve

    from actors.session_actor import NAMESPACE
    from diglett.settings import Settings

    base = os.getpriority(os.PRIO_PROCESS, 0)
    nice = max(base, Settings.from_env().serving_nice)
    with open_ws(server) as ws:
        sid = recv(ws)["session_id"]
        actor = ray.get_actor(actor_name(sid), namespace=NAMESPACE)
        stats = ray.get(actor.stats.remote(), timeout=30)
    assert stats["niceness"] == nice
    handle = serve.get_deployment_handle("EmbeddingDeployment", app_name="diglett")
    info = handle.info.remote().result(timeout_s=30)
    assert info["niceness"] == {"model_thread": base, "others": nice}


def test_a_request_of_many_megabytes_reaches_the_embedding_tier(server, voices):
    """A node batcher's request (up to 512 int16 windows, 24 MB) goes through
    the handle whatever its size (Serve's gRPC handle transport, which
    serve_env.py turns off, refuses messages over 4 MiB: the no-op load
    benchmark failed sessions so)."""
    import ray

    from actors.embed_batcher import node_batcher
    from actors.session_actor import NAMESPACE

    x = voices["a_enroll"]
    n = 120  # 120 x 48 kB = 5.8 MB
    window = (x[:24000] * 32767).astype(np.int16)
    batcher = node_batcher("diglett", "EmbeddingDeployment", NAMESPACE)
    embs = ray.get(batcher.embed.remote([window] * n), timeout=180)
    assert len(embs) == n
    assert all(np.allclose(e, embs[0], atol=1e-3) for e in embs[:3])


def test_a_sessions_scores_do_not_depend_on_other_sessions_audio(server, voices):
    """The same conversation, streamed alone and then beside five sessions
    streaming loud speech (batched with it in the embedding tier), gets the
    same labels and scores within 1e-4."""
    conv = np.concatenate(
        [voices["a_test"], np.zeros(8000, np.float32), voices["b_test"]]
    )
    loud = np.clip(6 * voices["c_test"], -1, 1)

    def run(enrolls: dict[str, np.ndarray], x: np.ndarray, pace: float) -> list[dict]:
        with open_ws(server) as ws:
            recv(ws)
            for name, clip in enrolls.items():
                assert enroll(ws, name, clip)["type"] == "enrolled"
            ws.send(json.dumps({"type": "stream"}))
            for i in range(0, x.size, 1600):  # `pace` x real time
                ws.send(to_s16(x[i : i + 1600]))
                time.sleep(0.1 / pace)
            ws.send(json.dumps({"type": "end"}))
            return [m for m in drain(ws)[0] if m["type"] == "label"]

    pair = {"alice": voices["a_enroll"], "bob": voices["b_enroll"]}
    alone = run(pair, conv, 1.0)
    results: dict[int, list[dict]] = {}

    def crowd(k: int) -> None:
        # Twice real time: the model is busy, so windows wait and batch.
        results[k] = run({"carol": loud[: 3 * 16000]}, np.tile(loud, 5), 2.0)

    others = [threading.Thread(target=crowd, args=(k,)) for k in range(5)]
    for t in others:
        t.start()
    time.sleep(3.0)  # they enroll and start streaming first
    beside = run(pair, conv, 1.0)
    for t in others:
        t.join(180)
    assert all(results.get(k) for k in range(5)), "the loud sessions got labels"
    assert [m["label"] for m in beside] == [m["label"] for m in alone]
    for a, b in zip(alone, beside):
        assert (a["start_s"], a["end_s"]) == (b["start_s"], b["end_s"])
        assert set(a.get("scores", {})) == set(b.get("scores", {}))
        for name, score in a.get("scores", {}).items():
            assert b["scores"][name] == pytest.approx(score, abs=1e-4), (a, b)


def test_the_embedding_replica_reports_its_models_busy_share(server, voices):
    """What the cluster configs' autoscaling policy scales on
    (serve_app/autoscaling.py): the share of the time the model computed."""
    from ray import serve

    handle = serve.get_deployment_handle("EmbeddingDeployment", app_name="diglett")
    windows = [voices["a_test"][k : k + 24000] for k in range(0, 40000, 4000)]
    busy = []
    for _ in range(5):  # Serve's own periodic call may have just reset it
        handle.record_autoscaling_stats.remote().result(timeout_s=60)
        handle.embed.remote(windows).result(timeout_s=120)
        busy.append(handle.record_autoscaling_stats.remote().result()["model_busy"])
        if busy[-1] > 0:
            break
    assert 0 < busy[-1] <= 1, busy
