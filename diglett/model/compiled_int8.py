"""Int8 ECAPA compiled ahead of time for this machine's CPU, built once, cached.

The traced int8 model (diglett/model/int8.py) rests on two APIs torch 2.11
deprecates: `torch.ao` dynamic quantization and TorchScript. This is the
way on: torchao's int8 (`Int8DynamicActivationInt8WeightConfig`) on the
same time-major network, `torch.export`ed with the batch and the frames as
dynamic dimensions and compiled by AOTInductor into a package of native
code. Side by side at one torch thread (bench/compiled_int8.py) it embeds
1.29x the windows/s of the traced model at batch 8, and it scales activations per
frame, not per batch: a window's embedding no longer moves with the windows
batched beside it (cosine 1 - 2e-7 against 1 - 1.3e-2), and it lies closer
to float32 (cosine 0.9987 against 0.994).

The price: a C++ compiler, and ~2 minutes of CPU on a 2-core machine for
the build. So no replica waits for it. A replica without a package for its
machine serves the traced model and starts the build in a process of its
own, at the lowest CPU priority (it takes only idle time) and ending with
the replica. That replica keeps the traced model (a model is never swapped
under the sessions whose enrollments it embedded); replicas started later
load the package at once (Embedder.adopt_compiled_int8).
A package holds code for one CPU instruction set and thread count, so its
name carries a key of everything it depends on; a failed build leaves a
`.failed` note with the reason and is not retried for that key.

Beside the package the build compiles a small extension (aoti_runner.cpp)
that runs it with the GIL released: PyTorch's own binding holds the GIL for
the whole forward (pytorch/pytorch#197516), which in a replica stalls the
event loop for every batch (a busy Python thread beside it ran 89 loop
iterations in 4 s instead of ~45,000).

    python -m diglett.model.compiled_int8 --model-dir DIR --out FILE.pt2 --threads N
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

import torch

logger = logging.getLogger("diglett.model.compiled_int8")

FORMAT = 1  # bump when the network or the build changes
MAX_BATCH = 1024  # the package's dynamic range; beyond it the traced model runs
MIN_FRAMES, MAX_FRAMES = 16, 100_000  # 0.16 s to 1,000 s of audio
SUBDIR = "compiled"  # under the cache dir
RUNNER_MODULE = "diglett_aoti_runner"
RUNNER_SOURCE = Path(__file__).with_name("aoti_runner.cpp")
# A build stops before compiling where the int8 network, run eagerly
# (torchao's layers), takes this many times the traced int8 model's time:
# its matrix products are slow on that CPU, and the compiled package would
# run the same ones (`eager_check`).
EAGER_MAX_RATIO = 10.0


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux), which the compiled code may rely on."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor()


def machine_key(threads: int) -> str:
    """What a package depends on, hashed: versions, the runner's source, the
    CPU (its flags decide the instruction set the code is generated for),
    the threads its parallel loops were generated for. Cheap on purpose:
    every CPU replica computes it at start (Inductor's own instruction-set
    probe compiles test programs, 12-14 s here)."""
    from importlib.metadata import version

    parts = {
        "format": FORMAT,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchao": version("torchao"),
        "runner": hashlib.sha256(RUNNER_SOURCE.read_bytes()).hexdigest(),
        "machine": platform.machine(),
        "cpu_flags": _cpu_flags(),
        "threads": threads,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def package_path(cache_dir: str | Path, threads: int) -> Path:
    """Where this machine's package lives (built or not)."""
    return (
        Path(cache_dir).expanduser() / SUBDIR / f"ecapa-int8-{machine_key(threads)}.pt2"
    )


def failed_note(package: Path) -> Path:
    return package.with_suffix(".failed")


def runner_path(package: Path) -> Path:
    """The package's GIL-releasing runner (a Python extension)."""
    return package.with_suffix(".so")


