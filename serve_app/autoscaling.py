"""The embedding tier scales on how busy its models are, not on requests.

Serve's default policy counts ongoing requests per replica. Here every
request comes from a node's EmbedBatcher, which merges its sessions' windows
and keeps at most a few requests out at once, so ongoing requests follow
the number of busy session nodes, not the load on the GPUs. Each replica
reports instead the share of the last interval its model threads computed
(`EmbeddingDeployment.record_autoscaling_stats`, "model_busy", 0..1), and
this policy asks for as many replicas as keep that share near
TARGET_BUSY. Serve applies the config's bounds and up/down-scale delays
around it (a custom policy, Ray Serve's documented `autoscaling_config.policy`,
alpha in Ray 2.60). Where no replica has reported yet (just started, or an
older replica), Serve's default policy decides.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

BUSY_METRIC = "model_busy"
# The busy share to keep each replica at: headroom for bursts and for a
# replica that is starting (a GPU replica takes minutes to load and warm up).
TARGET_BUSY = 0.6


def replicas_for(busy: Iterable[float], target: float = TARGET_BUSY) -> int:
    """Replicas needed so that the work `busy` reports (each replica's busy
    share, 0..1) would keep each at `target`; at least 1."""
    total = sum(min(1.0, max(0.0, b)) for b in busy)
    return max(1, math.ceil(total / target - 1e-9))


def embed_policy(ctx: Any) -> tuple[int, dict]:
    """`autoscaling_config.policy.policy_function` of the EmbeddingDeployment
    (a `ray.serve.config.AutoscalingContext` in, (replicas, state) out)."""
    metrics = ctx.aggregated_metrics or {}
    busy = metrics.get(BUSY_METRIC) or {}
    if not busy:
        from ray.serve.autoscaling_policy import (
            replica_queue_length_autoscaling_policy,
        )

        return replica_queue_length_autoscaling_policy(ctx)
    return replicas_for(busy.values()), ctx.policy_state
