"""A GCS restart keeps resumable sessions, when the GCS is backed by Redis.

Two `ray start` nodes on one machine with GCS fault tolerance on a real
Redis (Debian's `redis-server`, as cluster/kuberay-rayservice.yaml runs it):
the head (GCS, Serve controller and proxy, the Ingress, the embedding
replica) and a sessions node. A client enrolls and drops; then the whole
head node is killed (SIGKILL to its process group, as a crashed head pod)
and a new head started on the same ports and Redis, as KubeRay restarts a
head pod; the client resumes its session, whose SessionActor lives on the
sessions node and whose enrollment must still be there. Without Redis the
new head would know no actors, nodes or names, and the resume would fail.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import psutil
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from conftest import load16, needs_model, needs_speakers, to_s16
from conftest import utterances
from bench.local_cluster import Node, cluster_env, free_ports, local_cluster, wait_for

REDIS = shutil.which("redis-server")
pytestmark = [
    needs_model,
    needs_speakers,
    pytest.mark.serve,
    pytest.mark.skipif(REDIS is None, reason="no redis-server (apt-get install it)"),
]


@pytest.fixture(scope="module")
def cluster():
    tmp = Path(tempfile.mkdtemp(prefix="dgft-", dir="/tmp"))  # short: socket paths
    (redis_port,) = free_ports(1)
    password = secrets.token_hex(16)
    redis = subprocess.Popen(
        [REDIS, "--port", str(redis_port), "--bind", "127.0.0.1"]
        + ["--requirepass", password, "--save", "", "--appendonly", "no"],
        stdout=(tmp / "redis.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    env = cluster_env(
        DIGLETT_EMBEDDER="noop",  # the GCS is under test, not the model
        DIGLETT_SESSION_TTL_S="120",
    )
    specs = {
        "head": (1, {"diglett_ingress": 1, "diglett_embed": 1}),
        "sessions": (1, {"diglett_session": 100}),
    }
    try:
        with local_cluster(
            specs,
            env,
            prefix="dgft-",
            tmp=tmp,
            head_env={**env, "RAY_REDIS_ADDRESS": f"127.0.0.1:{redis_port}"},
            head_extra=(f"--redis-password={password}",),
        ) as c:
            nodes = c["nodes"]

            def restart_head() -> None:
                """Kill the head node at once and start a new one in its place
                (`ray start` refuses while the old GCS process is still there)."""
                nodes.pop("head").kill()
                flag = f"--gcs_server_port={c['gcs'].rsplit(':', 1)[1]}"
                for proc in psutil.process_iter(["cmdline"]):
                    if flag in (proc.info["cmdline"] or []):
                        proc.kill()
                        proc.wait(timeout=30)
                # A fresh temp dir, as a new pod's: in the old one `ray start`
                # would take the sessions node's raylet (on this same machine,
                # pointing at the same address) for a GCS still running.
                args = [
                    f"--temp-dir={tmp / 'h2'}" if a.startswith("--temp-dir=") else a
                    for a in c["head_args"]
                ]
                nodes["head"] = Node("head", args, c["head_env"], tmp / "head2.log")

            yield {"ws": c["ws"], "restart_head": restart_head}
    finally:
        redis.kill()
        redis.wait(timeout=30)


def recv(ws, timeout: float = 60.0) -> dict:
    return json.loads(ws.recv(timeout=timeout))


def test_a_session_resumes_after_the_head_node_restarts(cluster):
    u = utterances()
    enroll_x = load16(u["LS-19"][0])[: 5 * 16000]
    talk = load16(u["LS-19"][3])[: 2 * 16000]
    with connect(cluster["ws"], open_timeout=30, max_size=2**24) as ws:
        ready = recv(ws)
        ws.send(json.dumps({"type": "enroll", "speaker": "alice"}))
        for i in range(0, enroll_x.size, 8000):
            ws.send(to_s16(enroll_x[i : i + 8000]))
        ws.send(json.dumps({"type": "enroll_end"}))
        assert recv(ws)["type"] == "enrolled"
    sid, token = ready["session_id"], ready["resume_token"]

    cluster["restart_head"]()

    def resumed() -> dict | None:
        url = f"{cluster['ws']}?session={sid}"
        headers = {"X-Diglett-Resume-Token": token}
        try:
            with connect(url, additional_headers=headers, open_timeout=10) as ws:
                again = recv(ws, 10)
                if again.get("type") != "ready":
                    return None
                ws.send(json.dumps({"type": "stream"}))
                for i in range(0, talk.size, 8000):
                    ws.send(to_s16(talk[i : i + 8000]))
                ws.send(json.dumps({"type": "end"}))
                msgs = []
                try:
                    while True:
                        msgs.append(recv(ws))
                except ConnectionClosed as exc:
                    return {"ready": again, "msgs": msgs, "code": exc.rcvd.code}
        except (OSError, TimeoutError, ConnectionClosed):
            return None

    got = wait_for("a resume after the head restarted", resumed, 180, every=2.0)
    assert got["ready"]["session_id"] == sid and got["code"] == 1000
    labels = [m for m in got["msgs"] if m["type"] == "label"]
    assert len(labels) == talk.size // 8000
    assert all(set(m.get("scores", {"alice": 0})) == {"alice"} for m in labels)
    assert any("alice" in m.get("scores", {}) for m in labels)  # enrollment kept
