"""The Ray Serve variables Diglett sets (serve_app/serve_env.py) still do
what they are set for in the installed Ray: a release that renames one, or
stops reading it, fails here instead of silently changing the data path."""

from __future__ import annotations

import json
import os
import textwrap

from conftest import fresh_python
from serve_app.serve_env import SERVE_ENV, apply_serve_env


def _constants_seen_by_ray(env: dict[str, str]) -> dict:
    """`ray.serve._private.constants` as a fresh process with `env` reads them."""
    code = textwrap.dedent("""
        import json
        from ray.serve._private import constants as c
        names = [n for n in dir(c) if n.startswith("RAY_SERVE_")]
        print(json.dumps({n: getattr(c, n) for n in names}, default=str))
    """)
    return json.loads(fresh_python(code, env))


def test_ray_reads_every_variable_we_set_and_keeps_its_own_port_rule():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
    apply_serve_env(env)
    seen = _constants_seen_by_ray(env)
    for key, value in SERVE_ENV.items():
        assert key in seen, f"Ray no longer has {key}"
        got = seen[key]
        if isinstance(got, bool):
            got = "1" if got else "0"
        elif isinstance(got, (int, float)):
            got, value = float(got), float(value)
        assert got == value, (key, got, value)
    # Ray's rule: a stopped replica's port stays out of use longer than an
    # old HAProxy process may live and route to it.
    hard_stop = float(seen["RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S"])
    assert float(seen["RAY_SERVE_PORT_QUARANTINE_S"]) > hard_stop
    assert seen["RAY_SERVE_HAPROXY_SOCKET_PATH"] == env["RAY_SERVE_HAPROXY_SOCKET_PATH"]
