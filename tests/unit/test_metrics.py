"""Operations, fast: metrics helpers, JSON logs, placement options, config.

The real Prometheus scrape (through Ray's metrics agent on a multi-node
cluster) is in tests/cluster/test_multinode.py::test_metrics_scraped.
"""

from __future__ import annotations

import io
import json
import logging
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from diglett import logging_setup
from serve_app.cli import render_config
from diglett.settings import Settings
from serve_app import metrics
from serve_app.placement import (
    embedding_actor_options,
    fork_shim_command,
    session_actor_options,
)

ROOT = Path(__file__).resolve().parents[2]


def test_metrics_never_raise_outside_ray():
    metrics.set_active(3)
    metrics.session_opened(resumed=False)
    metrics.batch(4, 0.01)
    metrics.message_sent({"type": "label", "latency_ms": 12.0})
    metrics.message_sent({"type": "error", "code": "bad_message"})
    metrics.message_sent({"type": "enrolled"})
    metrics.error("internal")


def test_the_session_gauge_is_set_again_until_it_changes(monkeypatch):
    """Ray drops a gauge not set again within ~20 s; ours is refreshed."""
    import time

    class Gauge:
        def __init__(self) -> None:
            self.values: list[int] = []

        def set(self, n: int) -> None:
            self.values.append(n)

    gauge = Gauge()
    monkeypatch.setattr(metrics, "GAUGE_REFRESH_S", 0.05)
    monkeypatch.setattr(metrics, "_refresher", None)
    monkeypatch.setattr(metrics, "_get", lambda name: gauge)
    metrics.set_active(3)
    time.sleep(0.5)
    assert gauge.values[0] == 3 and gauge.values.count(3) >= 4, gauge.values
    metrics.set_active(1)
    time.sleep(0.3)
    assert gauge.values[-1] == 1 and gauge.values.count(1) >= 3, gauge.values
    assert metrics._refresher is not None  # one thread, however many calls


def test_metric_names_are_prometheus_safe():
    import re

    names = re.findall(r'"(diglett_[a-z_]+)"', Path(metrics.__file__).read_text())
    assert len(set(names)) == 8
    assert all(re.fullmatch(r"[a-z_][a-z0-9_]*", n) for n in names)


def _capture(session_id: str | None) -> tuple[logging.Logger, io.StringIO]:
    log = logging_setup.configure(session_id=session_id)
    handler = next(h for h in log.handlers if getattr(h, "_diglett", False))
    buf = io.StringIO()
    handler.setStream(buf)
    return logging.getLogger("diglett.engine.session"), buf


def test_json_logs_carry_session_id_and_never_audio():
    logger, buf = _capture("abc123")
    pcm = np.zeros(16000, dtype="<i2").tobytes()
    emb = np.ones(192, dtype=np.float32)
    logger.info("frame %s embedding %s", pcm, emb)
    logger.warning("other", extra={"session_id": "explicit", "code": "bad_audio"})
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert lines[0]["session_id"] == "abc123"
    assert lines[0]["msg"] == "frame <32000 bytes> embedding <array shape=(192,)>"
    assert (
        lines[0]["level"] == "INFO" and lines[0]["logger"] == "diglett.engine.session"
    )
    assert lines[1]["session_id"] == "explicit" and lines[1]["code"] == "bad_audio"
    # Reconfiguring (a new actor in a reused worker) re-stamps, adds no handler.
    logger2, buf2 = _capture("def456")
    logger2.info("x")
    assert json.loads(buf2.getvalue())["session_id"] == "def456"
    n = sum(
        getattr(h, "_diglett", False) for h in logging.getLogger("diglett").handlers
    )
    assert n == 1


def test_placement_defaults_spread_without_resources():
    s = Settings.from_env({})
    assert session_actor_options(s) == {"scheduling_strategy": "SPREAD"}
    assert embedding_actor_options({"num_cpus": 1}, s) == {
        "num_cpus": 1,
        "runtime_env": {"env_vars": {"RAY_worker_niceness": "0"}},
    }
    # A config's own environment variables are kept.
    own = {"num_cpus": 1, "runtime_env": {"env_vars": {"X": "1"}, "pip": ["a"]}}
    assert embedding_actor_options(own, s)["runtime_env"] == {
        "env_vars": {"RAY_worker_niceness": "0", "X": "1"},
        "pip": ["a"],
    }


def test_placement_custom_resources():
    s = Settings.from_env(
        {
            "DIGLETT_SESSION_RESOURCE": "diglett_session",
            "DIGLETT_SESSION_STRATEGY": "default",
            "DIGLETT_EMBED_RESOURCE": "diglett_embed",
        }
    )
    assert session_actor_options(s) == {
        "scheduling_strategy": "DEFAULT",
        "resources": {"diglett_session": 1},
    }
    base = {"num_cpus": 1, "resources": {"other": 2}}
    assert embedding_actor_options(base, s) == {
        "num_cpus": 1,
        "resources": {"other": 2, "diglett_embed": 1},
        "runtime_env": {"env_vars": {"RAY_worker_niceness": "0"}},
    }
    assert base == {"num_cpus": 1, "resources": {"other": 2}}  # not mutated


