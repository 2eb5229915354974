"""The fork server that starts SessionActor workers (actors/fork_server.py).

Pure parts (wire format, refusals) in milliseconds; the fork-safety checks in
a fresh interpreter; then real Ray workers forked through the shim, on the
suite's local Ray instance.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from actors import fork_server
from actors.fork_shim import (
    FALLBACK_ENV,
    SHIM_PID_ENV,
    decode_request,
    encode_request,
    exit_status,
    fallback_reason,
    server_path,
)

ROOT = Path(__file__).resolve().parents[2]


def test_a_request_round_trips_argv_env_and_cwd():
    argv = ["/w/default_worker.py", "--a=b c", "ünï", "--x==y", ""]
    env = {"PATH": "/bin:/usr/bin", "EMPTY": "", "EQ": "a=b=c", "RAY_X": "1"}
    wire = encode_request(argv, env, "/tmp/some dir")
    assert int.from_bytes(wire[:4], "big") == len(wire) - 4
    assert decode_request(wire[4:]) == (argv, env, "/tmp/some dir")


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"other-magic\0/\x001\0w.py",
        b"diglett-fork-1\0/\x000",  # no worker command
        b"diglett-fork-1\0/\x003\0w.py",  # fewer argv than announced
        b"diglett-fork-1\0/\x001\0w.py\0NOEQUALS",
        b"diglett-fork-1\0/\x001\0w.py\0=value",
        b"diglett-fork-1\0/\0x\0w.py",  # count is not a number
    ],
)
def test_a_malformed_request_is_refused(body):
    with pytest.raises(ValueError):
        decode_request(body)


def test_the_server_socket_sits_beside_the_raylets():
    argv = ["w.py", "--node-ip-address=1.2.3.4", "--raylet-name=/s/sockets/raylet.1"]
    assert server_path(argv) == "/s/sockets/raylet.1.diglett-fork"
    assert server_path(["w.py", "--node-ip-address=1.2.3.4"]) is None


def test_exit_status_is_shell_style():
    assert [exit_status(c) for c in (0, 1, -9, -15)] == [0, 1, 137, 143]


def test_a_worker_knows_whether_and_why_it_was_not_forked():
    assert fallback_reason({SHIM_PID_ENV: "12"}) == ""
    assert fallback_reason({FALLBACK_ENV: "environment differs"}) == (
        "environment differs"
    )
    assert "not start it through the fork shim" in fallback_reason({})


def test_a_session_not_forked_is_logged_and_counted(monkeypatch, caplog):
    from actors import session_actor
    from diglett.settings import Settings

    counted = []
    monkeypatch.setattr(session_actor.metrics, "fallback", counted.append)
    on, off = Settings(session_fork=1), Settings(session_fork=0)
    with caplog.at_level("WARNING", logger="diglett.engine.session"):
        assert session_actor.report_fork_fallback(on, {SHIM_PID_ENV: "1"}) == ""
        assert session_actor.report_fork_fallback(off, {}) == ""
        assert counted == [] and not caplog.records
        reason = session_actor.report_fork_fallback(on, {FALLBACK_ENV: "why"})
    assert reason == "why" and counted == ["session_fork"]
    assert "not forked" in caplog.text and "why" in caplog.text


def test_only_import_time_variables_must_match():
    env = {"RAY_RAYLET_PID": "7", "RAY_JOB_ID": "01", "PATH": "/bin", "FOO": "x"}
    env.update(PYTHONPATH="/job/working_dir", PYTHONUNBUFFERED="1", LD_PRELOAD="x")
    assert fork_server.import_env(env) == {
        "RAY_RAYLET_PID": "7",
        "PYTHONPATH": "/job/working_dir",
        "PYTHONUNBUFFERED": "1",
        "LD_PRELOAD": "x",
    }


def test_the_server_refuses_what_it_cannot_fork_safely(tmp_path, monkeypatch):
    monkeypatch.setattr(fork_server, "thread_count", lambda: 1)
    script = os.path.realpath(fork_server.__file__)
    env = {"RAY_RAYLET_PID": str(os.getpid()), "PATH": "/bin"}
    server = fork_server.ForkServer(str(tmp_path / "s.sock"), script, env)
    try:
        assert oct(os.stat(tmp_path / "s.sock").st_mode & 0o777) == "0o600"
        assert server._refusal([script, "--x"], {**env, "OTHER": "y"}) == ""
        assert "default worker" in server._refusal(["/bin/sh"], env)
        changed = server._refusal([script], {**env, "RAY_worker_niceness": "0"})
        assert "RAY_worker_niceness" in changed
        assert "PYTHONPATH" in server._refusal([script], {**env, "PYTHONPATH": "/j"})
        monkeypatch.setattr(fork_server, "thread_count", lambda: 3)
        assert "3 threads" in server._refusal([script], env)
    finally:
        server.listener.close()


def _fresh_python(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def test_preload_leaves_only_our_actor_modules_to_the_child():
    """Everything a SessionActor imports is shared, but the two modules that
    define Ray actors (which the child must import itself)."""
    out = _fresh_python("""
        import sys
        from actors import fork_server
        fork_server.preload()
        before = set(sys.modules)
        import actors.session_actor
        print(sorted(set(sys.modules) - before))
    """)
    assert out == "['actors.embed_batcher', 'actors.session_actor']"


def test_preloaded_server_is_single_threaded_and_its_children_draw_distinct_ids():
    """The check the server runs before serving, and proof it can fail: once a
    Ray actor class is defined, forked children repeat the same IDs."""
    out = _fresh_python("""
        import ray
        from actors import fork_server
        fork_server.preload()
        print(fork_server.thread_count(), fork_server.random_ids_diverge())

        @ray.remote
        class Defined:
            pass

        print(fork_server.random_ids_diverge())
    """)
    assert out.split() == ["1", "True", "False"]


# --- the shim and the server, without Ray ----------------------------------


def _run_shim(tmp_path: Path, env: dict) -> subprocess.CompletedProcess:
    """The shim asked for a worker that is not Ray's: it must run it itself."""
    script = tmp_path / "not_ray.py"
    script.write_text(
        "import os, sys\nprint('ran', sys.argv[1:])\n"
        f"print('fallback:', os.environ.get({FALLBACK_ENV!r}))\nsys.exit(7)\n"
    )
    shim = ROOT / "actors" / "fork_shim.py"
    raylet = tmp_path / "sockets" / "raylet"
    raylet.parent.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "-I", "-S", str(shim), str(script), f"--raylet-name={raylet}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_shim_starts_a_server_and_runs_a_refused_worker_itself(tmp_path):
    keeper = subprocess.Popen(["sleep", "300"])  # the "raylet" the server watches
    try:
        out = _run_shim(tmp_path, {**os.environ, "RAY_RAYLET_PID": str(keeper.pid)})
        assert out.returncode == 7, out.stderr
        assert "ran ['--raylet-name=" in out.stdout
        # The server's reason reaches the worker, which reports it.
        assert "fallback: the fork server refused the worker: not Ray's" in out.stdout
        sock = tmp_path / "sockets" / "raylet.diglett-fork"
        assert sock.exists()  # the server it started is serving
        log = (tmp_path / "diglett-fork-server-raylet.log").read_text()
        assert "not forking: not Ray's default worker" in log
    finally:
        keeper.kill()
        keeper.wait()
    deadline = time.monotonic() + 10
    while sock.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not sock.exists()  # the server ends with its raylet


