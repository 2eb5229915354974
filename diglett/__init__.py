"""Diglett: real-time streaming speaker verification and sound levels.

This package holds the pure logic (audio, levels, windowing, decisions,
protocol, the session state machine), the model store and the command line;
`serve_app` and `actors` hold the Ray Serve and Ray glue.
"""

__version__ = "0.1.0"
