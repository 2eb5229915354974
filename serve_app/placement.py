"""Where the tiers run on a multi-node cluster, from the settings.

- SessionActors take no CPU (`num_cpus=0`); by default they are spread over
  the nodes (`DIGLETT_SESSION_STRATEGY=SPREAD`) instead of piling onto the
  ingress's node. With `DIGLETT_SESSION_RESOURCE=diglett_session` each takes
  one unit of that custom resource, so only nodes started with e.g.
  `--resources='{"diglett_session": 500}'` hold sessions, at most 500 each.
- EmbeddingDeployment replicas go where a GPU is (`num_gpus` in the Serve
  config) and, with `DIGLETT_EMBED_RESOURCE=diglett_embed`, only on nodes that
  advertise that resource.
"""

from __future__ import annotations

import os
import shlex
import sys

import actors
from diglett.settings import Settings


def session_actor_options(settings: Settings) -> dict:
    """Extra `.options()` for a SessionActor."""
    opts: dict = {"scheduling_strategy": settings.session_strategy.upper()}
    if settings.session_resource:
        opts["resources"] = {settings.session_resource: 1}
    if settings.session_fork and sys.platform == "linux":
        opts["runtime_env"] = {"py_executable": fork_shim_command()}
    return opts


def fork_shim_command() -> str:
    """Ray's `py_executable` that has the node's fork server fork the worker.

    The shim needs only the standard library (`-I -S`: ~4 MiB); the path is
    this install's, the same on every node of an image-built cluster.
    """
    shim = os.path.join(os.path.dirname(actors.__file__), "fork_shim.py")
    return shlex.join([sys.executable, "-I", "-S", shim])


# Ray starts every worker process at niceness 15, behind its own RPC threads
# (niceness 0) in every process of the node. The embedding replica's model
# thread is the node's bottleneck on a CPU, so its worker starts at 0 (the
# replica then lowers all its other threads; serve_app/embedding.py).
MODEL_WORKER_ENV = {"RAY_worker_niceness": "0"}


def model_worker_options(base: dict | None) -> dict:
    """`ray_actor_options` with the model worker's environment merged in."""
    opts = dict(base or {})
    runtime_env = dict(opts.get("runtime_env") or {})
    runtime_env["env_vars"] = {
        **MODEL_WORKER_ENV,
        **(runtime_env.get("env_vars") or {}),
    }
    opts["runtime_env"] = runtime_env
    return opts


def embedding_actor_options(base: dict | None, settings: Settings) -> dict:
    """`ray_actor_options` of the EmbeddingDeployment with the placement applied."""
    opts = model_worker_options(base)
    if settings.embed_resource:
        resources = dict(opts.get("resources") or {})
        resources[settings.embed_resource] = 1
        opts["resources"] = resources
    return opts