def test_session_workers_are_forked_only_when_switched_on():
    """Opt-in (docs/internals.md). The shim runs on the interpreter this
    install runs on, stdlib only."""
    command = shlex.split(fork_shim_command())
    assert command[:3] == [sys.executable, "-I", "-S"]
    assert Path(command[3]).is_file() and command[3].endswith("actors/fork_shim.py")
    assert session_actor_options(Settings()) == {"scheduling_strategy": "SPREAD"}
    on = Settings.from_env({"DIGLETT_SESSION_FORK": "1"})
    assert session_actor_options(on)["runtime_env"] == {
        "py_executable": fork_shim_command()
    }
    with pytest.raises(ValueError, match="DIGLETT_SESSION_FORK"):
        Settings.from_env({"DIGLETT_SESSION_FORK": "2"})


def test_rendered_configs_are_valid_serve_configs():
    from ray.serve.schema import ServeDeploySchema

    s = Settings.from_env({"DIGLETT_EMBED_RESOURCE": "diglett_embed"})
    rendered = render_config(ROOT / "cluster" / "serve.yaml", s, gpus=2)
    ServeDeploySchema.model_validate(rendered)
    [emb] = [
        d
        for d in rendered["applications"][0]["deployments"]
        if d["name"] == "EmbeddingDeployment"
    ]
    assert emb["ray_actor_options"]["num_gpus"] == 1
    assert emb["ray_actor_options"]["resources"] == {"diglett_embed": 1}
    assert emb["autoscaling_config"]["max_replicas"] == 2  # one per GPU
    [cpu] = [
        d
        for d in render_config(ROOT / "cluster" / "serve.yaml", s, gpus=0)[
            "applications"
        ][0]["deployments"]
        if d["name"] == "EmbeddingDeployment"
    ]
    assert cpu["autoscaling_config"]["max_replicas"] == 1  # it uses the cores
    assert rendered["logging_config"]["encoding"] == "JSON"
    text = Settings.from_env({"DIGLETT_LOG_FORMAT": "text"})
    assert (
        render_config(ROOT / "cluster" / "serve.yaml", text, 0)["logging_config"][
            "encoding"
        ]
        == "TEXT"
    )
    cluster = yaml.safe_load((ROOT / "cluster" / "serve-cluster.yaml").read_text())
    ServeDeploySchema.model_validate(cluster)


def test_kuberay_manifest_embeds_the_cluster_serve_config():
    docs = list(
        yaml.safe_load_all((ROOT / "cluster" / "kuberay-rayservice.yaml").read_text())
    )
    [svc] = [d for d in docs if d and d.get("kind") == "RayService"]
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    cluster = yaml.safe_load((ROOT / "cluster" / "serve-cluster.yaml").read_text())
    assert serve_cfg["applications"] == cluster["applications"]
    groups = {
        g["groupName"]: g for g in svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    }
    assert "diglett_embed" in groups["embed-gpu"]["rayStartParams"]["resources"]
    assert "diglett_session" in groups["sessions-cpu"]["rayStartParams"]["resources"]
    gpu = groups["embed-gpu"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == 1


def test_build_app_caps_the_embedding_tier_when_asked():
    """The benchmarks start the app as `diglett serve` would on a GPU-less
    machine: `max_embed_replicas` caps the tier, other autoscaling kept."""
    from serve_app.app import build_app

    def autoscaling(app):
        [embedding] = app._bound_deployment.init_args  # Ingress(embedding)
        return embedding._bound_deployment._deployment_config.autoscaling_config

    capped, default = autoscaling(build_app({"max_embed_replicas": 1})), autoscaling(
        build_app()
    )
    assert (capped.max_replicas, default.max_replicas) == (1, 4)
    assert capped.target_ongoing_requests == default.target_ongoing_requests == 8


def test_every_config_starts_the_model_worker_at_niceness_0():
    """Ray starts workers at niceness 15; the embedding replica's worker must
    start at 0 however it is deployed: decorator (tests, benchmarks),
    `diglett serve`'s rendered config, the cluster and KubeRay configs."""
    from serve_app.cli import render_config
    from diglett.settings import Settings
    from serve_app.embedding import EmbeddingDeployment

    def env(options: dict) -> dict:
        return options["runtime_env"]["env_vars"]

    want = {"RAY_worker_niceness": "0"}
    assert env(EmbeddingDeployment.ray_actor_options).items() >= want.items()
    cluster = yaml.safe_load((ROOT / "cluster" / "serve-cluster.yaml").read_text())
    docs = yaml.safe_load_all(
        (ROOT / "cluster" / "kuberay-rayservice.yaml").read_text()
    )
    [svc] = [d for d in docs if d and d.get("kind") == "RayService"]
    configs = [
        render_config(ROOT / "cluster" / "serve.yaml", Settings(), gpus)
        for gpus in (0, 2)
    ] + [cluster, yaml.safe_load(svc["spec"]["serveConfigV2"])]
    for config in configs:
        [emb] = [
            d
            for d in config["applications"][0]["deployments"]
            if d["name"] == "EmbeddingDeployment"
        ]
        assert env(emb["ray_actor_options"]).items() >= want.items()


def test_every_way_of_starting_ray_gets_the_serve_data_path():
    """HAProxy ingress and throughput mode are read when Ray starts: the
    image (cluster nodes run `ray start` in it) sets the same values as
    `apply_serve_env`, which leaves values already set alone."""
    from serve_app.serve_env import SERVE_ENV, apply_serve_env

    env = {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_HAPROXY_SOCKET_PATH": "/x"}
    apply_serve_env(env)
    assert env == {
        **SERVE_ENV,
        "RAY_SERVE_ENABLE_HA_PROXY": "0",
        "RAY_SERVE_HAPROXY_SOCKET_PATH": "/x",  # set: the sockets are left alone
    }
    dockerfile = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    for key, value in SERVE_ENV.items():
        assert f"{key}={value}" in dockerfile.split(), key
