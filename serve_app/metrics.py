"""Prometheus metrics through Ray's metrics agent (`ray.util.metrics`).

Each Ray node exports what its processes record at
`http://<node>:<metrics-export-port>/metrics`; Ray prefixes application
metrics with `ray_`, so the series are `ray_diglett_*`. Metrics are created
lazily in the process that records them and recording never raises: a
metrics failure must not fail a session. Ray 2.60 exports histogram `_sum`s
from bucket midpoints (approximate); buckets and `_count` are exact.

Ray 2.60 also drops a gauge series that was not set again within two export
intervals (~20 s; ray-project/ray#64633): a gauge set once, as ours was on
each session's open and close, vanished from the scrape ~25 s later
(measured), so a server with steady sessions showed none. The session
gauge is therefore set again every `GAUGE_REFRESH_S` by a thread.

    diglett_sessions_active            gauge      open WebSockets, per ingress replica
    diglett_sessions_total             counter    sessions opened (tag: kind=new|resume)
    diglett_windows_embedded_total     counter    windows through the model
    diglett_batch_windows              histogram  windows per model call
    diglett_embed_seconds              histogram  model time per batch
    diglett_label_latency_seconds      histogram  last sample of a hop -> label sent
    diglett_errors_total               counter    error messages sent (tag: code)
    diglett_fallbacks_total            counter    a private-API speed-up not used, and
                                                  the plain path taken (tag: mechanism=
                                                  session_fork|cpu_compile; docs/internals.md)
"""

from __future__ import annotations

import logging
import os
import threading
import time

logger = logging.getLogger("diglett.metrics")

BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]
EMBED_S_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
LATENCY_S_BOUNDARIES = [0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0]

# Under Ray's export interval (10 s), so every interval carries a fresh value.
GAUGE_REFRESH_S = 5.0

_lock = threading.Lock()
_metrics: dict = {}
_active: int | None = None  # the last session count set, for the refresher
_refresher: threading.Thread | None = None
_disabled = os.environ.get("DIGLETT_METRICS", "1") == "0"


def _get(name: str):
    """The metric `name`, created on first use in this process (None if off)."""
    if _disabled:
        return None
    m = _metrics.get(name)
    if m is not None:
        return m
    with _lock:
        if name not in _metrics:
            try:
                _metrics[name] = _create(name)
            except Exception as exc:  # e.g. not inside a Ray process
                logger.debug("metric %s unavailable: %r", name, exc)
                _metrics[name] = False
        return _metrics[name]


def _create(name: str):
    from ray.util import metrics as m

    if name == "sessions_active":
        return m.Gauge(
            "diglett_sessions_active", "Open WebSocket sessions on this ingress."
        )
    if name == "sessions_total":
        return m.Counter(
            "diglett_sessions_total", "Sessions opened.", tag_keys=("kind",)
        )
    if name == "windows":
        return m.Counter(
            "diglett_windows_embedded_total", "Windows embedded by the model."
        )
    if name == "batch":
        return m.Histogram(
            "diglett_batch_windows",
            "Windows per model call.",
            boundaries=BATCH_BOUNDARIES,
        )
    if name == "embed_s":
        return m.Histogram(
            "diglett_embed_seconds",
            "Model time per batch.",
            boundaries=EMBED_S_BOUNDARIES,
        )
    if name == "latency":
        return m.Histogram(
            "diglett_label_latency_seconds",
            "Time from a hop's last sample to its label being sent.",
            boundaries=LATENCY_S_BOUNDARIES,
        )
    if name == "errors":
        return m.Counter(
            "diglett_errors_total", "Error messages sent, by code.", tag_keys=("code",)
        )
    if name == "fallbacks":
        return m.Counter(
            "diglett_fallbacks_total",
            "Switched-on private-API mechanisms that fell back to the plain path.",
            tag_keys=("mechanism",),
        )
    raise KeyError(name)


def _safe(fn) -> None:
    try:
        fn()
    except Exception as exc:
        logger.debug("metric update failed: %r", exc)


def set_active(n: int) -> None:
    """The ingress's open sessions; kept exported until the next call."""
    global _active, _refresher
    _active = n
    if m := _get("sessions_active"):
        _safe(lambda: m.set(n))
        with _lock:
            if _refresher is None:
                _refresher = threading.Thread(
                    target=_refresh_gauges, name="diglett-gauges", daemon=True
                )
                _refresher.start()


def _refresh_gauges() -> None:
    """Set the session gauge again every GAUGE_REFRESH_S (see the top)."""
    while True:
        time.sleep(GAUGE_REFRESH_S)
        n, m = _active, _get("sessions_active")
        if m and n is not None:
            _safe(lambda: m.set(n))


def session_opened(resumed: bool) -> None:
    if m := _get("sessions_total"):
        _safe(lambda: m.inc(1, tags={"kind": "resume" if resumed else "new"}))


def batch(windows: int, seconds: float) -> None:
    """One model call of `windows` windows that took `seconds`."""
    if m := _get("windows"):
        _safe(lambda: m.inc(windows))
    if m := _get("batch"):
        _safe(lambda: m.observe(windows))
    if m := _get("embed_s"):
        _safe(lambda: m.observe(seconds))


def message_sent(msg: dict) -> None:
    """Record a server message: label latency, or an error's code."""
    kind = msg.get("type")
    if kind == "label" and msg.get("latency_ms") is not None:
        if m := _get("latency"):
            _safe(lambda: m.observe(msg["latency_ms"] / 1e3))
    elif kind == "error":
        error(str(msg.get("code", "unknown")))


def error(code: str) -> None:
    if m := _get("errors"):
        _safe(lambda: m.inc(1, tags={"code": code}))


def fallback(mechanism: str) -> None:
    """A switched-on mechanism of docs/internals.md fell back (its caller
    logs why): `session_fork` per SessionActor not forked, `cpu_compile`
    per CPU replica serving the traced int8 model."""
    if m := _get("fallbacks"):
        _safe(lambda: m.inc(1, tags={"mechanism": mechanism}))