def traced_reason(package: Path, building: bool) -> str:
    """Why a replica that asked for `package` serves the traced model."""
    if building:
        return "this replica started its build; replicas started later load it"
    note = failed_note(package)
    if note.exists():
        try:
            why = note.read_text().strip()[:500]
        except OSError as exc:
            why = repr(exc)
        return f"its build failed ({why}); delete {note} to build again"
    if _compiler() is None:
        return "no C++ compiler (g++ or c++) on PATH"
    return f"no usable package at {package} (a read-only cache, or it did not load)"


def _compiler() -> str | None:
    import shutil

    return shutil.which("g++") or shutil.which("c++")


def start_runner_build(out: Path) -> subprocess.Popen:
    """Start compiling aoti_runner.cpp against this torch into the extension
    `out`; `finish_runner_build` waits for it. It runs beside the package's
    compile, which is most of a build's time, on another core."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths, library_paths

    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++ or c++) on PATH")
    cmd = [
        cxx,
        "-O2",
        "-fPIC",
        "-shared",
        "-std=c++17",
        f"-DTORCH_EXTENSION_NAME={RUNNER_MODULE}",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        *(f"-isystem{p}" for p in include_paths()),
        f"-isystem{sysconfig.get_paths()['include']}",
        str(RUNNER_SOURCE),
        *(f"-L{p}" for p in library_paths()),
        "-lc10",
        "-ltorch_cpu",
        "-ltorch",
        "-ltorch_python",
        "-o",
        str(out),
    ]
    return subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def finish_runner_build(compiling: subprocess.Popen) -> None:
    """Wait for `start_runner_build`'s compiler; raise if it failed."""
    _, err = compiling.communicate()
    if compiling.returncode != 0:
        raise RuntimeError(f"compiling the runner failed: {err[-2000:]}")


_runner_modules: dict[str, object] = {}  # an extension initialises once a process


def _import_runner(so: Path):
    """The extension module at `so` (built by `start_runner_build`)."""
    import importlib.util

    key = str(so.resolve())
    if key not in _runner_modules:
        spec = importlib.util.spec_from_file_location(RUNNER_MODULE, so)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {so}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _runner_modules[key] = module
    return _runner_modules[key]


def quantized_network(ecapa: torch.nn.Module) -> torch.nn.Module:
    """ECAPA's float32 `embedding_model` as the time-major network with
    torchao int8 layers (a copy): (B, T, 80) features -> (B, 1, 192)."""
    import copy

    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    from diglett.model.ecapa_time_major import TimeMajorEcapa
    from diglett.model.int8 import pointwise_as_linear

    net = copy.deepcopy(ecapa).cpu().eval()
    if pointwise_as_linear(net) == 0:
        raise ValueError("the model has no pointwise convolutions to quantize")
    net = TimeMajorEcapa(net).net.eval()
    quantize_(net, Int8DynamicActivationInt8WeightConfig())
    return net


def _probe_features(encoder) -> torch.Tensor:
    """(3, T, 80) features of a fixed synthetic signal, to check a build."""
    g = torch.Generator().manual_seed(0)
    t = torch.arange(24000) / 16000
    tone = 0.2 * torch.sin(2 * torch.pi * (150 + 400 * t) * t)
    wavs = torch.stack(
        [tone + 0.02 * k * torch.randn(24000, generator=g) for k in (1, 2, 3)]
    )
    with torch.inference_mode():
        return encoder.mods.mean_var_norm(
            encoder.mods.compute_features(wavs), torch.ones(3)
        )


def _best_time(run, x: torch.Tensor, repeat: int = 3) -> float:
    """Seconds of the fastest of `repeat` calls `run(x)`, after one to warm up."""
    import time

    best = float("inf")
    with torch.inference_mode():
        run(x)
        for _ in range(repeat):
            t0 = time.perf_counter()
            run(x)
            best = min(best, time.perf_counter() - t0)
    return best


def speed_check(compiled_s: float, traced_s: float) -> str | None:
    """Why a package that took `compiled_s` seconds on the probe batch must
    not replace the traced int8 model that took `traced_s` (it is slower),
    or None where it may."""
    if compiled_s <= traced_s:
        return None
    return (
        f"slower than the traced int8 model on this machine "
        f"({compiled_s * 1000:.0f} ms against {traced_s * 1000:.0f} ms "
        f"for 3 windows of 1.5 s)"
    )


