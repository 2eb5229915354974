"""The compiled int8 model (diglett/model/compiled_int8.py): its cache rules in
milliseconds; then one real build (~2 min on 2 cores), its embeddings, and a
Serve replica that runs it."""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

from conftest import load16, model_dir, needs_model, needs_speakers, utterances
from diglett.model import compiled_int8
from diglett.model.compiled_int8 import CompiledEcapa, machine_key, package_path
from diglett.engine.decision import normalize
from diglett.settings import Settings


def test_the_package_name_keys_what_it_depends_on(tmp_path):
    one, two = package_path(tmp_path, 1), package_path(tmp_path, 2)
    assert one == package_path(tmp_path, 1)  # stable
    assert one != two  # threads are baked into the generated loops
    assert one.parent == tmp_path / "compiled" and one.suffix == ".pt2"
    assert machine_key(1) in one.name


def test_no_build_when_built_failed_or_no_compiler(tmp_path, monkeypatch):
    pkg = package_path(tmp_path, 1)
    pkg.parent.mkdir(parents=True)
    pkg.write_bytes(b"x")
    assert compiled_int8.start_build(tmp_path, pkg, 1) is None
    pkg.unlink()
    compiled_int8.failed_note(pkg).write_text("RuntimeError: no\n")
    assert compiled_int8.start_build(tmp_path, pkg, 1) is None
    compiled_int8.failed_note(pkg).unlink()
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert compiled_int8.start_build(tmp_path, pkg, 1) is None
    monkeypatch.undo()
    # A cache the server cannot write to: no build, and no error either.
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    if os.access(ro, os.W_OK):  # root writes anyway: stand a file in the way
        ro.rmdir()
        ro.write_text("a file where the cache's folder would be")
    assert compiled_int8.start_build(tmp_path, package_path(ro, 1), 1) is None


def test_a_second_build_waits_for_the_first_and_a_failed_one_says_why(tmp_path):
    import fcntl
    import threading

    pkg = package_path(tmp_path, 1)
    pkg.parent.mkdir(parents=True)
    args = ["--model-dir", str(tmp_path), "--out", str(pkg), "--threads", "1"]
    # Another build holds the lock and finishes: this one builds nothing.
    lock = open(pkg.with_suffix(".lock"), "w")
    fcntl.flock(lock, fcntl.LOCK_EX)

    def finish() -> None:
        pkg.write_bytes(b"built by the other")
        lock.close()

    threading.Timer(0.5, finish).start()
    assert compiled_int8.main(args) == 0
    assert pkg.read_bytes() == b"built by the other"
    # No model in the folder: the build fails and says why, once.
    pkg.unlink()
    assert compiled_int8.main(args) == 1
    assert compiled_int8.failed_note(pkg).read_text().strip()
    assert not pkg.exists() and not list(pkg.parent.glob("*.part*"))
    assert compiled_int8.main(args) == 1  # not tried again


def test_shapes_outside_the_package_go_to_the_fallback():
    calls = []

    class Runner:
        def run(self, x):
            calls.append(("compiled", tuple(x.shape)))
            return torch.zeros(x.shape[0], 1, 192)

    def fallback(x, lengths=None):
        calls.append(("traced", tuple(x.shape)))
        return torch.ones(x.shape[0], 1, 192)

    m = CompiledEcapa(Runner(), fallback)
    m(torch.zeros(3, 151, 80), torch.ones(3))
    m(torch.zeros(2, compiled_int8.MIN_FRAMES - 1, 80))  # too short
    m(torch.zeros(compiled_int8.MAX_BATCH + 1, 20, 80))  # too many
    m(torch.zeros(2, 151, 80), torch.tensor([1.0, 0.5]))  # partial lengths
    assert [c[0] for c in calls] == ["compiled", "traced", "traced", "traced"]


@needs_model
def test_an_unusable_package_is_replaced(tmp_path, monkeypatch):
    from diglett.model.embedder import Embedder

    emb = Embedder.load(model_dir(), "cpu", "int8")
    traced = emb.encoder.mods.embedding_model
    pkg = package_path(tmp_path, 1)
    pkg.parent.mkdir(parents=True)
    pkg.write_bytes(b"not a package")
    started = []
    monkeypatch.setattr(
        compiled_int8, "start_build", lambda *a: started.append(a) or None
    )
    assert emb.use_compiled_int8(model_dir(), tmp_path, 1) == "traced"
    assert emb.encoder.mods.embedding_model is traced
    assert not pkg.exists() and started == [(model_dir(), pkg, 1)]
    # The package there, its runner not: the same.
    pkg.write_bytes(b"not a package")
    assert emb.use_compiled_int8(model_dir(), tmp_path, 1) == "traced"
    assert not pkg.exists() and len(started) == 2


