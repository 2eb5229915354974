"""The light client install: `pip install ./client` into an empty venv gives
the `diglett-client` command with its own few dependencies, without torch,
Ray or the server's packages, and that command streams a WAV to the real
Serve app and gets real labels back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import API_TOKEN, ROOT, load16, needs_model, needs_speakers, utterances

CLIENT_DIR = ROOT / "client"
# What the light install must not bring: the server's heavy dependencies
# and its own packages.
SERVER_ONLY = ("torch", "ray", "diglett", "serve_app", "actors")


def test_client_encode_s16_is_the_servers() -> None:
    """The client's copy of `encode_s16` (it may not import `diglett`) sends
    the same bytes as the server's, clipping included."""
    from client.audio import encode_s16 as client_s16
    from diglett.engine.audio import encode_s16 as server_s16

    rng = np.random.default_rng(0)
    edges = [-2.0, -1.0, -1 / 32768, 0.0, 1 / 65536, 0.5, 32767 / 32768, 1.0, 3.0]
    for x in (
        rng.uniform(-1.5, 1.5, 4000).astype(np.float32),
        rng.uniform(-1.5, 1.5, 4000),  # float64 input
        np.array(edges, dtype=np.float32),
        np.array([np.inf, -np.inf], dtype=np.float32),
        np.zeros(0, dtype=np.float32),
    ):
        assert client_s16(x) == server_s16(x)
    assert client_s16(np.array([1.0, -1.0], dtype=np.float32)) == (
        np.array([32767, -32768], dtype="<i2").tobytes()
    )


def test_client_imports_nothing_of_the_server() -> None:
    """Every client module imports without loading the server's packages,
    torch or Ray (checked in a fresh interpreter of the dev venv, where they
    are all installed and would load if anything imported them)."""
    code = (
        "import json, sys\n"
        "import client.audio, client.cli, client.output, client.session\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    loaded = set(json.loads(r.stdout))
    assert "client" in loaded
    assert not loaded & set(SERVER_ONLY), sorted(loaded & set(SERVER_ONLY))


def _env() -> dict[str, str]:
    """The environment for the venv's commands: nothing that would let them
    see the repo or the dev venv (so `client` can only come from the venv)."""
    env = dict(os.environ)
    for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "DIGLETT_API_TOKEN"):
        env.pop(key, None)
    return env


def _run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def _pip_install(venv: Path, spec: str, cwd: Path) -> None:
    r = _run([str(venv / "bin" / "python"), "-m", "pip", "install", spec], cwd, 900)
    assert r.returncode == 0, f"pip install {spec} failed:\n{r.stdout}\n{r.stderr}"


def _venv_python(venv: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    return _run([str(venv / "bin" / "python"), "-c", code], cwd, 120)


@needs_model
@needs_speakers
@pytest.mark.serve
def test_light_install_streams_a_wav_to_the_server(server, tmp_path: Path) -> None:
    # An empty venv, made by the plain interpreter under the dev venv: what a
    # user without the server starts from.
    base = getattr(sys, "_base_executable", None) or sys.executable
    venv = tmp_path / "venv"
    r = subprocess.run(
        [base, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    work = tmp_path / "work"  # the commands' cwd: not the repo, no .env
    work.mkdir()
    _pip_install(venv, str(CLIENT_DIR), work)

    # Installed from the venv, as `client`, with only the client's files.
    r = _venv_python(
        venv,
        "import importlib.metadata as md, json, client\n"
        "d = md.distribution('diglett-client')\n"
        "print(json.dumps({'file': client.__file__,"
        " 'files': [f.as_posix() for f in d.files]}))",
        work,
    )
    assert r.returncode == 0, r.stderr
    files = json.loads(r.stdout)
    site = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    assert Path(files["file"]).is_relative_to(site / "site-packages"), files["file"]
    in_site = [f for f in files["files"] if not f.startswith("../")]
    assert {f.split("/")[0] for f in in_site} == {
        "client",
        "diglett_client-0.1.0.dist-info",
    }
    outside = [f for f in files["files"] if f.startswith("../")]
    assert outside == ["../../../bin/diglett-client"]
    shipped = {
        f.split("/")[1]
        for f in files["files"]
        if f.startswith("client/") and f.endswith(".py")
    }
    assert shipped == {p.name for p in CLIENT_DIR.glob("*.py")}

    # The base install has no matplotlib: --plot is refused at once, with the
    # install command that fixes it.
    script = str(venv / "bin" / "diglett-client")
    wavs = _write_wavs(tmp_path)
    stream = ["stream", "--enroll", f"alice={wavs['alice']}"]
    stream += ["--enroll", f"bob={wavs['bob']}", str(wavs["conv"]), "--fast"]
    r = _run(
        [script, *stream, "--url", "ws://127.0.0.1:9/v1/stream"]
        + ["--plot", str(tmp_path / "no.png")],
        work,
        60,
    )
    assert r.returncode == 1 and "./client[plot]" in r.stderr, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "no.png").exists()

    _pip_install(venv, f"{CLIENT_DIR}[plot]", work)
    # Neither install brought the server's dependencies or packages.
    probe = _venv_python(
        venv,
        "import importlib, json\n"
        "found = []\n"
        f"for name in {SERVER_ONLY!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "        found.append(name)\n"
        "    except ImportError:\n"
        "        pass\n"
        "import matplotlib\n"
        "print(json.dumps(found))",
        work,
    )
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout) == []

    # The venv's command against the real server: two speakers enrolled from
    # real clips, then their conversation at 44.1 kHz (resampled by soxr).
    out, png = tmp_path / "t.json", tmp_path / "t.png"
    r = _run(
        [script, *stream, "--url", server["ws"], "--token", API_TOKEN]
        + ["--timeline", str(out), "--plot", str(png)],
        work,
        300,
    )
    print(r.stdout, r.stderr)  # shown with -s: what a user sees
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert "enrolled alice:" in r.stdout and "enrolled bob:" in r.stdout
    assert "server summary:" in r.stdout
    doc = json.loads(out.read_text())
    assert doc["speakers"] == ["alice", "bob"]
    assert doc["server_summary"]["type"] == "summary"
    rows = doc["labels"]
    assert rows[0]["start_s"] == 0.0 and rows[-1]["end_s"] == pytest.approx(8.0, 0.01)
    first = [x["label"] for x in rows if x["end_s"] <= 4.0]
    second = [x["label"] for x in rows if x["start_s"] >= 4.5]
    assert first.count("alice") >= 4 and first.count("bob") <= 1, first
    assert second.count("bob") >= 4 and second.count("alice") <= 1, second
    assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"


def _write_wavs(d: Path) -> dict[str, Path]:
    """5 s enrollment clips of two dev-set speakers (16 kHz) and a 4 s + 4 s
    conversation of other clips of theirs, alice then bob, at 44.1 kHz."""
    import soxr

    u = utterances()
    paths = {name: d / f"{name}.wav" for name in ("alice", "bob", "conv")}
    sf.write(paths["alice"], load16(u["LS-19"][0])[: 5 * 16000], 16000, "PCM_16")
    sf.write(paths["bob"], load16(u["LS-26"][0])[: 5 * 16000], 16000, "PCM_16")
    conv = np.concatenate(
        [load16(u["LS-19"][3])[: 4 * 16000], load16(u["LS-26"][3])[: 4 * 16000]]
    )
    sf.write(paths["conv"], soxr.resample(conv, 16000, 44100), 44100)
    return paths
