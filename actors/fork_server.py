"""One per raylet: forks SessionActor workers from a process that has imported them.

A Ray worker is a fresh Python process that imports Ray (~700 modules),
numpy and our code: ~59 MiB of private memory (USS) per session, most of it
the same objects in every process. This server imports them once, then, for
each `actors/fork_shim.py` that asks, forks a child that runs Ray's
`default_worker.py` with the shim's argv, environment, working directory and
standard streams. The children share the imported pages copy-on-write and
keep only what they write to (docs/performance.md).

What makes forking safe here:
- the server is single-threaded when it forks (checked; OpenBLAS is kept to
  one thread, and nothing starts Ray's core worker before the fork);
- each child gets its own process group, the shim's environment and streams,
  and the default signal handlers; Python reseeds `random` in the child, and
  Ray's C++ random engine is first used after the fork (nothing preloaded
  defines a Ray actor; checked by forking two probes before serving);
- the server's C++ Ray config is read from the environment at import, so it
  only forks for requests whose `RAY_*`, `PYTHON*` and `LD_*` environment
  equals its own, and only Ray's own `default_worker.py`; anything else gets
  no pid and the shim execs the ordinary worker;
- it exits when its raylet does.

Run by the first shim of a node as `python -m actors.fork_server <socket>`.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import os
import runpy
import selectors
import signal
import socket
import struct
import sys
import time
import traceback

from actors.fork_shim import (
    FAILED_SUFFIX,
    MAX_REASON,
    MAX_REQUEST,
    SERVER_SUFFIX,
    SHIM_PID_ENV,
    _INT,
    _LEN,
    alive,
    decode_request,
    recv_exact,
    send_signal,
)

REQUEST_TIMEOUT_S = 5.0
_PEERCRED = struct.Struct("3i")  # pid, uid, gid of a Unix socket's peer
# Set per job by the raylet, and read after the fork: it may differ.
PER_WORKER_ENV = frozenset({"RAY_JOB_ID"})
BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


# Read when the server started and imported (Ray's config, the interpreter's
# PYTHON* settings, the dynamic loader's): a worker whose values differ (e.g.
# a job with a working_dir, which sets PYTHONPATH) would not get what a fresh
# interpreter would give it.
IMPORT_ENV_PREFIXES = ("RAY_", "PYTHON", "LD_")


def import_env(env: dict[str, str]) -> dict[str, str]:
    """The variables that the preloaded interpreter and Ray have already read."""
    return {
        k: v
        for k, v in env.items()
        if k.startswith(IMPORT_ENV_PREFIXES) and k not in PER_WORKER_ENV
    }


# What a SessionActor worker imports, except the modules that define Ray
# actors: `@ray.remote` on a class draws an ID from Ray's C++ random engine,
# which would then start every child from the same state (and their task IDs
# would collide). The child imports actors.session_actor itself (a few kB).
PRELOAD = (
    "ray._private.workers.default_worker",
    "ray.util.scheduling_strategies",
    "numpy",
    "diglett.engine.audio",
    "diglett.engine.holdback",
    "diglett.lanes",
    "diglett.logging_setup",
    "diglett.priority",
    "diglett.engine.protocol",
    "diglett.engine.session",
    "diglett.settings",
    "serve_app.metrics",
)


def preload() -> str:
    """Import what every SessionActor worker imports; the worker script's path."""
    # Before numpy is imported: its BLAS must not start threads in a process
    # that forks (a child would inherit locks held by threads it lacks).
    for var in BLAS_ENV:
        os.environ[var] = "1"
    gc.disable()  # no collections while the shared heap is being built
    for name in PRELOAD:
        importlib.import_module(name)
    gc.freeze()  # children must not touch these objects' GC headers
    worker = sys.modules["ray._private.workers.default_worker"]
    return os.path.realpath(worker.__file__)


