"""The layout's one promise: the pure engine imports neither Ray, FastAPI nor
torch, so its tests run in milliseconds and it can run outside a Ray worker."""

import subprocess
import sys

CHECK = """
import importlib, pkgutil, sys
import diglett.engine as engine
for m in pkgutil.iter_modules(engine.__path__):
    importlib.import_module(f"diglett.engine.{m.name}")
print(",".join(sorted(n for n in ("ray", "fastapi", "starlette", "torch") if n in sys.modules)))
"""


def test_the_engine_imports_no_ray_fastapi_or_torch():
    out = subprocess.run(
        [sys.executable, "-c", CHECK], check=True, capture_output=True, text=True
    )
    assert out.stdout.strip() == ""


def test_every_engine_module_is_imported_by_the_check():
    import pkgutil

    import diglett.engine as engine

    names = {m.name for m in pkgutil.iter_modules(engine.__path__)}
    assert {"session", "protocol", "windowing", "levels", "decision"} <= names
