"""The Ray Serve data path Diglett runs on: HAProxy ingress and Serve's
throughput-optimized mode (Ray's "high throughput" settings).

Why: with Serve's default Python proxy, every WebSocket message crosses two
processes. The proxy parses it (~1.2 ms of CPU here), and the ingress
replica pulls it from the proxy with an actor call of its own (~1.4 ms);
at real time (100 ms frames) that was 18 of the 70 ms of server CPU per
window. With `RAY_SERVE_ENABLE_HA_PROXY`, HAProxy (C) listens on the Serve
port and forwards each connection to the ingress replica's own HTTP
server; `RAY_SERVE_THROUGHPUT_OPTIMIZED` also runs user code on the
replica's event loop (no thread hop per message). Side by side at 14
real-time sessions on the 2-core machine: lag p95 1.2-1.4 s with the Python
proxy, 0.15-0.21 s with both (docs/performance.md).

Ray reads these when its processes start, so they must be in the
environment of whatever starts Ray: `ray start` on a cluster node, or the
process that starts a local instance. A value already set wins (set one to
0 to opt out).
"""

from __future__ import annotations

import os
from collections.abc import Callable, MutableMapping

SERVE_ENV: dict[str, str] = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # Throughput mode stops replicas logging to stderr; `make serve` and
    # `docker logs` would then show none of the sessions' logs.
    "RAY_SERVE_LOG_TO_STDERR": "1",
    # ...and sends handle calls over gRPC, whose replica server refuses
    # messages over 4 MiB: a batcher's merged request (up to 512 windows,
    # 24 MB) failed every session in it under load. Ray's own actor calls
    # (large arguments through the object store) carry them, as before.
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "0",
    # A stopping ingress replica stays up this long so that every node's
    # HAProxy drops it first; that takes the controller about a second, and
    # Ray's default of 30 s held each Ctrl-C of `make serve` for 30 s.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
    # HAProxy reloads (a new process) whenever the set of ingress replicas
    # changes: at start, and at every scale-up or -down. The old process
    # keeps the WebSockets it carries, but Ray's default kills it 120 s
    # later, which cut every such session without a close frame (at start,
    # those opened in the seconds before the first reload, still routed
    # through Serve's fallback proxy). A session may stream for hours; an
    # old process exits by itself once its last connection closes.
    "RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S": "86400",
    # Not set: RAY_SERVE_PORT_QUARANTINE_S. Ray derives it from the hard
    # stop (+30 s), so that an old process, which routes to its frozen list
    # of replicas until it exits, never finds a stopped replica's port given
    # to another. The price of a day's quarantine: a node's 1,000 replica
    # ports (30000-31000) cover 1,000 ingress replica starts a day on it.
}

# How /healthz says a request reached the ingress replica (`route`): from
# HAProxy straight to the replica's own HTTP server, or through Serve's
# Python proxy (HAProxy's fallback while it lists no ingress replica, and
# the only way in with HAProxy off), which costs more CPU per message.
ROUTE_DIRECT = "direct"
ROUTE_PROXY = "proxy"


def private_haproxy_sockets() -> dict[str, str]:
    """HAProxy's admin and metrics sockets in a directory only this user
    may enter.

    Serve creates the admin socket `mode 666 level admin` in
    /tmp/haproxy-serve/ (world-searchable): any local user could drain
    backends or kill sessions through it. A socket is reached only through
    its directory, so this one is made 0700 and owned by us; one that
    exists with other owners or modes is refused, never reused.
    """
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.gettempdir()) / f"diglett-haproxy-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    st = folder.lstat()
    if folder.is_symlink() or st.st_uid != os.getuid():
        raise RuntimeError(f"{folder} is not a directory of this user's; remove it")
    os.chmod(folder, 0o700)
    return {
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(folder / "metrics.sock"),
    }


def apply_serve_env(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set SERVE_ENV's variables, and HAProxy's private socket paths, in
    `environ` where they are not set yet."""
    for key, value in SERVE_ENV.items():
        environ.setdefault(key, value)
    if "RAY_SERVE_HAPROXY_SOCKET_PATH" not in environ:
        for key, value in private_haproxy_sockets().items():
            environ.setdefault(key, value)


def request_route(server_port: int | None) -> str:
    """ROUTE_DIRECT or ROUTE_PROXY for a request that reached this replica
    on `server_port` (the ASGI scope's server port), in a Serve replica.

    Through HAProxy, the replica's own server gets the request; Serve's
    proxy listens on its fallback port then (on the Serve port otherwise).
    """
    from ray.serve._private import constants

    if not getattr(constants, "RAY_SERVE_ENABLE_HA_PROXY", False):
        return ROUTE_PROXY
    fallback = getattr(constants, "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", 8500)
    return ROUTE_PROXY if server_port == fallback else ROUTE_DIRECT


def wait_until_healthy(
    base_url: str,
    timeout_s: float = 30.0,
    give_up: Callable[[], bool] = lambda: False,
    direct: bool = True,
) -> bool:
    """Wait until `base_url`/healthz is ok and, with `direct`, reports the
    direct route.

    After `serve.run` returns (or /healthz first answers), HAProxy still
    sends new connections through Serve's fallback proxy until its first
    reload lists the ingress replica, a second or a few later. A WebSocket
    opened then stays on that slower path for its whole life, which skews
    a benchmark and costs a server CPU. With HAProxy off in this process's
    environment (the server's, when this process started it), ok suffices.
    False if that did not happen within `timeout_s`, or once `give_up()`.
    """
    import json
    import time
    import urllib.request

    want = {ROUTE_DIRECT}
    if not direct or os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
        want.add(ROUTE_PROXY)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(base_url + "/healthz", timeout=5) as r:
                body = json.loads(r.read())
            if body.get("status") == "ok" and body.get("route") in want:
                return True
        except Exception:  # not up yet, or 503 while the model loads
            pass
        if time.monotonic() >= deadline or give_up():
            return False
        time.sleep(0.25)


def start_local_serve(http: bool = True, **init_kwargs) -> int:
    """Start a local Ray instance, and Serve on a free port of 127.0.0.1, on
    the data path `diglett serve` runs (for tests and benchmarks); returns
    the port. `init_kwargs` go to `ray.init` (num_cpus, object_store_memory,
    address...).

    `http=False` starts Serve with no HTTP proxy at all (returns 0), for
    benchmarks that call deployments through handles only: HAProxy is then
    not needed, and the GPU machine has no binary of it (Ray's bundled one
    comes in a wheel of its own)."""
    import socket

    import ray
    from ray import serve

    if not http:
        os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "0")
    apply_serve_env()
    ray.init(**{"include_dashboard": False, "log_to_driver": False, **init_kwargs})
    if not http:
        serve.start(proxy_location="Disabled")
        return 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port