def random_ids_diverge() -> bool:
    """True when two forked children draw different Ray IDs (so forking is safe).

    Ray's C++ engine behind `ObjectRef.from_random` and task IDs is seeded
    once per process, on first use; if something used it before the fork,
    every child would repeat the same IDs.
    """
    draws = []
    for _ in range(2):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                from ray._raylet import JobID, ObjectRef, TaskID

                ids = (
                    ObjectRef.from_random().hex()
                    + TaskID.for_fake_task(JobID.from_int(1)).hex()
                )
                os.write(write, ids.encode())
            finally:
                os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        with os.fdopen(read, "rb") as pipe:
            draws.append(pipe.read())
    return bool(draws[0]) and draws[0] != draws[1]


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


class ForkServer:
    """Accepts shims, forks workers, reports their exit codes."""

    def __init__(self, path: str, worker_script: str, env: dict[str, str]):
        self.path = path
        self.worker_script = worker_script
        self.env = import_env(env)
        self.raylet_pid = int(env.get("RAY_RAYLET_PID", "0"))
        self.selector = selectors.DefaultSelector()
        self.children: dict[int, socket.socket] = {}
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tmp = f"{path}.{os.getpid()}"
        self.listener.bind(tmp)
        os.chmod(tmp, 0o600)
        self.listener.listen(256)
        os.replace(tmp, path)  # appears whole, for shims polling for it

    def serve(self) -> None:
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        self.selector.register(self.listener, selectors.EVENT_READ, None)
        self.selector.register(self.wake_r, selectors.EVENT_READ, None)
        while True:
            if self.raylet_pid and not alive(self.raylet_pid):
                self.stop()
            for key, _ in self.selector.select(1.0):
                if key.fileobj is self.listener:
                    self._accept()
                elif key.fileobj == self.wake_r:
                    self._reap()
                else:
                    self._shim_event(key.fileobj, key.data)

    def stop(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os._exit(0)

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        try:
            conn.settimeout(REQUEST_TIMEOUT_S)
            shim_pid, uid, _gid = _PEERCRED.unpack(
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
            if uid != os.getuid():
                raise ValueError(f"request from uid {uid}")
            argv, env, cwd, fds = self._read_request(conn)
            env[SHIM_PID_ENV] = str(shim_pid)
        except (OSError, ValueError) as exc:
            print(f"bad request: {exc!r}", file=sys.stderr, flush=True)
            conn.close()
            return
        reason = self._refusal(argv, env)
        if reason:  # no pid: the shim starts the worker itself, and says why
            print(f"not forking: {reason}", file=sys.stderr, flush=True)
            try:
                conn.sendall(_INT.pack(-1) + reason.encode()[:MAX_REASON])
            except OSError:
                pass
            conn.close()
            for fd in fds:
                os.close(fd)
            return
        pid = os.fork()
        if pid == 0:
            self._become_worker(conn, argv, env, cwd, fds)
        for fd in fds:
            os.close(fd)
        try:
            conn.sendall(_INT.pack(pid))
        except OSError:  # the shim is gone already
            send_signal(pid, signal.SIGKILL)
        self.children[pid] = conn
        self.selector.register(conn, selectors.EVENT_READ, pid)

    def _read_request(self, conn: socket.socket):
        head, fds, _flags, _addr = socket.recv_fds(conn, _LEN.size, 3)
        try:
            if len(head) < _LEN.size:
                head += recv_exact(conn, _LEN.size - len(head))
            (size,) = _LEN.unpack(head)
            if size > MAX_REQUEST:
                raise ValueError(f"fork request of {size} bytes")
            body = recv_exact(conn, size)
            if len(body) < size or len(fds) != 3:
                raise ValueError("incomplete fork request")
            argv, env, cwd = decode_request(body)
        except Exception:
            for fd in fds:
                os.close(fd)
            raise
        return argv, env, cwd, fds

    def _refusal(self, argv: list[str], env: dict[str, str]) -> str:
        """Why this request must not be forked, or ''."""
        if os.path.realpath(argv[0]) != self.worker_script:
            return f"not Ray's default worker: {argv[0]!r}"
        wanted = import_env(env)
        if wanted != self.env:
            changed = set(wanted.items()) ^ set(self.env.items())
            return f"environment differs: {sorted({k for k, _ in changed})}"
        threads = thread_count()
        if threads != 1:
            return f"{threads} threads in the fork server"
        return ""

    def _shim_event(self, conn: socket.socket, pid: int) -> None:
        try:
            data = conn.recv(64)
        except OSError:
            data = b""
        if not data:  # the shim was killed: so is its worker
            send_signal(pid, signal.SIGKILL)
            self.selector.unregister(conn)

    def _reap(self) -> None:
        try:
            os.read(self.wake_r, 4096)
        except BlockingIOError:
            pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            if conn is None:
                continue
            try:
                conn.sendall(_INT.pack(os.waitstatus_to_exitcode(status)))
            except OSError:
                pass
            try:
                self.selector.unregister(conn)
            except (KeyError, ValueError):
                pass
            conn.close()

    def _become_worker(self, conn, argv, env, cwd, fds) -> None:
        """In the child: turn into the worker the shim asked for; never returns."""
        code = 1
        try:
            os.setpgid(0, 0)
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGCHLD, signal.SIGTERM):
                signal.signal(sig, signal.SIG_DFL)
            self.selector.close()
            self.listener.close()
            os.close(self.wake_r)
            os.close(self.wake_w)
            for other in self.children.values():
                other.close()
            conn.close()
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
            for fd in fds:
                if fd > 2:
                    os.close(fd)
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(env)
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(argv[0])
            gc.enable()
            try:
                runpy.run_path(argv[0], run_name="__main__")
                code = 0
            except SystemExit as exc:
                code = _exit_code(exc.code)
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                atexit._run_exitfuncs()
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)


