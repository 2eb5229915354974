"""A local multi-node Ray cluster: `ray start` nodes on one machine.

Each node is a `ray start --block` in its own process group, with its own
ports, started one at a time (nodes joining together race for the same
socket and log names in the shared session folder); a driver process then
deploys the app, as `serve deploy` would. Used by the cluster tests
(tests/cluster/test_multinode.py, test_gcs_fault_tolerance.py) and by
bench/multinode.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from serve_app.serve_env import apply_serve_env

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports of 127.0.0.1 that were free just now."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class Node:
    """One `ray start --block` node in its own process group."""

    def __init__(self, name: str, args: list[str], env: dict, log: Path) -> None:
        self.name = name
        self.metrics_port = int(args[args.index("--metrics-export-port") + 1])
        self.log_path = log
        self.log = log.open("wb")
        self.proc = subprocess.Popen(
            [RAY, "start", "--block", *args],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self) -> None:
        """SIGKILL the whole node at once, as a crashed machine: raylet,
        agents and its workers (which the raylet may start in process groups
        of their own, and which outlive it for seconds if left alone), and
        the fork server's workers, which are not the raylet's descendants."""
        import psutil

        from actors.fork_server import with_forked_workers

        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        procs = with_forked_workers(procs)  # its SessionActors too
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(timeout=30)


def node_args(ports: list[int], metrics_port: int, cpus: int, resources: dict):
    nm, om, agent_http, agent_grpc, renv = ports
    return [
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={cpus}",
        "--num-gpus=0",
        f"--resources={json.dumps(resources)}",
        f"--node-manager-port={nm}",
        f"--object-manager-port={om}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={renv}",
        "--metrics-export-port",
        str(metrics_port),
        f"--object-store-memory={100 * 2**20}",
        "--disable-usage-stats",
    ]


def http_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, json.loads(r.read() or b"null")


def alive(dash_url: str) -> int:
    from ray.util.state import list_nodes

    return len(list_nodes(address=dash_url, filters=[("state", "=", "ALIVE")]))


def wait_for(what: str, fn, timeout: float, every: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value:
                return value
        except Exception as exc:
            last = exc
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last error: {last!r})")


DRIVER = """
import os, sys
import ray
from ray import serve
import serve_app.app as appmod
from serve_app.ingress import Ingress

ray.init(address=sys.argv[1], log_to_driver=False)
serve.start(proxy_location="HeadOnly",
            http_options={"host": "127.0.0.1", "port": int(sys.argv[2])})
# The Ingress lives on the head, beside the only proxy.
appmod.Ingress = Ingress.options(
    ray_actor_options={"num_cpus": 0, "resources": {"diglett_ingress": 0.01}})
serve.run(appmod.build_app(), name="diglett", route_prefix="/")
print("deployed", flush=True)
"""


def cluster_env(**extra: str) -> dict:
    """The environment of every node and of the deploying driver: this
    process's, less any RAY_ADDRESS, with Serve's data-path variables and
    the local cluster's settings, then `extra` (DIGLETT_MODEL_DIR, say)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    apply_serve_env(env)  # every `ray start` node: HAProxy, throughput mode
    env.update(
        DIGLETT_DEVICE="cpu",
        DIGLETT_SESSION_RESOURCE="diglett_session",
        DIGLETT_EMBED_RESOURCE="diglett_embed",
        DIGLETT_API_TOKEN="",
        RAY_USAGE_STATS_ENABLED="0",
        # Ray 2.60 turns token auth on for new local clusters; these private
        # local clusters listen on 127.0.0.1 only.
        RAY_AUTH_MODE="disabled",
        OMP_NUM_THREADS="1",
    )
    env.update(extra)
    return env


@contextmanager
def local_cluster(
    specs: Mapping[str, tuple[int, dict]],
    env: dict,
    *,
    prefix: str,
    head_env: dict | None = None,
    head_extra: tuple[str, ...] = (),
    tmp: Path | None = None,
) -> Iterator[dict]:
    """Start `specs` ({name: (CPUs, custom resources)}, the head first), deploy
    the app, and yield {gcs, env, dash, http, ws, nodes, tmp, head_args,
    head_env}; every node is killed on exit, and on a failure the nodes'
    log tails are printed first."""
    tmp = tmp or Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))  # short paths
    gcs, dash, client, http, *rest = free_ports(4 + len(specs) * 6)
    head_env = head_env or env
    nodes: dict[str, Node] = {}
    head_args: list[str] = []
    dash_url = f"http://127.0.0.1:{dash}"
    try:
        for i, (name, (cpus, res)) in enumerate(specs.items()):
            p = rest[i * 6 : i * 6 + 6]
            args = node_args(p[:5], p[5], cpus, res)
            if i == 0:
                head_args = args = args + [
                    "--head",
                    f"--port={gcs}",
                    f"--ray-client-server-port={client}",
                    "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash}",
                    f"--temp-dir={tmp}",
                    *head_extra,
                ]
                nodes[name] = Node(name, args, head_env, tmp / f"{name}.log")
                wait_for(
                    "the dashboard", lambda: http_json(dash_url + "/api/version"), 90
                )
            else:
                args += [f"--address=127.0.0.1:{gcs}"]
                nodes[name] = Node(name, args, env, tmp / f"{name}.log")
            wait_for(f"{i + 1} alive nodes", lambda: alive(dash_url) == i + 1, 90)
        subprocess.run(
            [sys.executable, "-c", DRIVER, f"127.0.0.1:{gcs}", str(http)],
            env=env,
            cwd=ROOT,
            check=True,
            timeout=240,
        )
        base = f"http://127.0.0.1:{http}"
        wait_for("/healthz", lambda: http_json(base + "/healthz")[0] == 200, 120)
        yield {
            "gcs": f"127.0.0.1:{gcs}",
            "env": env,
            "dash": dash_url,
            "http": base,
            "ws": f"ws://127.0.0.1:{http}/v1/stream",
            "nodes": nodes,
            "tmp": tmp,
            "head_args": head_args,
            "head_env": head_env,
        }
    except BaseException:
        for node in nodes.values():  # say why, before the logs go
            print(f"--- {node.name} (exit {node.proc.poll()}):")
            print(node.log_path.read_text(errors="replace")[-3000:])
        raise
    finally:
        for node in reversed(list(nodes.values())):
            node.kill()
        if not os.environ.get("DIGLETT_KEEP_TEST_LOGS"):
            shutil.rmtree(tmp, ignore_errors=True)
