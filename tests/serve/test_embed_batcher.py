"""EmbedBatcher on a real local Ray Serve: merged requests, order, failures."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
import ray
from ray import serve

from actors.embed_batcher import EmbedBatcher
from conftest import needs_model

pytestmark = [needs_model, pytest.mark.serve]
APP = f"batcher{os.getpid()}"


@serve.deployment(name="Recorder", ray_actor_options={"num_cpus": 0})
class Recorder:
    """Embeds a signal as [its first sample, 0, ...]; records request sizes.

    A signal whose first sample is negative fails its whole request.
    """

    def __init__(self) -> None:
        self.sizes: list[int] = []

    async def embed(self, signals):
        self.sizes.append(len(signals))
        await asyncio.sleep(0.05)  # a model call that takes a while
        if any(s[0] < 0 for s in signals):
            raise ValueError("bad signal")
        return [np.array([s[0], 0.0], dtype=np.float32) for s in signals]

    async def sizes_seen(self) -> list[int]:
        return self.sizes


@pytest.fixture(scope="module")
def recorder(server):
    serve.run(Recorder.bind(), name=APP, route_prefix=f"/{APP}")
    yield serve.get_deployment_handle("Recorder", app_name=APP)
    serve.delete(APP)


def test_concurrent_callers_share_requests_and_get_their_own_results(recorder):
    batcher = EmbedBatcher.remote(APP, "Recorder")
    n = 60  # callers at once, each with 1-3 windows
    calls = [
        [np.full(4, 100 * i + k, np.float32) for k in range(1 + i % 3)]
        for i in range(n)
    ]
    out = ray.get([batcher.embed.remote(c) for c in calls], timeout=60)
    for c, got in zip(calls, out):
        assert [float(e[0]) for e in got] == [float(s[0]) for s in c]
    sizes = recorder.sizes_seen.remote().result(timeout_s=30)
    assert sum(sizes) == sum(len(c) for c in calls)
    # At most MAX_IN_FLIGHT requests go out before the first one returns;
    # the rest merge: far fewer Serve requests than callers.
    assert len(sizes) < n / 2, sizes
    assert max(sizes) > 3
    ray.kill(batcher)


def test_a_failed_request_fails_its_callers_only(recorder):
    batcher = EmbedBatcher.remote(APP, "Recorder")
    good = [np.ones(4, np.float32)]
    assert float(ray.get(batcher.embed.remote(good))[0][0]) == 1.0
    with pytest.raises(Exception, match="bad signal"):
        ray.get(batcher.embed.remote([-np.ones(4, np.float32)]), timeout=30)
    # The batcher goes on serving.
    assert float(ray.get(batcher.embed.remote(good))[0][0]) == 1.0
    assert ray.get(batcher.embed.remote([])) == []
    ray.kill(batcher)


def test_live_windows_pass_an_enrollment_burst(recorder):
    """Enrollment windows go out `enroll_in_flight` at a time; a stream's
    windows sent after them come back first. The enrollment's caller still
    gets all its embeddings, in order."""
    batcher = EmbedBatcher.remote(APP, "Recorder", 0, 4)
    ray.get(batcher.embed.remote([np.ones(4, np.float32)]))  # started
    before = len(recorder.sizes_seen.remote().result(timeout_s=30))
    burst = [np.full(4, k + 1, np.float32) for k in range(40)]
    enroll = batcher.embed.remote(burst, False)  # 10 requests, one at a time
    live = [batcher.embed.remote([np.full(4, 1000 + i, np.float32)]) for i in range(3)]
    assert [float(e[0][0]) for e in ray.get(live, timeout=30)] == [1000, 1001, 1002]
    ready, _ = ray.wait([enroll], timeout=0)
    assert not ready  # >= 10 x 50 ms to go
    assert [float(e[0]) for e in ray.get(enroll, timeout=30)] == list(range(1, 41))
    sizes = recorder.sizes_seen.remote().result(timeout_s=30)[before:]
    assert max(sizes) <= 4 and sum(sizes) == 43, sizes
    ray.kill(batcher)


def test_one_lane_when_enroll_in_flight_is_minus_one(recorder):
    batcher = EmbedBatcher.remote(APP, "Recorder", 0, -1)
    ray.get(batcher.embed.remote([np.ones(4, np.float32)]))
    before = len(recorder.sizes_seen.remote().result(timeout_s=30))
    burst = [np.full(4, k + 1, np.float32) for k in range(40)]
    got = ray.get(batcher.embed.remote(burst, False), timeout=30)
    assert [float(e[0]) for e in got] == list(range(1, 41))
    assert recorder.sizes_seen.remote().result(timeout_s=30)[before:] == [40]
    ray.kill(batcher)
