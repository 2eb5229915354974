"""The generated blocks of the Dockerfile and cluster/ (serve_app/regenerate.py)
match their Python source, which the code itself imports."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve_app import regenerate
from serve_app.autoscaling import EMBED_AUTOSCALING

ROOT = Path(__file__).resolve().parents[2]


def test_committed_files_match_what_the_source_renders():
    assert regenerate.stale() == [], "run: python -m serve_app.regenerate"


def test_a_stale_block_is_rewritten_and_the_rest_kept(tmp_path):
    for rel in regenerate.FILES:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text((ROOT / rel).read_text())
    serve = tmp_path / "cluster" / "serve.yaml"
    text = serve.read_text()
    serve.write_text(
        text.replace("target_ongoing_requests: 8", "target_ongoing_requests: 64")
    )
    assert regenerate.stale(tmp_path) == ["cluster/serve.yaml"]
    assert regenerate.stale(tmp_path, write=True) == ["cluster/serve.yaml"]
    assert serve.read_text() == text
    # serve-cluster.yaml changed: the manifest that embeds it follows.
    cluster = tmp_path / "cluster" / "serve-cluster.yaml"
    cluster.write_text(cluster.read_text().replace("port: 8000", "port: 8001"))
    assert regenerate.stale(tmp_path, write=True) == ["cluster/kuberay-rayservice.yaml"]
    manifest = (tmp_path / "cluster" / "kuberay-rayservice.yaml").read_text()
    assert "      port: 8001\n" in manifest


def test_missing_unknown_or_unterminated_blocks_are_refused():
    begin = "# >>> generated: serve-env (python -m serve_app.regenerate) >>>\n"
    end = "# <<< generated: serve-env <<<\n"
    with pytest.raises(ValueError, match="missing"):
        regenerate.render("FROM x\n", ("serve-env",))
    with pytest.raises(ValueError, match="unexpected"):
        regenerate.render(begin + end, ("embed-autoscaling",))
    with pytest.raises(ValueError, match="no end marker"):
        regenerate.render(begin + "ENV A=1\n", ("serve-env",))
    out = regenerate.render(begin + "stale\n" + end, ("serve-env",))
    assert out.startswith(begin + "ENV RAY_SERVE_ENABLE_HA_PROXY=1 \\\n")
    assert out.endswith("=86400\n" + end)


def test_the_deployment_scales_on_the_same_block():
    from serve_app.embedding import EmbeddingDeployment

    got = EmbeddingDeployment._deployment_config.autoscaling_config
    for key, value in EMBED_AUTOSCALING.items():
        if key == "policy":
            assert got.policy.policy_function == value["policy_function"]
        else:
            assert getattr(got, key) == value, key
