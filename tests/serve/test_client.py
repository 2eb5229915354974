"""`diglett-client` against the real Serve app: WAV mode, resume, errors, and
the microphone path through real PyAudio on a real PulseAudio server."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import API_TOKEN, ROOT, load16, needs_model, needs_speakers, utterances

pytestmark = [needs_model, needs_speakers, pytest.mark.serve]
CLIENT = [sys.executable, "-m", "client.cli"]


@pytest.fixture(scope="module")
def wavs(tmp_path_factory):
    """Enrollment files and an alice-then-bob conversation (at 44.1 kHz)."""
    d = tmp_path_factory.mktemp("client_wavs")
    u = utterances()
    a_enroll = load16(u["LS-19"][0])[: 5 * 16000]
    b_enroll = load16(u["LS-26"][0])[: 5 * 16000]
    a_test = load16(u["LS-19"][3])[: 4 * 16000]
    b_test = load16(u["LS-26"][3])[: 4 * 16000]
    sf.write(d / "alice.wav", a_enroll, 16000, subtype="PCM_16")
    sf.write(d / "bob.wav", b_enroll, 16000, subtype="PCM_16")
    sf.write(d / "alice_test.wav", a_test, 16000, subtype="PCM_16")
    import soxr

    conv = np.concatenate([a_test, b_test])
    sf.write(d / "conv.wav", soxr.resample(conv, 16000, 44100), 44100)
    return d


def run_client(args, timeout=180, env=None):
    e = dict(os.environ)
    e.pop("DIGLETT_API_TOKEN", None)  # the tests pass it explicitly
    e.update(env or {})
    return subprocess.run(
        CLIENT + args,
        cwd=ROOT,
        env=e,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_conversation(rows, split_s=4.0):
    first = [r["label"] for r in rows if r["end_s"] <= split_s]
    second = [r["label"] for r in rows if r["start_s"] >= split_s + 0.5]
    assert first.count("alice") >= 4 and first.count("bob") <= 1, first
    assert second.count("bob") >= 4 and second.count("alice") <= 1, second


def test_wav_stream_end_to_end(server, wavs, tmp_path):
    out = tmp_path / "t.json"
    png = tmp_path / "t.png"
    r = run_client(
        [
            "stream",
            "--url",
            server["ws"],
            "--token",
            API_TOKEN,
            "--enroll",
            f"alice={wavs / 'alice.wav'}",
            "--enroll",
            f"bob={wavs / 'bob.wav'}",
            str(wavs / "conv.wav"),
            "--fast",
            "--timeline",
            str(out),
            "--plot",
            str(png),
        ]
    )
    print(r.stdout, r.stderr)  # shown with -s: what a user sees
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert "enrolled alice:" in r.stdout and "enrolled bob:" in r.stdout
    assert "summary (talk time):" in r.stdout and "server summary:" in r.stdout
    doc = json.loads(out.read_text())
    assert doc["speakers"] == ["alice", "bob"]
    assert doc["server_summary"]["type"] == "summary"
    rows = doc["labels"]
    assert rows[0]["start_s"] == 0.0 and rows[-1]["end_s"] == pytest.approx(8.0, 0.01)
    assert_conversation(rows)
    assert doc["talk_s"]["alice"] >= 2.0 and doc["talk_s"]["bob"] >= 2.0
    assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"
    (ROOT / "artifacts").mkdir(exist_ok=True)
    shutil.copy(png, ROOT / "artifacts" / "client-plot.png")
    # Live lines: who, level bar, scores and running talk time.
    lines = [ln for ln in r.stdout.splitlines() if "dBFS" in ln and "talk:" in ln]
    assert len(lines) == len(rows)
    assert "alice +" in lines[2] or "alice -" in lines[2]


def test_enroll_then_stream_resumes_session(server, wavs, tmp_path):
    sess = tmp_path / "session.json"
    common = ["--url", server["ws"], "--token", API_TOKEN, "--session-file", str(sess)]
    r1 = run_client(
        ["enroll", f"alice={wavs / 'alice.wav'}", f"bob={wavs / 'bob.wav'}"] + common
    )
    assert r1.returncode == 0, r1.stdout + r1.stderr
    assert "saved to" in r1.stdout
    saved = json.loads(sess.read_text())
    assert saved["speakers"] == ["alice", "bob"] and saved["resume_token"]
    csv_out = tmp_path / "t.csv"
    r2 = run_client(
        ["stream", str(wavs / "conv.wav"), "--speed", "0", "--timeline", str(csv_out)]
        + common
    )
    assert r2.returncode == 0, r2.stdout + r2.stderr
    rows = list(csv.DictReader(csv_out.open()))
    assert set(rows[0]) >= {"start_s", "label", "score_alice", "score_bob"}
    for row in rows:
        row["start_s"], row["end_s"] = float(row["start_s"]), float(row["end_s"])
    assert_conversation(rows)
    # The session ended with `end`: resuming it again is a clear error.
    time.sleep(0.5)
    r3 = run_client(["stream", str(wavs / "conv.wav")] + common)
    assert r3.returncode == 1 and "Traceback" not in r3.stderr
    assert "expired" in r3.stderr and "enroll again" in r3.stderr


class DroppingProxy:
    """A TCP proxy that cuts the first connection after `cut_after` bytes
    from the client: a real dropped connection, as a flaky network does."""

    def __init__(self, target_port: int, cut_after: int) -> None:
        self.target_port = target_port
        self.cut_after = cut_after
        self.connections = 0
        self.loop = asyncio.new_event_loop()
        self.port = None
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        started.wait(10)

    def _run(self, started) -> None:
        asyncio.set_event_loop(self.loop)

        async def main():
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            self._server = server
            started.set()

        self.loop.run_until_complete(main())
        self.loop.run_forever()

    async def _handle(self, reader, writer):
        self.connections += 1
        first = self.connections == 1
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(src, dst, limit):
            sent = 0
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                    sent += len(data)
                    if limit and sent > limit:
                        break
            except (ConnectionError, OSError):
                pass
            for w in (writer, up_w):
                w.transport.abort()

        await asyncio.gather(
            pipe(reader, up_w, self.cut_after if first else 0),
            pipe(up_r, writer, 0),
        )

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)


def test_client_resumes_after_a_dropped_connection(server, wavs, tmp_path):
    port = int(server["ws"].split(":")[2].split("/")[0])
    # Enrollment (2 × 5 s of 44.1 kHz s16) is ~900 kB: cut during the stream.
    proxy = DroppingProxy(port, cut_after=1_150_000)
    try:
        out = tmp_path / "t.json"
        r = run_client(
            [
                "stream",
                "--url",
                f"ws://127.0.0.1:{proxy.port}/v1/stream",
                "--token",
                API_TOKEN,
                "--enroll",
                f"alice={wavs / 'alice.wav'}",
                "--enroll",
                f"bob={wavs / 'bob.wav'}",
                str(wavs / "conv.wav"),
                "--speed",
                "4",
                "--timeline",
                str(out),
            ]
        )
    finally:
        proxy.close()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming session" in r.stderr and "resumed." in r.stdout
    assert proxy.connections >= 2
    doc = json.loads(out.read_text())
    assert doc["reconnects"] >= 1 and doc["server_summary"] is not None
    labels = [x["label"] for x in doc["labels"]]
    assert labels.count("alice") >= 2 and labels.count("bob") >= 3, labels
    starts = [x["start_s"] for x in doc["labels"]]
    assert starts == sorted(starts)  # one clock across the reconnect


def test_errors_are_one_clear_line(server, wavs, tmp_path):
    stream = ["stream", str(wavs / "conv.wav"), "--enroll", f"a={wavs / 'alice.wav'}"]
    bad_token = run_client(stream + ["--url", server["ws"], "--token", "nope"])
    assert bad_token.returncode == 1
    assert "unauthorized" in bad_token.stderr and "--token" in bad_token.stderr
    no_server = run_client(stream + ["--url", "ws://127.0.0.1:9/v1/stream"])
    assert no_server.returncode == 1 and "cannot reach" in no_server.stderr
    wrong_path = run_client(
        stream + ["--url", server["http"].replace("http", "ws") + "/nope"]
    )
    assert wrong_path.returncode == 1 and "HTTP 4" in wrong_path.stderr
    short = tmp_path / "short.wav"
    sf.write(short, load16(utterances()["LS-19"][0])[:16000], 16000)
    too_short = run_client(
        ["enroll", f"alice={short}", "--url", server["ws"], "--token", API_TOKEN]
        + ["--session-file", str(tmp_path / "s.json")]
    )
    assert too_short.returncode == 1 and "enroll_too_short" in too_short.stderr
    bad_name = run_client(
        ["enroll", f"silence={wavs / 'alice.wav'}", "--url", server["ws"]]
        + ["--token", API_TOKEN, "--session-file", str(tmp_path / "s.json")]
    )
    assert bad_name.returncode == 1 and "bad_message" in bad_name.stderr
    missing = run_client(
        ["stream", str(wavs / "conv.wav"), "--session-file", str(tmp_path / "x")]
    )
    assert missing.returncode == 1 and "diglett-client enroll" in missing.stderr
    # The installed console command, configured by a .env in the working dir.
    (tmp_path / ".env").write_text(
        "DIGLETT_URL=ws://127.0.0.1:9/v1/stream\nDIGLETT_API_TOKEN=x\n"
    )
    script = Path(sys.executable).with_name("diglett-client")
    dotenv = subprocess.run(
        [str(script), "stream", f"{wavs / 'conv.wav'}", "--enroll", "a=nope.wav"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dotenv.returncode == 1
    assert "no such audio file: nope.wav" in dotenv.stderr
    (tmp_path / "a.wav").write_bytes((wavs / "alice.wav").read_bytes())
    dotenv = subprocess.run(
        [str(script), "stream", f"{wavs / 'conv.wav'}", "--enroll", "a=a.wav"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dotenv.returncode == 1 and "ws://127.0.0.1:9/v1/stream" in dotenv.stderr
    assert "connection refused" in dotenv.stderr
    for r in (bad_token, no_server, wrong_path, too_short, bad_name, missing, dotenv):
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------ microphone
@pytest.fixture(scope="module")
def pulse(tmp_path_factory):
    """A private PulseAudio server (works as root) with a null sink whose
    monitor is the default source: what paplay plays, the "microphone" hears."""
    if not shutil.which("pulseaudio") or not shutil.which("paplay"):
        pytest.skip("pulseaudio/paplay not installed (.ci/run installs them)")
    pytest.importorskip("pyaudio")
    d = tmp_path_factory.mktemp("pulse")
    sock = d / "native"
    env = dict(os.environ, HOME=str(d), PULSE_RUNTIME_PATH=str(d))
    env.pop("PULSE_SERVER", None)
    proc = subprocess.Popen(
        [
            "pulseaudio",
            "-n",
            "--daemonize=no",
            "--exit-idle-time=-1",
            "--use-pid-file=no",
            "--disable-shm=yes",
            "-L",
            f"module-native-protocol-unix socket={sock} auth-anonymous=1",
            "-L",
            "module-null-sink sink_name=diglett_null rate=16000",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(d / "pulse.log").open("w"),
    )
    penv = {"PULSE_SERVER": f"unix:{sock}", "HOME": str(d)}
    for _ in range(100):
        if (
            subprocess.run(
                ["pactl", "info"], env={**os.environ, **penv}, capture_output=True
            ).returncode
            == 0
        ):
            break
        time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("pulseaudio did not start: " + (d / "pulse.log").read_text())
    yield penv
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_list_devices(pulse):
    r = run_client(["--list-devices"], env=pulse, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "pulse" in r.stdout and "*" in r.stdout
    assert "Traceback" not in r.stderr and "ALSA" not in r.stderr


def test_microphone_enroll_and_stream(server, wavs, pulse, tmp_path):
    """Mic enrollment (countdown, level meter) and mic streaming through real
    PyAudio: paplay plays into the null sink whose monitor is recorded."""
    env = dict(os.environ, **pulse)
    env.pop("DIGLETT_API_TOKEN", None)
    env["DIGLETT_AUDIO_DEVICE"] = "pulse"  # the device from the environment
    out = tmp_path / "mic.json"
    proc = subprocess.Popen(
        CLIENT
        + ["stream", "--url", server["ws"], "--token", API_TOKEN]
        + ["--enroll", "alice", "--enroll", f"bob={wavs / 'bob.wav'}"]
        + ["--seconds", "5", "--countdown", "1"]
        + ["--timeline", str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    played, seen, n_labels = [], [], 0
    try:
        for line in proc.stdout:
            seen.append(line)
            n_labels += "talk:" in line
            if n_labels == 11:  # 5.5 s streamed: Ctrl-C ends it, with a summary
                proc.send_signal(signal.SIGINT)
            if "speak now" in line:
                played.append(
                    subprocess.Popen(["paplay", str(wavs / "alice.wav")], env=env)
                )
            elif line.startswith("streaming the microphone"):
                played.append(
                    subprocess.Popen(["paplay", str(wavs / "alice_test.wav")], env=env)
                )
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in played:
            p.wait(30)
    stdout, stderr = "".join(seen), proc.stderr.read()
    assert rc == 0, stdout + stderr
    assert "Traceback" not in stderr
    assert "enrolled alice:" in stdout and "server summary:" in stdout
    meter = [ln for ln in seen if ln.startswith("  alice:") and "/5 s" in ln]
    assert meter and "█" in meter[-1]
    doc = json.loads(out.read_text())
    labels = [x["label"] for x in doc["labels"]]
    assert labels.count("alice") >= 4 and labels.count("bob") <= 1, labels


def test_plot_without_matplotlib_fails_at_once_with_what_to_install(
    monkeypatch, tmp_path, capsys
):
    """On the base install (no matplotlib) `--plot` is refused before the
    client connects, not with an `unexpected` error after the whole stream."""
    from client import cli

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import` fails
    monkeypatch.chdir(tmp_path)  # no .env

    async def connect(self, resume=False):
        raise AssertionError("connected")

    monkeypatch.setattr(cli.Runner, "connect", connect)
    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(16000, dtype=np.float32), 16000)
    plot = tmp_path / "talk.png"
    argv = ["stream", "--url", "ws://127.0.0.1:9/v1/stream", "--plot", str(plot)]
    argv += ["--enroll", f"a={wav}", "--enroll", f"b={wav}", str(wav), "--fast"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install" in err, err
    assert "unexpected" not in err and not plot.exists(), err
