"""The ingress's HTTP routes as FastAPI serves them, without Ray: the
replica's instance (which Serve injects as `self`) is a stand-in."""

from __future__ import annotations

from types import MethodType, SimpleNamespace

from fastapi.testclient import TestClient

from diglett import __version__
from diglett.settings import Settings


def test_info_has_every_session_independent_value_of_ready(monkeypatch):
    """`/v1/info` is `ready` less the session's own values: nothing that
    `Settings.info()` puts in `ready` (`lookahead_s` included) is filtered
    out by the route's response model (docs/protocol.md)."""
    from ray import serve

    from serve_app.ingress import Ingress, app

    settings = Settings(lookahead_hops=1, api_token="t0k")
    ingress = SimpleNamespace(settings=settings)
    ingress._authorized = MethodType(Ingress.func_or_class._authorized, ingress)
    replica = SimpleNamespace(servable_object=ingress)
    monkeypatch.setattr(serve, "get_replica_context", lambda: replica)
    assert TestClient(app).get("/v1/info").status_code == 401
    r = TestClient(app).get("/v1/info", headers={"Authorization": "Bearer t0k"})
    assert r.status_code == 200, r.text
    assert r.json() == {**settings.info(), "version": __version__}
    assert r.json()["lookahead_s"] == 0.5