def test_a_node_whose_server_failed_runs_ordinary_workers_at_once(tmp_path):
    (tmp_path / "sockets").mkdir()
    (tmp_path / "sockets" / "raylet.diglett-fork.failed").write_text("unsafe\n")
    out = _run_shim(tmp_path, {**os.environ, "RAY_RAYLET_PID": str(os.getpid())})
    assert out.returncode == 7 and "ran" in out.stdout
    assert "refused to serve on this node" in out.stderr
    assert "fallback: the fork server refused to serve on this node" in out.stdout
    assert not (tmp_path / "sockets" / "raylet.diglett-fork").exists()


# --- real Ray workers, forked ---------------------------------------------


def _fork_server_of(pid: int) -> psutil.Process:
    parent = psutil.Process(pid).parent()
    assert parent is not None
    assert "actors.fork_server" in " ".join(parent.cmdline())
    return parent


def _forked_options(**env_vars):
    from serve_app.placement import fork_shim_command

    runtime_env = {"py_executable": fork_shim_command()}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    return {"num_cpus": 0, "runtime_env": runtime_env}


def test_forked_workers_call_an_async_actor_concurrently(server):
    """Forked callers hammer one async actor (the shape of SessionActors and
    their node's EmbedBatcher). When children shared Ray's random engine,
    their task IDs collided and that actor died ('OnArgsReady called
    twice'); here every call must come back."""
    import ray

    @ray.remote
    class Sink:
        async def put(self, caller: int, i: int) -> tuple[int, int]:
            return caller, i

    @ray.remote
    class Caller:
        def __init__(self, sink, n: int):
            self.sink, self.n = sink, n

        async def run(self, caller: int) -> list:
            import asyncio

            refs = [self.sink.put.remote(caller, i) for i in range(self.n)]
            return await asyncio.gather(*refs)

        def where(self) -> tuple[int, str, str, str, bool]:
            from ray._raylet import ObjectRef

            raylet = int(os.environ["RAY_RAYLET_PID"])
            return (
                os.getpid(),
                ray.get_runtime_context().get_worker_id(),
                os.environ.get("FORK_TEST", ""),
                ObjectRef.from_random().hex(),  # Ray's C++ random engine
                os.getsid(0) == os.getsid(raylet),  # the same CPU autogroup
            )

    sink = Sink.options(**_forked_options()).remote()
    callers = [
        Caller.options(**_forked_options(FORK_TEST=str(k))).remote(sink, 200)
        for k in range(4)
    ]
    results = ray.get([c.run.remote(k) for k, c in enumerate(callers)], timeout=120)
    for k, res in enumerate(results):
        assert res == [(k, i) for i in range(200)]
    where = ray.get([c.where.remote() for c in callers], timeout=60)
    assert [w[2] for w in where] == ["0", "1", "2", "3"]  # each its own env
    assert len({w[1] for w in where}) == 4
    assert len({w[3] for w in where}) == 4  # each its own random stream
    assert all(w[4] for w in where)  # scheduled beside the rest of the node
    servers = {_fork_server_of(w[0]).pid for w in where}
    assert len(servers) == 1  # one per raylet
    for actor in [sink, *callers]:
        ray.kill(actor)


