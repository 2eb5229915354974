"""Diglett: real-time streaming speaker verification and sound levels.

`diglett.engine` is the pure per-session logic (no Ray, FastAPI or torch);
`diglett.model` the speaker model; the modules here are what processes
share (settings, logging, leftovers of an earlier run, CPU priority, the
batcher's lanes). `serve_app` and `actors` hold the Ray Serve and Ray glue.
"""

__version__ = "0.1.0"
