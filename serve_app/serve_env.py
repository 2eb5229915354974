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
proxy, 0.15-0.21 s with both (README).

Ray reads these when its processes start, so they must be in the
environment of whatever starts Ray: `ray start` on a cluster node, or the
process that starts a local instance. A value already set wins (set one to
0 to opt out).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

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
}


def apply_serve_env(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set SERVE_ENV's variables in `environ` where they are not set yet."""
    for key, value in SERVE_ENV.items():
        environ.setdefault(key, value)


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