def test_why_the_traced_model_serves(tmp_path, monkeypatch):
    pkg = package_path(tmp_path, 1)
    pkg.parent.mkdir(parents=True)
    assert "started its build" in compiled_int8.traced_reason(pkg, building=True)
    compiled_int8.failed_note(pkg).write_text("RuntimeError: no g++ today\n")
    assert "no g++ today" in compiled_int8.traced_reason(pkg, building=False)
    compiled_int8.failed_note(pkg).unlink()
    assert "no usable package" in compiled_int8.traced_reason(pkg, building=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert "no C++ compiler" in compiled_int8.traced_reason(pkg, building=False)


def test_a_replica_logs_and_counts_the_traced_fallback(tmp_path, monkeypatch):
    from serve_app import embedding

    class Fake:
        cpu_int8_package = package_path(tmp_path, 1)
        cpu_int8_build = None

        def __init__(self, result):
            self.result = result

        def use_compiled_int8(self, model_dir, cache_dir, threads):
            if isinstance(self.result, Exception):
                raise self.result
            if self.result == "traced":
                self.cpu_int8_build = object()  # it started the build
            return self.result

    counted, logged = [], []
    monkeypatch.setattr(embedding.metrics, "fallback", counted.append)
    # Serve's logger does not propagate to pytest's handler.
    monkeypatch.setattr(embedding.logger, "warning", lambda *a: logged.append(a))
    settings = Settings(cache_dir=str(tmp_path))
    assert embedding.use_compiled_int8(Fake("compiled"), tmp_path, settings, 1) == ""
    assert counted == [] and logged == []
    why = embedding.use_compiled_int8(Fake("traced"), tmp_path, settings, 1)
    assert "started its build" in why and counted == ["cpu_compile"]
    why = embedding.use_compiled_int8(Fake(OSError("ro")), tmp_path, settings, 1)
    assert "OSError('ro')" in why and counted == ["cpu_compile"] * 2
    assert [a[-1] for a in logged] == [
        compiled_int8.traced_reason(Fake.cpu_int8_package, True),
        "OSError('ro')",
    ]


def test_the_setting_is_validated():
    assert Settings().cpu_compile == 1
    assert Settings.from_env(env={"DIGLETT_CPU_COMPILE": "0"}).cpu_compile == 0
    with pytest.raises(ValueError, match="CPU_COMPILE"):
        Settings.from_env(env={"DIGLETT_CPU_COMPILE": "2"})


needs_compiler = pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("c++")), reason="no C++ compiler"
)


@needs_model
@needs_compiler
def test_a_build_ends_when_the_process_that_started_it_ends(tmp_path):
    """A replica that dies mid-build leaves no build running (nobody would
    load what it makes), nor a compiler the build started."""
    import subprocess
    import time

    import psutil

    pkg = package_path(tmp_path, 1)
    code = (
        "import time, psutil\n"
        "from pathlib import Path\n"
        "from diglett.model.compiled_int8 import start_build\n"
        f"p = start_build(Path({str(model_dir())!r}), Path({str(pkg)!r}), 1)\n"
        "b, t = psutil.Process(p.pid), time.monotonic()\n"
        # End once the build runs a compiler (its runner's, the first).
        "while not b.children() and time.monotonic() - t < 100:\n"
        "    time.sleep(0.1)\n"
        "print(p.pid, len(b.children()), flush=True)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=150
    )
    child, compilers = map(int, out.stdout.split()[-2:])
    assert compilers, "the build started no compiler"

    try:  # the build and the compilers it runs, if it is not gone yet
        build = psutil.Process(child)
        started = [build, *build.children(recursive=True)]
    except psutil.NoSuchProcess:
        started = []

    def alive() -> list[str]:
        """Those of `started` and of the build's process group still running."""
        running = []
        for p in [*started, *psutil.process_iter()]:
            try:
                if p in started or os.getpgid(p.pid) == child:
                    if p.is_running() and p.status() != "zombie":
                        running.append(p.name())
            except (ProcessLookupError, psutil.Error):
                pass
        return running

    deadline = time.monotonic() + 15
    while alive():
        assert time.monotonic() < deadline, f"outlived the replica: {alive()}"
        time.sleep(0.2)
    assert not pkg.exists() and not compiled_int8.failed_note(pkg).exists()


APP = "compiled-int8"


