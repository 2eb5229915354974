"""The `py_executable` of SessionActor workers: asks the fork server for one.

Ray starts every worker as `exec <python> default_worker.py <args>`. For
SessionActors that command is `<python> -I -S fork_shim.py`, so this script
gets the worker's argv, environment, working directory and standard streams,
hands them to its node's fork server (`actors/fork_server.py`) and stays, as
the process Ray started, until that worker ends:

- the fork server forks the worker from a process that has already imported
  Ray, numpy and the session code, so the worker shares those pages instead
  of importing them again (~34 MiB of private memory a session, this shim
  included, instead of ~59; docs/performance.md);
- signals sent to this process are passed on to the worker, and if this
  process is killed the fork server kills the worker;
- the exit status of the worker becomes this process's.

If there is no fork server yet, the first shim starts one (under a lock, so
a hundred shims starting at once start one). If anything fails before the
worker exists, the shim execs the ordinary worker instead, so a session is
never lost to the fork server.

It runs with `-I -S` (no site-packages, no project on `sys.path`), so it
imports the standard library only and stays small (~4 MiB); the fork server
imports it as a module for the wire format below.

Wire format, over a Unix socket in Ray's session directory:
  request: 4-byte big-endian length, then NUL-separated fields
           (magic, cwd, argv count, argv..., env "KEY=VALUE"...), with the
           shim's fds 0, 1 and 2 attached (SCM_RIGHTS);
  replies: the worker's pid (4-byte signed), later its exit code (same;
           negative: killed by that signal); or, for a request the server
           refuses, -1 and then the reason (UTF-8) until it closes.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys
import time

MAGIC = b"diglett-fork-1"
# In a forked worker: the pid of its shim (the process Ray started).
SHIM_PID_ENV = "DIGLETT_FORK_SHIM_PID"
# In a worker the shim had to start itself: why it was not forked, for the
# SessionActor to log and count (`fallback_reason`).
FALLBACK_ENV = "DIGLETT_FORK_FALLBACK"
MAX_REASON = 1000  # bytes of a refusal's reason sent back to the shim
SERVER_SUFFIX = ".diglett-fork"  # appended to the raylet's socket path
FAILED_SUFFIX = ".failed"  # left by a server that found forking unsafe
SERVER_START_TIMEOUT_S = 60.0  # importing Ray and numpy on a busy 2-core node
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
_INT = struct.Struct("!i")
_LEN = struct.Struct("!I")
MAX_REQUEST = 1 << 20


def server_path(worker_argv: list[str]) -> str | None:
    """The fork server's socket for the raylet named in the worker's argv.

    One per raylet, beside the raylet's own socket, so the nodes of a cluster
    started on one machine each get their own.
    """
    for arg in worker_argv:
        if arg.startswith("--raylet-name="):
            return arg.split("=", 1)[1] + SERVER_SUFFIX
    return None


def encode_request(argv: list[str], env: dict[str, str], cwd: str) -> bytes:
    """A length-prefixed request; NUL cannot occur in argv, env or paths."""
    fields = [MAGIC, os.fsencode(cwd), str(len(argv)).encode()]
    fields += [os.fsencode(a) for a in argv]
    fields += [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()]
    body = b"\0".join(fields)
    return _LEN.pack(len(body)) + body


def decode_request(body: bytes) -> tuple[list[str], dict[str, str], str]:
    """(argv, env, cwd) from a request body; ValueError if it is not one."""
    fields = body.split(b"\0")
    if len(fields) < 3 or fields[0] != MAGIC:
        raise ValueError("not a diglett fork request")
    cwd = os.fsdecode(fields[1])
    count = int(fields[2])
    if count < 1 or len(fields) < 3 + count:
        raise ValueError("fork request without a worker command")
    argv = [os.fsdecode(a) for a in fields[3 : 3 + count]]
    env: dict[str, str] = {}
    for item in fields[3 + count :]:
        key, sep, value = item.partition(b"=")
        if not sep or not key:
            raise ValueError("malformed environment entry in fork request")
        env[os.fsdecode(key)] = os.fsdecode(value)
    return argv, env, cwd


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly n bytes, or fewer if the peer closed first."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def exit_status(code: int) -> int:
    """A shell-style exit status for a worker's exit code (-N: signal N)."""
    return 128 - code if code < 0 else code


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


