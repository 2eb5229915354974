"""The browser page at /demo, in real headless Chromium against the real app.

Chromium's fake microphone plays a WAV made here from the dev set, so the
page's getUserMedia → AudioWorklet → WebSocket path runs for real.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from conftest import API_TOKEN, ROOT, load16, needs_model, needs_speakers, utterances

pytestmark = [needs_model, needs_speakers, pytest.mark.serve]
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def test_demo_is_served(server):
    with httpx.Client(base_url=server["http"], timeout=30) as c:
        page = c.get("/demo")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "/demo/static/demo.js" in page.text
        for name, kind in [
            ("demo.js", "javascript"),
            ("capture-worklet.js", "javascript"),
            ("demo.css", "css"),
        ]:
            r = c.get(f"/demo/static/{name}")
            assert r.status_code == 200 and kind in r.headers["content-type"], name
        for bad in ["nope.js", "..%2Fdemo.py", "..%2F..%2Fpyproject.toml", ".x.js"]:
            assert c.get(f"/demo/static/{bad}").status_code == 404, bad
        assert "/demo" not in c.get("/openapi.json").json()["paths"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo_wavs")
    u = utterances()
    sf.write(d / "alice.wav", load16(u["LS-19"][0])[: 5 * 16000], 16000)
    sf.write(d / "bob.wav", load16(u["LS-26"][0])[: 5 * 16000], 16000)
    conv = np.concatenate(
        [load16(u["LS-19"][3])[: 4 * 16000], load16(u["LS-26"][3])[: 4 * 16000]]
    )
    sf.write(d / "mic.wav", conv, 16000, subtype="PCM_16")  # loops as the mic
    return d


def chromium(mic_wav: Path):
    """Headless Chromium whose fake microphone plays `mic_wav` in a loop."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("chromium/chromium-driver not installed (.ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--autoplay-policy=no-user-gesture-required",
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",
        f"--use-file-for-fake-audio-capture={mic_wav}",
        "--window-size=1100,900",
    ]:
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


@pytest.fixture
def browser(files):
    driver = chromium(files / "mic.wav")
    yield driver
    driver.quit()


def wait_for(driver, script, timeout=60.0, what=""):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        value = driver.execute_script("return " + script)
        if value:
            return value
        time.sleep(0.2)
    state = driver.execute_script(
        "return JSON.stringify({errors: diglett.errors, mode: diglett.mode,"
        " close: diglett.closeCode, n: diglett.labels.length,"
        " msgs: document.getElementById('messages').innerText})"
    )
    raise AssertionError(f"timed out waiting for {what or script}: {state}")


def test_demo_page_in_chromium(server, browser, files):
    d = browser
    d.get(f"{server['http']}/demo?token={API_TOKEN}")
    d.find_element("id", "connect").click()
    wait_for(d, "diglett.formatOk", what="format_ok")
    ready = d.execute_script("return diglett.ready")
    assert ready["type"] == "ready"
    for slot, name in [(0, "alice"), (1, "bob")]:
        assert d.find_element("id", f"name-{slot}").get_attribute("value") == name
        d.find_element("id", f"file-{slot}").send_keys(str(files / f"{name}.wav"))
        wait_for(d, f"diglett.enrolled['{name}']", what=f"enrolled {name}")
        status = d.find_element("id", f"status-{slot}").text
        assert status.startswith("enrolled:"), status
    # The fake microphone is live: the level meter moves.
    wait_for(d, "diglett.level > -60", 10, "a level from the microphone")
    d.find_element("id", "stream").click()
    # 11 s of the 8 s alice-then-bob loop: each speaker's 4 s at least once.
    wait_for(d, "diglett.labels.length >= 22", 90, "22 labels")
    d.find_element("id", "stop").click()
    wait_for(d, "diglett.summary", 60, "summary")
    wait_for(d, "diglett.closeCode === 1000", 10, "close 1000")
    again = d.find_element("id", "connect")
    assert again.is_enabled() and again.text == "New session"
    state = d.execute_script("return diglett")
    labels = [x["label"] for x in state["labels"]]
    assert labels.count("alice") >= 5 and labels.count("bob") >= 5, labels
    assert labels.count("noise") <= len(labels) // 4, labels
    # Bands alternate: a run of alice is followed by a run of bob.
    runs = [lab for i, lab in enumerate(labels) if i == 0 or labels[i - 1] != lab]
    speakers_runs = [r for r in runs if r in ("alice", "bob")]
    assert "alice" in speakers_runs and "bob" in speakers_runs
    assert any(
        a == "alice" and b == "bob" for a, b in zip(speakers_runs, speakers_runs[1:])
    ), labels
    talk = d.find_element("id", "talk").text
    assert "alice" in talk and "bob" in talk
    assert state["summary"]["talk_s"]["alice"] > 0
    assert not state["errors"], state["errors"]
    # The canvas has the speakers' colours in its band row.
    colours = d.execute_script("""
        const c = document.getElementById('timeline'), g = c.getContext('2d');
        const px = g.getImageData(0, 25, c.width, 1).data, seen = new Set();
        for (let i = 0; i < px.length; i += 4) seen.add(px[i] + ',' + px[i+1] + ',' + px[i+2]);
        return Array.from(seen);
    """)
    assert "31,155,209" in colours and "209,65,122" in colours, colours
    ARTIFACTS.mkdir(exist_ok=True)
    d.save_screenshot(str(ARTIFACTS / "demo.png"))
    assert (ARTIFACTS / "demo.png").stat().st_size > 10000

    # A wrong token: a clear message, not a silent failure.
    d.get(f"{server['http']}/demo?token=wrong")
    d.find_element("id", "connect").click()
    wait_for(d, "diglett.closeCode === 4401", 30, "close 4401")
    msgs = d.find_element("id", "messages").text
    assert "Wrong or missing API token" in msgs, msgs


def test_demo_microphone_enrollment_with_countdown(server, files):
    """`Record` counts down, then enrolls from the microphone (alice's voice
    on the fake device); streaming it then shows alice's bands."""
    d = chromium(files / "alice.wav")
    try:
        d.get(f"{server['http']}/demo?token={API_TOKEN}&countdown=2&seconds=4")
        d.find_element("id", "connect").click()
        wait_for(d, "diglett.formatOk", what="format_ok")
        d.find_element("id", "file-1").send_keys(str(files / "bob.wav"))
        wait_for(d, "diglett.enrolled['bob']", what="enrolled bob")
        d.find_element("id", "record-0").click()
        shown = wait_for(
            d, "document.getElementById('countdown').textContent", 5, "countdown"
        )
        assert shown in ("2…", "1…"), shown
        wait_for(
            d,
            "document.getElementById('status-0').textContent.startsWith('recording')",
            5,
            "recording",
        )
        wait_for(d, "diglett.enrolled['alice']", 30, "enrolled alice")
        assert d.find_element("id", "status-0").text.startswith("enrolled:")
        d.find_element("id", "stream").click()
        wait_for(d, "diglett.labels.length >= 8", 60, "8 labels")
        labels = d.execute_script("return diglett.labels.map(x => x.label)")
        assert labels.count("alice") >= 5 and "bob" not in labels, labels
        assert not d.execute_script("return diglett.errors")
    finally:
        d.quit()
