"""The Serve application: the ingress bound to the shared embedding tier.

`serve run cluster/serve.yaml` imports `serve_app.app:app`; tests call
`build_app()` with `serve.run`.
"""

from __future__ import annotations

from ray.serve import Application

from serve_app.embedding import EmbeddingDeployment
from serve_app.ingress import Ingress


def build_app(args: dict | None = None) -> Application:
    """Ingress → EmbeddingDeployment; deployment options come from the config."""
    return Ingress.bind(EmbeddingDeployment.bind())


app = build_app()