def _gone(pid: int, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def test_a_killed_shim_takes_its_worker_and_a_killed_worker_its_shim(server):
    """Ray watches the process it started (the shim); the worker it talks to
    is the fork server's child. Neither may outlive the other."""
    import ray

    @ray.remote
    class Idle:
        def ids(self) -> tuple[int, int]:
            return os.getpid(), int(os.environ["DIGLETT_FORK_SHIM_PID"])

    a, b = (Idle.options(**_forked_options()).remote() for _ in range(2))
    (worker_a, shim_a), (worker_b, shim_b) = ray.get(
        [a.ids.remote(), b.ids.remote()], timeout=120
    )
    for shim in (shim_a, shim_b):
        assert any(x.endswith("fork_shim.py") for x in psutil.Process(shim).cmdline())
    os.kill(shim_a, signal.SIGKILL)
    assert _gone(worker_a)
    os.kill(worker_b, signal.SIGKILL)
    assert _gone(shim_b)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(b.ids.remote(), timeout=60)


def test_sessions_are_forked_when_switched_on_and_a_refusal_is_reported(server):
    """With DIGLETT_SESSION_FORK=1 a SessionActor must run in a forked
    worker: this fails if an upgrade (of Ray, or of the fork server's
    checks) silently stops the forking. One whose environment differs from
    the fork server's is refused, and says why."""
    import ray

    from actors.session_actor import SessionActor, session_actor_args
    from diglett.settings import Settings
    from serve_app.placement import session_actor_options

    settings = Settings.from_env({"DIGLETT_SESSION_FORK": "1"})
    options = session_actor_options(settings)
    refused = {**options["runtime_env"], "env_vars": {"RAY_DIGLETT_TEST": "1"}}
    args = session_actor_args(settings, ("diglett", "EmbeddingDeployment"), "s", "t")
    forked = SessionActor.options(**options).remote(*args)
    plain = SessionActor.options(**{**options, "runtime_env": refused}).remote(*args)
    try:
        one, other = ray.get([forked.stats.remote(), plain.stats.remote()], timeout=120)
        assert one["fork_fallback"] == ""
        _fork_server_of(one["pid"])
        assert "environment differs: ['RAY_DIGLETT_TEST']" in other["fork_fallback"]
    finally:
        for actor in (forked, plain):
            ray.kill(actor)
