"""The Serve application: the ingress bound to the shared embedding tier.

`serve run cluster/serve.yaml` imports `serve_app.app:app`; tests call
`build_app()` with `serve.run`.
"""

from __future__ import annotations

from ray.serve import Application

from diglett.settings import Settings
from serve_app.autoscaling import EMBED_AUTOSCALING
from serve_app.embedding import EmbeddingDeployment
from serve_app.ingress import Ingress
from serve_app.placement import embedding_actor_options


def build_app(args: dict | None = None) -> Application:
    """Ingress → EmbeddingDeployment; deployment options come from the config.

    `args["max_embed_replicas"]` caps the embedding tier's autoscaling (the
    benchmarks pass 1 on a GPU-less machine, as `diglett serve` does).
    `DIGLETT_EMBED_RESOURCE` pins embedding replicas to nodes that advertise
    that custom resource (a Serve config's `ray_actor_options` replaces these,
    which is why `diglett serve` applies the same setting to the config).
    """
    settings = Settings.from_env()
    options: dict = {}
    if settings.embed_resource:
        base = EmbeddingDeployment.ray_actor_options
        options["ray_actor_options"] = embedding_actor_options(base, settings)
    cap = (args or {}).get("max_embed_replicas")
    if cap:
        options["autoscaling_config"] = {
            **EMBED_AUTOSCALING,
            "max_replicas": int(cap),
        }
    return Ingress.bind(EmbeddingDeployment.options(**options).bind())


app = build_app()