@pytest.fixture(scope="module")
def built(server, tmp_path_factory):
    """A Serve app with an empty cache: its replica serves the traced model
    and builds the compiled one in the background, but never swaps it in
    under its live sessions; the app deployed again loads it at start.
    Yields (cache dir, torch threads, the app's route prefix)."""
    import time

    from ray import serve

    from serve_app.embedding import default_torch_threads
    from test_faults import deploy_app

    cache = tmp_path_factory.mktemp("cache")
    threads = default_torch_threads()  # what a replica here runs with
    env = {
        "DIGLETT_CACHE_DIR": str(cache),
        "DIGLETT_CPU_COMPILE": "1",
        "DIGLETT_TORCH_THREADS": str(threads),
    }
    prefix = deploy_app(APP, env)
    try:
        handle = serve.get_deployment_handle("EmbeddingDeployment", app_name=APP)
        info = handle.info.remote().result(timeout_s=60)
        assert info["cpu_int8"] == "traced"
        assert "started its build" in info["cpu_int8_fallback"]
        package = package_path(cache, threads)
        deadline = time.monotonic() + 1200
        note = compiled_int8.failed_note(package)
        while not (package.is_file() and compiled_int8.runner_path(package).is_file()):
            log = package.with_suffix(".log")
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            if note.exists():
                why = note.read_text()
                # A machine where the package would be slower builds none:
                # the replicas keep the traced model (build's speed check).
                assert why.startswith("RuntimeError: slower than"), why
                pytest.skip(f"no compiled package on this machine: {why.strip()}")
            time.sleep(5)
        time.sleep(10)  # what a swap once took, after the build ended
        assert handle.info.remote().result(timeout_s=60)["cpu_int8"] == "traced"
        serve.delete(APP)
        prefix = deploy_app(APP, env)
        handle = serve.get_deployment_handle("EmbeddingDeployment", app_name=APP)
        info = handle.info.remote().result(timeout_s=60)
        assert (info["cpu_int8"], info["cpu_int8_fallback"]) == ("compiled", "")
        yield cache, threads, prefix
    finally:
        serve.delete(APP)


def _speech_windows(n: int, size: int = 24000) -> list[np.ndarray]:
    u = utterances()
    out = []
    for spk in sorted(u):
        x = load16(u[spk][0])
        out += [x[k : k + size] for k in range(0, x.size - size, size)][:2]
    return out[:n]


@needs_model
@needs_speakers
@needs_compiler
@pytest.mark.model
def test_compiled_embeds_close_to_float32_and_alone_as_in_a_batch(built):
    from diglett.model.embedder import Embedder

    cache, threads, _ = built
    torch.set_num_threads(threads)
    emb = Embedder.load(model_dir(), "cpu", "int8")
    assert emb.use_compiled_int8(model_dir(), cache, threads) == "compiled"
    assert emb.cpu_int8_build is None  # nothing more to build
    ref = Embedder.load(model_dir(), "cpu", "fp32")

    def cos(a, b) -> np.ndarray:
        return np.array([normalize(x) @ normalize(y) for x, y in zip(a, b)])

    wins = _speech_windows(8)
    together = emb.embed(wins)
    c = cos(together, ref.embed(wins))
    assert c.mean() > 0.997 and c.min() > 0.995, c
    alone = [emb.embed([w])[0] for w in wins[:3]]
    assert (1 - cos(alone, together[:3])).max() < 1e-5  # per-frame scales
    # Other lengths (dynamic shapes)...
    for size in (8000, 80000):
        sig = _speech_windows(2, size)
        assert cos(emb.embed(sig), ref.embed(sig)).min() > 0.98, size
    # ...and one too short for the package, which the traced model embeds.
    sig = _speech_windows(2, 2000)
    traced = Embedder.load(model_dir(), "cpu", "int8")
    assert cos(emb.embed(sig), traced.embed(sig)).min() > 0.9999


@needs_model
@needs_speakers
@needs_compiler
@pytest.mark.model
@pytest.mark.serve
def test_a_replica_labels_right_on_the_model_it_built(built, server):
    """A replica that loaded the package built here labels a WebSocket
    session right."""
    from test_serve_e2e import drain, enroll, open_ws, recv, send_audio

    _, _, prefix = built
    u = utterances()
    a, b = load16(u["LS-19"][0]), load16(u["LS-26"][0])
    url = server["ws"].replace("/v1/stream", f"{prefix}/v1/stream")
    with open_ws({"ws": url}) as ws:
        assert recv(ws)["type"] == "ready"
        for name, x in (("alice", a[: 5 * 16000]), ("bob", b[: 5 * 16000])):
            assert enroll(ws, name, x)["type"] == "enrolled"
        ws.send(json.dumps({"type": "stream"}))
        send_audio(ws, load16(u["LS-19"][3])[: 4 * 16000])
        ws.send(json.dumps({"type": "end"}))
        msgs, _ = drain(ws)
    labels = [m["label"] for m in msgs if m["type"] == "label"]
    speech = [x for x in labels[2:] if x != "silence"]
    assert len(speech) >= 4 and speech.count("alice") >= len(speech) - 1, labels


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
