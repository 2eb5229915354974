"""EmbedBatcher: one per node, merging its sessions' windows into few requests.

Every SessionActor used to send its windows to the EmbeddingDeployment as a
Serve request of its own. A Serve request costs a fixed ~2 ms of CPU (this
2-core machine answers ~450/s with a no-op deployment), and each SessionActor
that holds a DeploymentHandle carries its router (~30 MiB of private memory).
So the SessionActors of a node call this plain Ray actor instead (a cheaper
call), which sends the windows of all of them in one Serve request, and only
this actor holds a handle.

Batching adds no wait at low load: a request goes out at once while fewer
than `MAX_IN_FLIGHT` are out; windows that arrive meanwhile go together in
the next one, as soon as one comes back. Enrollment windows take a lane of
their own (`diglett/lanes.py`): live windows go first, and at most
`bulk_windows` enrollment windows are out at once, so sessions that start
together do not hold back the labels of those already streaming.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import ray

from diglett.lanes import Lanes, Request, bulk_windows

logger = logging.getLogger("diglett.batcher")

MAX_IN_FLIGHT = 16  # requests out at once; beyond, windows wait here and merge
MAX_WINDOWS = 512  # windows in one request; the deployment splits into its batches
IDLE_EXIT_S = (
    600.0  # a batcher nobody called for this long ends (app deleted, node idle)
)


def batcher_name(app_name: str, node_id: str) -> str:
    return f"embed-batcher-{app_name}-{node_id[:16]}"


# No task events: Ray records one in the GCS for every call (several per
# hop), which grew its memory by ~12 MiB a minute at 20 sessions and
# never gave it back (docs/capacity.md, bench/soak.py). A public option.
# bench/ray_calls.py turns them on (TASK_EVENTS_ENV=1, read when this module
# is imported) to count the calls per hop; not a setting.
TASK_EVENTS_ENV = "DIGLETT_RAY_TASK_EVENTS"
TASK_EVENTS = os.environ.get(TASK_EVENTS_ENV) == "1"


@ray.remote(num_cpus=0, max_restarts=0, enable_task_events=TASK_EVENTS)
class EmbedBatcher:
    """Forwards the windows of many callers to the embedding tier, merged."""

    def __init__(
        self,
        app_name: str,
        deployment_name: str,
        niceness: int = 0,
        enroll_in_flight: int = 0,
    ) -> None:
        """`enroll_in_flight`: Settings.enroll_in_flight (enrollment windows
        out at once; 0 auto, -1 one lane, first come, first served)."""
        from ray import serve

        from diglett.priority import lower_cpu_priority

        lower_cpu_priority(niceness)  # see Settings.serving_nice
        self.handle = serve.get_deployment_handle(deployment_name, app_name=app_name)
        # A node's sessions queue here one call each while all requests are
        # out (hundreds at GPU scale).
        gpus = ray.cluster_resources().get("GPU", 0)
        self._lanes = Lanes(
            MAX_IN_FLIGHT, MAX_WINDOWS, bulk_windows(enroll_in_flight, gpus)
        )
        self._last_call = time.monotonic()
        self._watchdog: asyncio.Task | None = None

    async def embed(self, signals: list, live: bool = True) -> list:
        """Embeddings of one caller's signals, in order (same as the
        deployment). `live`: a stream's windows; False: an enrollment's."""
        loop = asyncio.get_running_loop()
        self._last_call = time.monotonic()
        if self._watchdog is None:
            self._watchdog = loop.create_task(self._exit_when_idle())
        if not signals:
            return []
        parts = (
            [slice(0, len(signals))] if live else self._lanes.bulk_chunks(len(signals))
        )
        futs = []
        for part in parts:
            fut = loop.create_future()
            self._lanes.push((signals[part], fut), part.stop - part.start, live)
            futs.append(fut)
        self._send_more()
        try:
            results = await asyncio.gather(*futs)
        finally:  # a caller that timed out: its parts not yet sent stay unsent
            for fut in futs:
                fut.cancel()
        return [e for embs in results for e in embs]

    def _send_more(self) -> None:
        loop = asyncio.get_running_loop()
        while (req := self._lanes.next_request()) is not None:
            loop.create_task(self._send(req))

    async def _send(self, req: Request) -> None:
        batch = [item for item in req.items if not item[1].done()]
        if not batch:  # every caller of it is gone
            self._lanes.done(req)
            self._send_more()
            return
        flat = [s for signals, _ in batch for s in signals]
        try:
            embs = await self.handle.embed.remote(flat)
        except Exception as exc:  # every caller gets the failure, and retries
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
        else:
            k = 0
            for signals, fut in batch:
                if not fut.done():  # a caller that timed out is gone
                    fut.set_result(embs[k : k + len(signals)])
                k += len(signals)
        finally:
            self._lanes.done(req)
            self._send_more()

    async def _exit_when_idle(self) -> None:
        while True:
            await asyncio.sleep(IDLE_EXIT_S / 10)
            if (
                not self._lanes.pending()
                and not self._lanes.in_flight
                and time.monotonic() - self._last_call > IDLE_EXIT_S
            ):
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


def node_batcher(
    app_name: str,
    deployment_name: str,
    namespace: str,
    niceness: int = 0,
    enroll_in_flight: int = 0,
):
    """This node's batcher, created by whichever session asks first (its
    settings are that session's)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node_id = ray.get_runtime_context().get_node_id()
    return EmbedBatcher.options(
        name=batcher_name(app_name, node_id),
        namespace=namespace,
        get_if_exists=True,
        lifetime="detached",
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote(app_name, deployment_name, niceness, enroll_in_flight)