def eager_check(eager_s: float, traced_s: float) -> str | None:
    """Why a build should stop before compiling, where the int8 network
    run eagerly took `eager_s` seconds on the probe batch against `traced_s`
    for the traced int8 model, or None. Compiling fuses the small steps
    around the int8 matrix products, not the products themselves: where
    those run `EAGER_MAX_RATIO` times slower than the traced model's on
    this CPU (no fast int8 instructions), the package would be as slow
    (docs/internals.md), and the compile's minutes are saved."""
    if eager_s < EAGER_MAX_RATIO * traced_s:
        return None
    return (
        f"slower than the traced int8 model on this machine, seen before "
        f"compiling: its int8 layers took {eager_s * 1000:.0f} ms against "
        f"{traced_s * 1000:.0f} ms for 3 windows of 1.5 s"
    )


def build(model_dir: Path, out: Path, threads: int) -> None:
    """Export, compile and check the package; it appears at `out` only
    whole and checked (a temporary file renamed): its embeddings match the
    network's, and it runs faster here than the traced int8 model that
    serves without it (else it raises, and the build's failed note says
    why; before compiling where `eager_check` already tells)."""
    import copy
    import warnings

    from diglett.model.int8 import quantize_int8
    from diglett.model.model_store import load_encoder

    torch.set_num_threads(threads)  # the generated parallel loops use this
    encoder = load_encoder(model_dir, "cpu")
    feats = _probe_features(encoder)
    traced = quantize_int8(copy.deepcopy(encoder.mods.embedding_model).eval())
    traced_s = _best_time(traced, feats)
    del traced
    net = quantized_network(encoder.mods.embedding_model.eval())
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    frames = torch.export.Dim("frames", min=MIN_FRAMES, max=MAX_FRAMES)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(f"{out.stem}.part{os.getpid()}.pt2")  # AOTI wants .pt2
    so = runner_path(out)
    so_part = so.with_name(f"{so.stem}.part{os.getpid()}.so")
    # The runner compiles on the other core from here on, beside the eager
    # check too: where the build goes on it is ready sooner, and where the
    # check refuses, the `finally` below kills it.
    compiling = start_runner_build(so_part)
    try:
        slower = eager_check(_best_time(net, feats, repeat=1), traced_s)
        if slower:
            raise RuntimeError(slower)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.no_grad():
                program = torch.export.export(
                    net, (feats,), dynamic_shapes=({0: batch, 1: frames},)
                )
            torch._inductor.aoti_compile_and_package(program, package_path=str(part))
        finish_runner_build(compiling)
        runner = _import_runner(so_part).Runner(str(part))
        with torch.inference_mode():
            want = net(feats).reshape(3, -1)
            got = runner.run(feats).reshape(3, -1)
            one = runner.run(feats[:1].contiguous()).reshape(1, -1)
        cos = torch.nn.functional.cosine_similarity
        if float(cos(got, want).min()) < 0.999 or float(cos(one, want[:1])) < 0.999:
            raise RuntimeError("the compiled package does not match its network")
        # Seen on a CPU without AVX-512 (docs/internals.md has the
        # figures): such a build "fails", so no replica loads it.
        slower = speed_check(_best_time(runner.run, feats), traced_s)
        if slower:
            raise RuntimeError(slower)
        os.replace(so_part, so)
        os.replace(part, out)  # last: the package's presence means both are whole
    finally:
        if compiling.poll() is None:  # the package's compile failed first
            compiling.kill()
            compiling.wait()
        part.unlink(missing_ok=True)
        so_part.unlink(missing_ok=True)


