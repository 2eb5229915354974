"""The embedding tier's autoscaling policy (serve_app/autoscaling.py)."""

from __future__ import annotations

from types import SimpleNamespace

from serve_app.autoscaling import BUSY_METRIC, TARGET_BUSY, embed_policy, replicas_for


def test_replicas_follow_the_models_busy_share():
    assert replicas_for([]) == 1
    assert replicas_for([0.0, 0.0]) == 1  # idle: one (Serve's min_replicas applies)
    assert replicas_for([TARGET_BUSY]) == 1
    assert replicas_for([0.9]) == 2  # one replica over target: a second
    assert replicas_for([1.0, 1.0]) == 4
    assert replicas_for([0.3, 0.2]) == 1  # two replicas' work fits one
    assert replicas_for([1.7, -0.5]) == 2  # out-of-range reports are clamped


def test_the_policy_reads_the_replicas_busy_share():
    ctx = SimpleNamespace(
        aggregated_metrics={BUSY_METRIC: {"r1": 0.95, "r2": 0.9}}, policy_state={}
    )
    assert embed_policy(ctx) == (4, {})


def test_without_reports_serves_default_policy_decides(monkeypatch):
    import ray.serve.autoscaling_policy as policies

    calls = []
    monkeypatch.setattr(
        policies,
        "replica_queue_length_autoscaling_policy",
        lambda ctx: calls.append(ctx) or (3, {"x": 1}),
    )
    ctx = SimpleNamespace(aggregated_metrics={}, policy_state={})
    assert embed_policy(ctx) == (3, {"x": 1}) and calls == [ctx]


def test_the_cluster_configs_scale_the_embedding_tier_on_it():
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[2]
    for name in ("serve.yaml", "serve-cluster.yaml"):
        config = yaml.safe_load((root / "cluster" / name).read_text())
        [dep] = [
            d
            for app in config["applications"]
            for d in app["deployments"]
            if d["name"] == "EmbeddingDeployment"
        ]
        policy = dep["autoscaling_config"]["policy"]["policy_function"]
        assert policy == "serve_app.autoscaling:embed_policy", name


def test_the_noop_model_can_take_a_fixed_time_per_window(monkeypatch):
    """DIGLETT_NOOP_WINDOW_S: the multi-node autoscaling test's busy model."""
    import numpy as np

    import diglett.model.embedder as embedder
    from diglett.settings import Settings

    slept = []
    monkeypatch.setattr(embedder.time, "sleep", slept.append)
    x = np.zeros(8000, dtype=np.int16)
    assert len(embedder.NoopEmbedder().embed([x, x])) == 2 and slept == []
    window_s = Settings.from_env({"DIGLETT_NOOP_WINDOW_S": "0.02"}).noop_window_s
    assert len(embedder.NoopEmbedder(window_s).embed([x, x, x])) == 3
    assert slept == [0.06]