def _start_server(path: str) -> socket.socket:
    """Connect, starting the fork server first if none answers (one, locked)."""
    import fcntl

    lock = os.open(path + ".lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _connect(path)
        except OSError:
            pass
        if os.path.exists(path + FAILED_SUFFIX):
            raise RuntimeError("the fork server refused to serve on this node")
        if os.path.exists(path):
            os.unlink(path)  # a dead server's socket
        server = os.fork()
        if server == 0:  # the server: its own group, on the full interpreter
            # A process group, not a session: Linux's autogroup scheduler
            # shares the CPU fairly between sessions, so a session of its
            # own would give all forked SessionActors together as much CPU
            # as the whole rest of the node, model included, whatever their
            # niceness.
            os.setpgid(0, 0)
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            args = [sys.executable, "-m", "actors.fork_server", path]
            os.execv(sys.executable, args)
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            time.sleep(0.05)
            try:
                return _connect(path)
            except OSError:
                pass
            if os.waitpid(server, os.WNOHANG)[0]:
                raise RuntimeError("the fork server exited; see its log")
        raise TimeoutError("the fork server did not start")
    finally:
        os.close(lock)


def _fork_worker(path: str, worker_argv: list[str]) -> tuple[socket.socket, int]:
    """Ask the fork server for the worker; its connection and the worker's pid."""
    try:
        sock = _connect(path)
    except OSError:
        sock = _start_server(path)  # or the node's .failed marker says not to
    request = encode_request(worker_argv, dict(os.environ), os.getcwd())
    socket.send_fds(sock, [request], [0, 1, 2])
    reply = recv_exact(sock, _INT.size)
    if len(reply) < _INT.size:
        raise ConnectionError("the fork server refused the worker")
    pid = _INT.unpack(reply)[0]
    if pid < 0:
        reason = recv_exact(sock, MAX_REASON).decode("utf-8", "replace")
        raise ConnectionError(f"the fork server refused the worker: {reason}")
    return sock, pid


def _exec_worker(worker_argv: list[str], reason: str) -> None:
    """The ordinary worker, as Ray would have started it, told `reason`
    (why it was not forked) in its environment."""
    os.environ[FALLBACK_ENV] = reason
    os.execv(sys.executable, [sys.executable, *worker_argv])


def fallback_reason(environ) -> str:
    """In a worker whose actor asked for the fork shim: why it was not
    forked, or "" if it was. A worker with neither mark was not started
    through the shim at all (a Ray release that no longer honours the
    `py_executable` of a runtime_env would do that)."""
    if SHIM_PID_ENV in environ:
        return ""
    return environ.get(FALLBACK_ENV) or "Ray did not start it through the fork shim"


def _wait(sock: socket.socket, pid: int) -> int:
    """The worker's exit status; if the server is gone, watch the pid."""
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, lambda signum, _frame: send_signal(pid, signum))
    reply = recv_exact(sock, _INT.size)
    if len(reply) == _INT.size:
        return exit_status(_INT.unpack(reply)[0])
    while alive(pid):  # the fork server died; the worker may live on
        time.sleep(1.0)
    return 1


def alive(pid: int) -> bool:
    """Whether process `pid` exists (ours or not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def send_signal(pid: int, signum: int) -> None:
    """Signal `pid`, if it still exists."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def main(worker_argv: list[str]) -> int:
    path = server_path(worker_argv)
    if path is None:  # Ray changed its worker's command line
        _exec_worker(worker_argv, "no --raylet-name= in the worker's command line")
    if not hasattr(socket, "send_fds"):
        _exec_worker(worker_argv, "no socket.send_fds on this platform")
    try:
        sock, pid = _fork_worker(path, worker_argv)
    except Exception as exc:  # no fork server: the ordinary worker
        print(
            f"diglett fork shim: {exc!r}; starting the worker itself", file=sys.stderr
        )
        _exec_worker(worker_argv, str(exc) or repr(exc))
    return _wait(sock, pid)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