class CompiledEcapa(torch.nn.Module):
    """The package in `embedding_model`'s place: forward(x: (B, T, 80),
    lengths: (B,) all 1) -> (B, 1, 192). Shapes outside the package's
    range, and partial lengths, go to `fallback` (the traced model, which
    runs one window at a time: diglett/model/int8.py, OneWindowAtATime)."""

    def __init__(self, runner, fallback: torch.nn.Module) -> None:
        super().__init__()
        self.runner = runner
        self.fallback = fallback

    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, t = x.shape[0], x.shape[1]
        whole = lengths is None or bool((lengths == 1).all())
        if whole and 1 <= b <= MAX_BATCH and MIN_FRAMES <= t <= MAX_FRAMES:
            return self.runner.run(x.contiguous())
        return self.fallback(x, lengths)


def load(package: Path, fallback: torch.nn.Module) -> CompiledEcapa | None:
    """The package as a module, or None (logged) if it cannot be used."""
    try:  # (no torchao import: the package's code needs none of its ops)
        runner = _import_runner(runner_path(package)).Runner(str(package))
    except Exception as exc:
        logger.warning("compiled model %s not usable (%r); traced model", package, exc)
        return None
    return CompiledEcapa(runner, fallback)


def start_build(
    model_dir: Path, package: Path, threads: int
) -> subprocess.Popen | None:
    """Build `package` in the background unless it exists, failed before,
    or no C++ compiler is found; returns the process, or None. The process
    ends soon after this one, with the compilers it started, and runs at
    niceness 19; a second one for the same package waits for the first
    one's result (a lock)."""
    if package.exists():
        return None
    if failed_note(package).exists():
        logger.warning(
            "the compiled int8 model's last build failed (%s; delete it to "
            "build again): the traced model only",
            failed_note(package),
        )
        return None
    if _compiler() is None:
        logger.info("no C++ compiler: the traced int8 model only")
        return None
    try:
        package.parent.mkdir(parents=True, exist_ok=True)
        log = open(package.with_suffix(".log"), "ab")
    except OSError as exc:  # a read-only cache: no build, no harm
        logger.warning("cannot build the compiled int8 model here: %s", exc)
        return None
    cmd = [
        sys.executable,
        "-m",
        "diglett.model.compiled_int8",
        "--model-dir",
        str(model_dir),
        "--out",
        str(package),
        "--threads",
        str(threads),
        "--parent",
        str(os.getpid()),
    ]
    try:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)},
            start_new_session=True,  # its compilers end with it (its watcher)
        )
    finally:
        log.close()


def _die_with_parent_at_lowest_priority(parent: int) -> None:
    """End this process soon after process `parent` ends, and run at
    niceness 19. A watcher thread, not PR_SET_PDEATHSIG: that signal follows
    the parent's *thread* that started us, and a replica's constructor may
    run in a thread that ends before the replica does."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        # Orphaned: nobody will load what we build. The compilers we started
        # go with us (`start_build` makes us their process group's leader);
        # the signal ends this process too, so `_exit` is for a build run
        # some other way.
        if os.getpgrp() == os.getpid():
            os.killpg(os.getpid(), signal.SIGKILL)
        os._exit(0)

    from diglett.priority import lower_cpu_priority

    if os.getppid() != parent:
        sys.exit(0)
    lower_cpu_priority(19)  # every thread, and those started later inherit it
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build the compiled int8 ECAPA package.")
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--parent", type=int, default=0, help="end when it ends")
    args = ap.parse_args(argv)
    if args.parent:
        _die_with_parent_at_lowest_priority(args.parent)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.with_suffix(".lock"), "w") as lock:
        # Another replica's build of the same package: wait for its result.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if args.out.exists():
            return 0
        if failed_note(args.out).exists():
            return 1
        for stale in args.out.parent.glob(f"{args.out.stem}.part*"):
            stale.unlink(missing_ok=True)  # of a build that was cut short
        try:
            build(args.model_dir, args.out, args.threads)
        except Exception as exc:
            failed_note(args.out).write_text(f"{type(exc).__name__}: {exc}\n")
            print(f"build failed: {exc!r}", flush=True)
            return 1
    print(f"built {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
