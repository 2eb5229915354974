"""Structured (JSON) logs with the session id, never audio or embeddings.

Ray Serve's own replicas (the ingress, the embedding tier) log through Serve's
`logging_config` (`encoding: JSON` in cluster/serve.yaml), which already adds
`extra=` fields such as `session_id` to each JSON line. SessionActors are
plain Ray actors, so they install this formatter on the `diglett` logger:

    {"ts": "2026-11-28T00:20:01.123Z", "level": "INFO", "logger": "diglett.engine.session",
     "msg": "session 3f9c… expired after 61 s", "session_id": "3f9c…", "pid": 4242}

Arguments that are bytes or arrays are replaced by their size before a line
is written, so an accidental `logger.info("%s", pcm)` cannot leak audio or an
embedding into the logs. Pure Python: no Ray import.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from diglett.engine.access import redact

LOGGER = "diglett"
MAX_MSG = 2000
_FIELDS = ("session_id", "conn", "code", "node_id")


def _redact(value):
    if isinstance(value, str):
        return redact(value)  # `token=` / `resume_token=` in a URL
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    shape = getattr(value, "shape", None)
    if shape is not None and not isinstance(value, (str, int, float)):
        return f"<array shape={tuple(shape)}>"
    if isinstance(value, (list, tuple)) and len(value) > 16:
        return f"<{type(value).__name__} of {len(value)}>"
    return value


class RedactFilter(logging.Filter):
    """Replaces audio-like arguments and stamps a fixed session id, if any."""

    def __init__(self, session_id: str | None = None) -> None:
        super().__init__()
        self.session_id = session_id

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redact(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _redact(v) for k, v in record.args.items()}
        if self.session_id and not getattr(record, "session_id", None):
            record.session_id = self.session_id
        return True


def redact_serve_logs() -> None:
    """Add RedactFilter to every handler of the root logger and Ray Serve's
    (its access log among them) in this process, once: a URL with a token
    in its query string is logged with the token REDACTED."""
    for name in ("", "ray.serve", "ray", "uvicorn", "uvicorn.access"):
        for h in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactFilter) for f in h.filters):
                h.addFilter(RedactFilter())


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage()[:MAX_MSG],
        }
        for key in _FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        out["pid"] = record.process
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)[-MAX_MSG:]
        return json.dumps(out, default=str)


def configure(
    session_id: str | None = None, fmt: str = "json", level: int = logging.INFO
) -> logging.Logger:
    """Send the `diglett` loggers of this process to stderr, once.

    Calling it again (e.g. a new actor in a reused worker) only updates the
    session id stamped on each line.
    """
    root = logging.getLogger(LOGGER)
    for h in root.handlers:
        if getattr(h, "_diglett", False):
            for f in h.filters:
                if isinstance(f, RedactFilter):
                    f.session_id = session_id
            return root
    handler = logging.StreamHandler(sys.stderr)
    handler._diglett = True  # type: ignore[attr-defined]
    handler.addFilter(RedactFilter(session_id))
    handler.setFormatter(
        JsonFormatter()
        if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    return root
