"""Server settings, read from the environment and an optional `.env` file.

Every process of the server (the Serve driver, the ingress replica, the
embedding replica, each SessionActor) builds its own `Settings` from the same
environment, so a value set once in `.env` or the shell reaches all of them.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from dotenv import load_dotenv

MODEL_NAME = "speechbrain/spkrec-ecapa-voxceleb"
SAMPLE_RATE = 16000
PROTOCOL_VERSION = 1
CPU_PRECISIONS = ("int8", "fp32")
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")  # DIGLETT_CPU_PRECISION values


def default_cache_dir() -> Path:
    """Where Diglett keeps the model it fetched: `$XDG_CACHE_HOME/diglett`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "diglett"


@dataclass(frozen=True)
class Settings:
    """All tunables of the server; field `x` is read from `DIGLETT_X`."""

    # Where `diglett serve` listens; "": 0.0.0.0 with an api_token, else
    # 127.0.0.1 (an open server stays on this machine unless asked).
    host: str = ""
    port: int = 8000
    model_dir: str = ""
    cache_dir: str = field(default_factory=lambda: str(default_cache_dir()))
    hub_timeout_s: float = 5.0
    device: str = "auto"
    threshold: float = 0.25
    # Per-speaker bar = rel_threshold x the enrollment's self-score (see
    # diglett/engine/decision.py); 0 turns it off and `threshold` applies to all.
    rel_threshold: float = 0.3
    # Look-ahead, in hops (0 to 1): label each hop once this much more audio
    # has come, from the window ending that much later where the talk goes
    # on into it (session.py; + lookahead_hops x hop_s latency); 0: none.
    lookahead_hops: float = 0.0
    # A hop whose window's score for any speaker fell by more than this
    # since the previous hop's window gets a second look at the window's
    # last 0.75 s (a talker may have taken over inside it; session.py,
    # decision.second_look). 0: off; no effect with look-ahead.
    change_drop: float = 0.1
    # Speech detector (diglett/engine/speech.py): "silero" (Silero VAD, onnxruntime)
    # or "energy" (20 ms frames at or above gate_dbfs; no model). A hop is
    # speech when at least speech_min_frac of it is (docs/accuracy.md).
    vad: str = "silero"
    gate_dbfs: float = -55.0
    # A hop whose speech matches no enrolled speaker and whose speech frames
    # average under this Silero probability is background (babble, a TV):
    # `silence`, not `noise` (session.is_background). 0: off.
    background_prob: float = 0.7
    # ...and so is one whose level is less than this many dB over the
    # stream's background (the quieter tenth of its last 40 s in 0.1 s
    # blocks; levels.RecentFloor): speech barely over the background is the
    # background. 0: off.
    background_margin_db: float = 5.0
    # Both rules hold only where the background moves like talk (babble):
    # its blocks' spectral shapes spread by at least this many dB (mean std
    # over bands; levels.BackgroundMotion). Steady noise spreads less, and
    # there the rules took quiet talkers and intruders for the background.
    # 0: in any background.
    background_motion_db: float = 2.8
    # Speech the detector misses yet over the stream's background by
    # speech.QUIET_OVER_DB (a quiet talker in noise: Silero's probabilities
    # fall with the level) is scored again in the hop's window raised by
    # this many dB (speech.SileroDetector.recheck_quiet). 0: off; no effect
    # with vad "energy".
    quiet_gain_db: float = 30.0
    speech_min_frac: float = 0.3
    window_s: float = 1.5
    hop_s: float = 0.5
    # Most windows per model call; 0: 32 on a CPU replica, 512 on a GPU
    # (serve_app/embedding.py: a GPU needs big batches to be busy).
    batch_size: int = 0
    batch_wait_s: float = 0.005
    api_token: str = ""
    # 1: allow serving on a non-loopback host without api_token (anyone who
    # reaches the port may then stream and use the GPU).
    allow_open: int = 0
    session_ttl_s: float = 60.0
    max_sessions: int = 500
    # Per client (an API token when there are several, an address when it
    # is provably the client's; diglett/engine/client_limits.py), per ingress
    # replica: sessions held (open or resumable) and new sessions per second
    # (a bucket of client_new_burst). 0: that rule is off.
    client_max_sessions: int = 100
    client_new_per_s: float = 5.0
    client_new_burst: int = 50
    # Proxies in front of Ray Serve that each append the address they saw to
    # X-Forwarded-For (e.g. 1: one load balancer, and port 8000 reachable
    # only through it). 0: no client-sent X-Forwarded-For is believed.
    forwarded_hops: int = 0
    max_rate: float = 20.0
    rate_burst_s: float = 60.0
    enroll_min_s: float = 3.0
    enroll_min_speech_s: float = 1.5
    enroll_max_s: float = 30.0
    max_speakers: int = 2
    max_upload_s: float = 60.0
    # "ecapa" (the real model); BENCHMARK ONLY: "noop" (a constant vector, to
    # measure the serving path alone) or "ecapa-random" (real shape, random
    # weights, for GPU machines the weights cannot reach).
    embedder: str = "ecapa"
    # BENCHMARK/TEST ONLY, with embedder "noop": seconds the no-op model
    # sleeps per window, a model of known cost that uses no CPU.
    noop_window_s: float = 0.0
    # Threads torch may use in a CPU embedding replica; 0: all of the node's
    # cores but one (serve_app/embedding.py, default_torch_threads). Ray's
    # OMP_NUM_THREADS=1 for a 1-CPU actor is not what a big CPU node wants.
    torch_threads: int = 0
    # "int8": a CPU replica runs ECAPA's pointwise convolutions as int8 GEMMs
    # time-major and traced (diglett/model/int8.py, ecapa_time_major.py: 3.8x the
    # windows/s of fp32 at one thread: bench/cpu_model.py; its labels,
    # accuracy: bench/cv_decision.py, docs/accuracy.md); "fp32": exact.
    cpu_precision: str = "int8"
    # 1: with int8, a CPU replica runs this machine's int8 model compiled
    # ahead of time (torchao + AOTInductor, diglett/model/compiled_int8.py: 1.2-1.3x
    # the traced model's windows/s, bench/compiled_int8.py) once it is
    # built: the first replica on a machine serves the traced model and
    # builds it in the background (a C++ compiler, ~2 min of idle CPU, once
    # per machine); replicas started later load it, none swaps it in while
    # it serves. 0: traced only. Both are batch-invariant.
    cpu_compile: int = 1
    # Enrollment windows each node's EmbedBatcher keeps out at once; a
    # stream's windows go first (diglett/lanes.py), so sessions that start
    # together do not hold back the labels of those already streaming.
    # 0: auto (8 without a GPU in the cluster, ~0.2 s of a CPU replica's
    # model time; 512 with one); -1: one first-come, first-served queue.
    enroll_in_flight: int = 0
    # Niceness of the serving processes we start (SessionActors, the ingress,
    # the batchers; diglett/priority.py) so that a CPU embedding replica's
    # torch thread, the bottleneck, runs first when both are ready. 0: off.
    serving_nice: int = 5
    # Placement on a multi-node cluster (see docs/operations.md).
    # SessionActors: Ray scheduling strategy ("SPREAD" or "DEFAULT"), and
    # optionally a custom resource each one takes 1 unit of, so a node that
    # advertises `diglett_session: 500` holds at most 500 sessions.
    session_strategy: str = "SPREAD"
    session_resource: str = ""
    # SessionActors each ingress replica keeps started and idle, so that a new
    # connection gets `ready` without waiting for a Ray worker process to
    # start (~0.5 s alone, seconds when many open at once). Each costs one
    # idle SessionActor's memory (see docs/performance.md).
    session_pool: int = 8
    # 1: a session that ends cleanly (`end`) hands its SessionActor back to
    # the warm pool, reset, when the pool has room, instead of ending it:
    # starting one costs ~0.75 s of CPU (0.47 s of it Ray's setup_worker.py
    # importing Ray before our fork shim runs; docs/performance.md), a
    # reset ~2 ms. 0: every session's actor ends with it.
    session_recycle: int = 1
    # 1: SessionActor workers are forked by a per-node fork server that has
    # already imported Ray, numpy and the session code (actors/fork_server.py),
    # so each shares those pages (private memory a session: docs/internals.md).
    # Opt-in: it runs Ray's private worker entry point and reads the raylet's
    # worker command line, which a Ray patch release may change; a session it
    # does not fork is logged and counted (diglett_fallbacks_total).
    # 0: Ray starts each one as a fresh Python process.
    session_fork: int = 0
    # Batches are padded up to these sizes (comma-separated), each warmed up
    # at start. "": a GPU replica pads to 8, 16, 32, 64, then multiples of
    # 64 up to batch_size (diglett/model/embedder.py, gpu_batch_shapes); a CPU
    # replica does not pad.
    batch_shapes: str = ""
    # 1: a GPU replica runs ECAPA through torch.compile, each batch shape
    # compiled at start (minutes; fewer `batch_shapes` start faster).
    gpu_compile: int = 0
    # Model threads of a GPU replica, each with its own CUDA stream, so one
    # stacks and copies a batch while the GPU computes another's (1-4).
    gpu_streams: int = 2
    # EmbeddingDeployment replicas: a custom resource each takes 1 unit of
    # (e.g. `diglett_embed`), in addition to any GPU the Serve config asks for.
    embed_resource: str = ""
    log_format: str = "json"
    allowed_origins: str = ""
    idle_timeout_s: float = 300.0

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, dotenv: bool = True
    ) -> "Settings":
        """Build settings from `env` (default: `os.environ`, after `.env`).

        Raises ValueError naming the variable when a value does not parse,
        so a typo in `.env` fails at start-up rather than mid-session.
        """
        if env is None:
            if dotenv:
                load_dotenv(override=False)
            env = os.environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = "DIGLETT_" + f.name.upper()
            if key not in env or env[key] == "":
                continue
            raw = env[key]
            kind = type(getattr(cls(), f.name))
            try:
                values[f.name] = kind(raw)
            except ValueError as exc:
                raise ValueError(
                    f"{key}={raw!r} is not a valid {kind.__name__}"
                ) from exc
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Reject combinations that would break the protocol's guarantees."""
        hop = self.hop_s * SAMPLE_RATE
        if hop <= 0 or abs(hop - round(hop)) > 1e-6:
            raise ValueError("DIGLETT_HOP_S must be a positive multiple of 1/16000 s")
        if self.window_s < self.hop_s:
            raise ValueError("DIGLETT_WINDOW_S must be at least DIGLETT_HOP_S")
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError("DIGLETT_THRESHOLD must lie in [-1, 1]")
        if not 0.0 <= self.lookahead_hops <= 1.0:
            raise ValueError("DIGLETT_LOOKAHEAD_HOPS must lie in [0, 1]")
        if not 0.0 <= self.change_drop <= 2.0:
            raise ValueError("DIGLETT_CHANGE_DROP must lie in [0, 2]")
        if not 0.0 <= self.rel_threshold <= 1.0:
            raise ValueError("DIGLETT_REL_THRESHOLD must lie in [0, 1]")
        if self.max_speakers < 1:
            raise ValueError("DIGLETT_MAX_SPEAKERS must be at least 1")
        if self.batch_size < 0:
            raise ValueError("DIGLETT_BATCH_SIZE must be 0 (auto) or more")
        self.parsed_batch_shapes()
        if self.cpu_compile not in (0, 1):
            raise ValueError("DIGLETT_CPU_COMPILE must be 0 or 1")
        if self.gpu_compile not in (0, 1):
            raise ValueError("DIGLETT_GPU_COMPILE must be 0 or 1")
        if not 1 <= self.gpu_streams <= 4:
            raise ValueError("DIGLETT_GPU_STREAMS must lie in [1, 4]")
        if self.session_strategy.upper() not in ("SPREAD", "DEFAULT"):
            raise ValueError("DIGLETT_SESSION_STRATEGY must be SPREAD or DEFAULT")
        if self.cpu_precision not in CPU_PRECISIONS:
            raise ValueError("DIGLETT_CPU_PRECISION must be int8 or fp32")
        if self.enroll_in_flight < -1:
            raise ValueError("DIGLETT_ENROLL_IN_FLIGHT must be -1, 0 (auto) or more")
        if not 0 <= self.serving_nice <= 19:
            raise ValueError("DIGLETT_SERVING_NICE must lie in [0, 19]")
        if self.session_fork not in (0, 1):
            raise ValueError("DIGLETT_SESSION_FORK must be 0 or 1")
        if self.session_recycle not in (0, 1):
            raise ValueError("DIGLETT_SESSION_RECYCLE must be 0 or 1")
        if self.vad not in ("silero", "energy"):
            raise ValueError("DIGLETT_VAD must be silero or energy")
        if not 0.0 <= self.background_prob <= 1.0:
            raise ValueError("DIGLETT_BACKGROUND_PROB must lie in [0, 1]")
        if self.background_motion_db < 0:
            raise ValueError("DIGLETT_BACKGROUND_MOTION_DB must be 0 or more")
        if self.background_margin_db < 0:
            raise ValueError("DIGLETT_BACKGROUND_MARGIN_DB must be 0 or more")
        if not 0.0 <= self.quiet_gain_db <= 60.0:
            raise ValueError("DIGLETT_QUIET_GAIN_DB must lie in [0, 60]")
        if not 0.0 <= self.speech_min_frac <= 1.0:
            raise ValueError("DIGLETT_SPEECH_MIN_FRAC must lie in [0, 1]")
        if self.log_format not in ("json", "text"):
            raise ValueError("DIGLETT_LOG_FORMAT must be json or text")
        if min(self.client_max_sessions, self.client_new_burst) < 0:
            raise ValueError("DIGLETT_CLIENT_MAX_SESSIONS/_NEW_BURST must be 0 or more")
        if self.client_new_per_s < 0:
            raise ValueError("DIGLETT_CLIENT_NEW_PER_S must be 0 or more")
        if self.noop_window_s < 0:
            raise ValueError("DIGLETT_NOOP_WINDOW_S must be 0 or more")
        if self.forwarded_hops < 0:
            raise ValueError("DIGLETT_FORWARDED_HOPS must be 0 or more")
        if self.allow_open not in (0, 1):
            raise ValueError("DIGLETT_ALLOW_OPEN must be 0 or 1")

    def bind_host(self) -> str:
        """The address to listen on: `host`, or by default 0.0.0.0 when an
        API token protects the server and 127.0.0.1 when none does."""
        return self.host or ("0.0.0.0" if self.api_token else "127.0.0.1")

    def open_without_token(self) -> str:
        """Why this server may not start ("" if it may): listening beyond
        this machine without an API token needs DIGLETT_ALLOW_OPEN=1."""
        host = self.bind_host()
        if self.api_token or self.allow_open or host in LOOPBACK_HOSTS:
            return ""
        return (
            f"DIGLETT_HOST={host} without DIGLETT_API_TOKEN would let anyone who "
            "reaches the port stream audio; set DIGLETT_API_TOKEN, or "
            "DIGLETT_ALLOW_OPEN=1 to serve openly on purpose"
        )

    def parsed_batch_shapes(self) -> tuple[int, ...]:
        """`batch_shapes` as sorted sizes; () when unset."""
        try:
            shapes = {int(x) for x in self.batch_shapes.split(",") if x.strip()}
        except ValueError:
            shapes = {0}
        if any(k < 1 for k in shapes):
            raise ValueError(
                "DIGLETT_BATCH_SHAPES must be positive integers, comma-separated"
            )
        return tuple(sorted(shapes))

    @property
    def api_tokens(self) -> tuple[str, ...]:
        """The accepted API tokens: `api_token`, comma-separated (a token
        holds no comma: it must fit in a WebSocket subprotocol)."""
        return tuple(t.strip() for t in self.api_token.split(",") if t.strip())

    @property
    def origins(self) -> frozenset[str]:
        """Allowed browser origins (lower-case, no trailing '/'); empty: all."""
        return frozenset(
            o.strip().rstrip("/").lower()
            for o in self.allowed_origins.split(",")
            if o.strip()
        )

    @property
    def hop_samples(self) -> int:
        return int(round(self.hop_s * SAMPLE_RATE))

    @property
    def lookahead_samples(self) -> int:
        return int(round(self.lookahead_hops * self.hop_samples))

    @property
    def window_samples(self) -> int:
        return int(round(self.window_s * SAMPLE_RATE))

    def info(self) -> dict[str, Any]:
        """The session-independent part of the protocol's `ready` message."""
        return {
            "protocol": PROTOCOL_VERSION,
            "sample_rate": SAMPLE_RATE,
            "encoding": "pcm_s16le",
            "window_s": self.window_s,
            "hop_s": self.hop_s,
            "enroll_min_s": self.enroll_min_s,
            "enroll_min_speech_s": self.enroll_min_speech_s,
            "enroll_max_s": self.enroll_max_s,
            "max_speakers": self.max_speakers,
            "model": MODEL_NAME,
            "threshold": self.threshold,
            "lookahead_s": self.lookahead_samples / SAMPLE_RATE,  # as the engine waits
        }

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
