"""The pure engine: protocol messages, audio decoding, windowing, levels,
speech detection and the decision, and the per-session state machine.

Nothing here imports Ray, FastAPI or torch (a test checks it), so all of it
runs and is tested in milliseconds; `actors/` and `serve_app/` call it.
"""