def with_forked_workers(procs: list) -> list:
    """`procs` (psutil processes, e.g. a raylet and its descendants) plus the
    fork servers of the raylets among them and everything those forked.

    A forked worker is not a descendant of its raylet (its parent is the fork
    server, whose own parent, a shim, may have ended), so tools that find a
    node's processes by descent (benchmarks, tests) add them with this.
    """
    import psutil

    raylets = set()
    for proc in procs:
        try:
            if proc.name() == "raylet":
                raylets.add(str(proc.pid))
        except psutil.Error:
            pass
    out = {proc.pid: proc for proc in procs}
    for proc in psutil.process_iter(["cmdline"]):
        if "actors.fork_server" not in " ".join(proc.info["cmdline"] or []):
            continue
        try:
            if proc.environ().get("RAY_RAYLET_PID") not in raylets:
                continue
            family = [proc, *proc.children(recursive=True)]
        except psutil.Error:
            continue
        out.update((p.pid, p) for p in family)
    return list(out.values())


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _log_to(path: str) -> None:
    """Send the server's own output to a file in Ray's session log folder."""
    session = os.path.dirname(os.path.dirname(path))
    logs = os.path.join(session, "logs")
    raylet = os.path.basename(path).removesuffix(SERVER_SUFFIX)
    name = f"diglett-fork-server-{raylet}.log"  # e.g. ...-raylet.log
    target = os.path.join(logs if os.path.isdir(logs) else session, name)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def start(path: str) -> ForkServer:
    """Preload, check that forking is safe, listen; RuntimeError if it is not."""
    script = preload()
    threads = thread_count()
    if threads != 1:
        raise RuntimeError(f"{threads} threads after preload")
    if not random_ids_diverge():
        raise RuntimeError("forked children repeat Ray's random IDs")
    return ForkServer(path, script, dict(os.environ))


def main(argv: list[str]) -> int:
    path = argv[0]
    _log_to(path)
    started = time.monotonic()
    try:
        server = start(path)
    except Exception as exc:  # fail closed: the shims start ordinary workers
        print(f"not serving: {exc!r}", file=sys.stderr, flush=True)
        with open(path + FAILED_SUFFIX, "w") as marker:  # so none retries
            marker.write(f"{exc!r}\n")
        return 1
    print(
        f"fork server pid {os.getpid()} ready in {time.monotonic() - started:.1f} s"
        f" at {path}",
        file=sys.stderr,
        flush=True,
    )
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
