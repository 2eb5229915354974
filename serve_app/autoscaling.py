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
POLICY = "serve_app.autoscaling:embed_policy"
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


# The EmbeddingDeployment's `autoscaling_config`, the one source: the
# deployment's decorator imports it, and `python -m serve_app.regenerate`
# writes it into cluster/serve.yaml (EMBED_AUTOSCALING) and
# cluster/serve-cluster.yaml (EMBED_AUTOSCALING_CLUSTER).
EMBED_AUTOSCALING: dict = {
    "min_replicas": 1,
    # `diglett serve` lowers it to the GPUs it sees, or 1 without one.
    "max_replicas": 4,
    # Serve's default policy, until replicas report their busy share: each
    # node's EmbedBatcher keeps at most 16 requests out (merging the rest),
    # so a replica sees ~1-2 ongoing while it keeps up and 16 per node once
    # it falls behind: 8 scales on the latter (64 never did).
    "target_ongoing_requests": 8,
    "upscale_delay_s": 10,
    "downscale_delay_s": 300,
    # On the models' busy share, not on ongoing requests (which the node
    # batchers cap): embed_policy above.
    "policy": {"policy_function": POLICY},
}
# A GPU cluster: two replicas at least, so losing one GPU node halves the
# tier instead of ending it; one per GPU node, up to 8 (raise it with the
# embed worker group's maxReplicas).
EMBED_AUTOSCALING_CLUSTER: dict = {
    **EMBED_AUTOSCALING,
    "min_replicas": 2,
    "max_replicas": 8,
}
