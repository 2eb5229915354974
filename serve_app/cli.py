"""`diglett` command line: `serve` and `fetch-model`.

`diglett serve` resolves the model first (so a missing model fails here,
with a clear message, not inside a Ray worker), writes the Serve config with
the settings applied, runs `serve run` on it and reports when `/healthz`
answers ok.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from diglett.leftovers import orphaned_haproxies, port_free, stop
from diglett.settings import Settings
from serve_app.placement import embedding_actor_options
from serve_app.serve_env import apply_serve_env, wait_until_healthy

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "cluster" / "serve.yaml"
DIRECT_ROUTE_WAIT_S = 30.0  # longest wait, after /healthz is ok, for the direct route


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def render_config(base: Path, settings: Settings, gpus: int) -> dict:
    """The Serve config of `base` with host, port, batching and GPU applied."""
    config = yaml.safe_load(base.read_text())
    config.setdefault("http_options", {}).update(
        host=settings.bind_host(), port=settings.port
    )
    config.setdefault("logging_config", {})["encoding"] = (
        "JSON" if settings.log_format == "json" else "TEXT"
    )
    for app in config["applications"]:
        for dep in app.get("deployments", []):
            if dep["name"] != "EmbeddingDeployment":
                continue
            dep.setdefault("user_config", {}).update(
                batch_size=settings.batch_size, batch_wait_s=settings.batch_wait_s
            )
            if gpus:
                dep.setdefault("ray_actor_options", {})["num_gpus"] = 1
                dep["autoscaling_config"]["max_replicas"] = gpus
            else:
                # One CPU replica already uses all cores but one; a second on
                # the same machine splits them and loads the model again
                # while the first is overloaded (it made a 2-core run worse).
                dep["autoscaling_config"]["max_replicas"] = 1
            dep["ray_actor_options"] = embedding_actor_options(
                dep.get("ray_actor_options"), settings
            )
    return config


def _check_port(settings: Settings) -> bool:
    """Free the Serve port of HAProxy orphaned by an earlier server (see
    diglett/leftovers.py); False, with a message, if it stays taken."""
    host, port = settings.bind_host(), settings.port
    if port_free(host, port):
        return True
    orphans = orphaned_haproxies()
    if orphans:
        left = stop(orphans)
        print(
            f"diglett: stopped HAProxy left running by an earlier server "
            f"that did not shut down (pid {', '.join(map(str, orphans))})"
            + (f"; still running: {left}" if left else ""),
            flush=True,
        )
        if port_free(host, port):
            return True
    print(
        f"diglett: port {port} on {host} is in use; stop what listens there "
        "(another `diglett serve`?) or set DIGLETT_PORT",
        file=sys.stderr,
    )
    return False


def _child_setup():
    """The `preexec_fn` for `serve run`, run in the child before the exec.

    SIGINT and SIGQUIT back to their defaults: a background shell job
    (`nohup make serve &`, a CI script) starts with both ignored, an ignored
    signal stays ignored across exec, and Python then installs no SIGINT
    handler, so the SIGINT that stops `serve run` cleanly would do nothing
    (Popen's `restore_signals` covers SIGPIPE, SIGXFZ and SIGXFSZ only).

    On Linux also SIGINT to it when diglett dies, however it dies
    (PR_SET_PDEATHSIG); ctypes is loaded here, before the fork: the child
    only makes the call."""
    prctl = None
    if sys.platform.startswith("linux"):
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    PR_SET_PDEATHSIG = 1

    def setup() -> None:
        for signum in (signal.SIGINT, signal.SIGQUIT):
            signal.signal(signum, signal.SIG_DFL)
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGINT)

    return setup


def start_serve_run(cmd: list[str], **kwargs) -> subprocess.Popen:
    """Start `serve run` (`cmd`) as `diglett serve` does: in a session of its
    own, with SIGINT, its clean stop, reaching it (see `_child_setup`)."""
    return subprocess.Popen(
        cmd, start_new_session=True, preexec_fn=_child_setup(), **kwargs
    )


def cmd_serve(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    settings = Settings.from_env()
    refused = settings.open_without_token()
    if refused:
        print(f"diglett: {refused}", file=sys.stderr)
        return 2
    if not settings.api_token and not settings.host:
        print(
            "diglett: no DIGLETT_API_TOKEN: listening on 127.0.0.1 only; set a "
            "token to serve other machines",
            flush=True,
        )
    if not _check_port(settings):
        return 2
    from diglett.model.model_store import ModelNotFoundError, resolve_model_dir

    try:
        model_dir = resolve_model_dir(settings, progress=True)
    except ModelNotFoundError as exc:
        print(f"diglett: {exc}", file=sys.stderr)
        return 2
    os.environ["DIGLETT_MODEL_DIR"] = str(model_dir)
    apply_serve_env()  # `serve run` starts Ray with HAProxy and throughput mode
    gpus = _gpu_count()
    config = render_config(Path(args.config), settings, gpus)
    with tempfile.NamedTemporaryFile(
        "w", suffix=".yaml", prefix="diglett-serve-", delete=False
    ) as f:
        yaml.safe_dump(config, f, sort_keys=False)
        rendered = f.name
    serve_bin = shutil.which("serve") or str(Path(sys.executable).parent / "serve")
    print(
        f"diglett: model {model_dir} ({'GPU x%d' % gpus if gpus else 'CPU'}); "
        f"starting Ray Serve with {args.config}",
        flush=True,
    )
    # `serve run` stops cleanly (Serve, then HAProxy) on SIGINT only; killed
    # by another signal it leaves HAProxy holding the port. So it runs in a
    # session of its own, out of reach of signals to diglett's process group
    # (a terminal's Ctrl-C, `kill -- -PGID`, a service manager's stop), and
    # diglett passes each stop on to it as SIGINT.
    proc = start_serve_run([serve_bin, "run", rendered], cwd=ROOT)

    def stop_serve(signum, frame) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop_serve)
    bound = settings.bind_host()
    host = "127.0.0.1" if bound in ("0.0.0.0", "::") else bound
    base = f"http://{host}:{settings.port}"
    try:
        stopped = lambda: proc.poll() is not None  # noqa: E731
        if wait_until_healthy(base, args.start_timeout, stopped, direct=False):
            # New connections take Serve's slower fallback proxy until
            # HAProxy lists the ingress replica (serve_app/serve_env.py).
            direct = wait_until_healthy(base, DIRECT_ROUTE_WAIT_S, stopped)
            if proc.poll() is None:
                if not direct:
                    print(
                        "diglett: HAProxy does not route to the ingress "
                        "directly yet; connections go through Serve's proxy "
                        "meanwhile",
                        flush=True,
                    )
                print(
                    f"diglett: ready in {time.monotonic() - t0:.1f} s — "
                    f"ws://{host}:{settings.port}/v1/stream  (docs: {base}/docs)",
                    flush=True,
                )
        elif proc.poll() is None:
            print("diglett: /healthz not ok yet; still starting", flush=True)
        return proc.wait()
    finally:
        os.unlink(rendered)


def cmd_fetch_model(args: argparse.Namespace) -> int:
    from diglett.model.model_store import ModelNotFoundError, fetch_model

    try:
        path = fetch_model(Settings.from_env())
    except ModelNotFoundError as exc:
        print(f"diglett: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diglett", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="start Ray and the Serve application")
    p_serve.add_argument("--config", default=str(DEFAULT_CONFIG))
    p_serve.add_argument("--start-timeout", type=float, default=600.0)
    p_serve.set_defaults(func=cmd_serve)
    p_fetch = sub.add_parser("fetch-model", help="fill the model cache")
    p_fetch.set_defaults(func=cmd_fetch_model)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
