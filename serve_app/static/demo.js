// Diglett demo page: microphone -> AudioWorklet -> WebSocket (protocol v1).
"use strict";

const params = new URLSearchParams(location.search);
const TOKEN = params.get("token") || "";
const COUNTDOWN_S = Number(params.get("countdown") || 3);
const RECORD_S = Number(params.get("seconds") || 8);
const CHUNK_S = 0.1;
const WINDOW_S = 30; // seconds of timeline shown
const COLOURS = ["#1f9bd1", "#d1417a"];
const OTHER = { noise: "#999999", silence: "#e4e4e4" };
const ERRORS = {
  unauthorized: "Wrong or missing API token: open this page as /demo?token=YOUR_TOKEN.",
  session_expired: "The session expired on the server; reload the page to start again.",
  overloaded: "The server is busy; try again in a moment.",
  rate_exceeded: "Audio arrived faster than real time allows.",
  frame_too_large: "An audio frame was larger than 1 s.",
  internal: "The server failed unexpectedly; reload to try again.",
  enroll_too_short: "Not enough speech: record longer and speak up.",
  too_many_speakers: "The server holds at most two speakers.",
  not_enrolled: "Enroll at least one speaker before streaming.",
  unsupported_format: "The server does not accept this browser's sample rate.",
  bad_audio: "The server dropped an unreadable audio frame.",
  bad_message: "The server rejected a message.",
};
const CLOSES = { 4401: "unauthorized", 4404: "session_expired", 1008: "rate_exceeded",
  1009: "frame_too_large", 1011: "internal", 1013: "overloaded" };

// Everything the page knows; tests read it as window.diglett.
const S = (window.diglett = {
  ready: null, formatOk: false, mode: "idle", enrolled: {}, speakers: [],
  labels: [], talk: {}, summary: null, errors: [], closeCode: null, level: -120,
});
let ws = null, ctx = null, pending = [], pendingN = 0, enrollSlot = null;

const $ = (id) => document.getElementById(id);
function say(text, isError) {
  const d = document.createElement("div");
  d.textContent = text;
  if (isError) d.className = "error";
  $("messages").prepend(d);
}
function setConn(text, cls) { $("conn").textContent = text; $("conn").className = "pill " + (cls || ""); }
function colourOf(label) {
  const i = S.speakers.indexOf(label);
  return i >= 0 ? COLOURS[i % COLOURS.length] : OTHER[label] || "#55aa55";
}
function dbfs(x) {
  let s = 0;
  for (let i = 0; i < x.length; i++) s += x[i] * x[i];
  const rms = Math.sqrt(s / Math.max(1, x.length));
  return rms > 0 ? Math.max(-120, 20 * Math.log10(rms)) : -120;
}
function showLevel(db) {
  S.level = db;
  $("level-fill").style.width = Math.max(0, Math.min(100, ((db + 70) / 70) * 100)) + "%";
  $("level-text").textContent = db.toFixed(1) + " dBFS";
}
function buttons() {
  const live = ws && ws.readyState === WebSocket.OPEN && S.formatOk;
  for (const i of [0, 1]) {
    $("record-" + i).disabled = !live || S.mode !== "idle";
    $("file-" + i).disabled = !live || S.mode !== "idle";
  }
  $("stream").disabled = !live || S.mode !== "idle" || !S.speakers.length;
  $("stop").disabled = !live || S.mode !== "stream";
  $("connect").disabled = !!live;
  $("connect").textContent = S.ready ? "New session" : "Start microphone & connect";
}

// ------------------------------------------------------------ audio in
function onBlock(block) {
  pending.push(block);
  pendingN += block.length;
  if (pendingN < ctx.sampleRate * CHUNK_S) return;
  const chunk = new Float32Array(pendingN);
  let o = 0;
  for (const b of pending) { chunk.set(b, o); o += b.length; }
  pending = []; pendingN = 0;
  showLevel(dbfs(chunk));
  if ((S.mode === "enroll" || S.mode === "stream") && ws && ws.readyState === WebSocket.OPEN) {
    ws.send(chunk.buffer);
  }
}

async function startAudio() {
  const media = await navigator.mediaDevices.getUserMedia({
    audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false, channelCount: 1 },
  });
  ctx = new AudioContext();
  await ctx.audioWorklet.addModule("/demo/static/capture-worklet.js");
  const src = ctx.createMediaStreamSource(media);
  const node = new AudioWorkletNode(ctx, "diglett-capture");
  node.port.onmessage = (e) => onBlock(e.data);
  const mute = ctx.createGain();
  mute.gain.value = 0;
  src.connect(node).connect(mute).connect(ctx.destination);
  await ctx.resume();
}

// ------------------------------------------------------------ socket
function reset() {
  Object.assign(S, { ready: null, formatOk: false, mode: "idle", enrolled: {}, speakers: [],
    labels: [], talk: {}, summary: null, errors: [], closeCode: null });
  for (const i of [0, 1]) { $("status-" + i).textContent = ""; $("status-" + i).className = "status"; }
  $("now-label").textContent = "–"; $("now-scores").textContent = "";
  renderTalk(); draw();
}

function connect() {
  reset();
  const url = new URL("/v1/stream", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  // The token as a subprotocol keeps it out of URLs (and logs); a token
  // with characters a subprotocol cannot carry goes in the query instead.
  const protocols = [];
  if (TOKEN && /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/.test(TOKEN)) {
    protocols.push("diglett.v1", "diglett.token." + TOKEN);
  } else if (TOKEN) {
    url.searchParams.set("token", TOKEN);
  }
  ws = new WebSocket(url, protocols);
  ws.binaryType = "arraybuffer";
  setConn("connecting…");
  ws.onmessage = (e) => handle(JSON.parse(e.data));
  ws.onclose = (e) => {
    S.closeCode = e.code;
    const code = CLOSES[e.code];
    if (e.code === 1000) {
      setConn("session ended");
      say("Session ended. Click the button above to start a new one.");
    }
    else {
      setConn("disconnected", "bad");
      if (code && !S.errors.some((x) => x.code === code)) error({ code, message: "connection closed (" + e.code + ")" });
      else if (!code) say("Connection lost (code " + e.code + "). Reload the page to start again.", true);
    }
    S.mode = "idle";
    buttons();
  };
}

function error(m) {
  S.errors.push(m);
  say((ERRORS[m.code] || "Server error") + " [" + m.code + ": " + (m.message || "") + "]", true);
  if (S.mode === "enroll" && enrollSlot !== null) {
    $("status-" + enrollSlot).textContent = "not enrolled: " + (ERRORS[m.code] || m.code);
    S.mode = "idle"; enrollSlot = null;
  }
  if (m.code === "not_enrolled" && S.mode === "stream") S.mode = "idle";
  buttons();
}

function handle(m) {
  if (m.type === "ready") {
    S.ready = m;
    setConn("connected", "ok");
    ws.send(JSON.stringify({ type: "format", sample_rate: Math.round(ctx.sampleRate), encoding: "pcm_f32le" }));
  } else if (m.type === "format_ok") {
    S.formatOk = true;
    say("Connected: " + m.sample_rate + " Hz " + m.encoding + ". Enroll two speakers, then stream.");
  } else if (m.type === "enrolled") {
    const slot = enrollSlot === null ? S.speakers.length : enrollSlot;
    S.enrolled[m.speaker] = m;
    if (!S.speakers.includes(m.speaker)) S.speakers.push(m.speaker);
    const w = m.warnings && m.warnings.length ? " — warnings: " + m.warnings.join(", ") : "";
    const st = $("status-" + slot);
    st.textContent = "enrolled: " + m.duration_s.toFixed(1) + " s, speech " + m.speech_s.toFixed(1) + " s, " + m.level_dbfs.toFixed(1) + " dBFS" + w;
    st.className = "status" + (w ? " warn" : "");
    S.mode = "idle"; enrollSlot = null;
    renderTalk();
  } else if (m.type === "label") {
    S.labels.push(m);
    S.talk[m.label] = (S.talk[m.label] || 0) + (m.end_s - m.start_s);
    $("now-label").textContent = m.label;
    $("now-label").style.color = colourOf(m.label);
    $("now-scores").textContent = Object.entries(m.scores || {}).map(([k, v]) => k + " " + v.toFixed(2)).join("  ") + "  ·  " + m.level_dbfs.toFixed(1) + " dBFS";
    renderTalk();
    draw();
  } else if (m.type === "summary") {
    S.summary = m;
    say("Summary: " + m.labels + " labels, " + m.audio_s + " s of audio; " + Object.entries(m.talk_s).map(([k, v]) => k + " " + v.toFixed(1) + " s").join(", "));
  } else if (m.type === "error") {
    error(m);
  }
  buttons();
}

// ------------------------------------------------------------ enrollment
function speakerName(slot) { return $("name-" + slot).value.trim(); }

async function countdown(n) {
  for (let k = n; k > 0; k--) { $("countdown").textContent = k + "…"; await sleep(1000); }
  $("countdown").textContent = "";
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function recordEnroll(slot) {
  const name = speakerName(slot);
  S.mode = "countdown"; enrollSlot = slot; buttons();
  $("status-" + slot).textContent = "get ready…";
  await countdown(COUNTDOWN_S);
  ws.send(JSON.stringify({ type: "enroll", speaker: name }));
  S.mode = "enroll";
  for (let t = RECORD_S; t > 0 && S.mode === "enroll"; t--) {
    $("status-" + slot).textContent = "recording " + name + ": speak now (" + t + " s)";
    await sleep(1000);
  }
  if (S.mode !== "enroll") return; // an error ended it
  S.mode = "waiting";
  $("status-" + slot).textContent = "checking…";
  ws.send(JSON.stringify({ type: "enroll_end" }));
}

async function fileEnroll(slot, file) {
  const name = speakerName(slot);
  S.mode = "waiting"; enrollSlot = slot; buttons();
  $("status-" + slot).textContent = "reading " + file.name + "…";
  let audio;
  try {
    audio = await ctx.decodeAudioData(await file.arrayBuffer()); // at ctx.sampleRate
  } catch (e) {
    say("Cannot read " + file.name + " as audio.", true);
    S.mode = "idle"; enrollSlot = null; buttons();
    return;
  }
  const n = audio.length, mono = new Float32Array(n);
  for (let c = 0; c < audio.numberOfChannels; c++) {
    const d = audio.getChannelData(c);
    for (let i = 0; i < n; i++) mono[i] += d[i] / audio.numberOfChannels;
  }
  ws.send(JSON.stringify({ type: "enroll", speaker: name }));
  const step = Math.round(ctx.sampleRate * 0.5);
  for (let i = 0; i < n; i += step) ws.send(mono.slice(i, i + step).buffer);
  ws.send(JSON.stringify({ type: "enroll_end" }));
}

// ------------------------------------------------------------ timeline
function renderTalk() {
  const body = $("talk").querySelector("tbody");
  body.innerHTML = "";
  const names = S.speakers.concat(Object.keys(S.talk).filter((k) => !S.speakers.includes(k)));
  for (const k of names) {
    const tr = document.createElement("tr");
    tr.id = "talk-" + k;
    tr.innerHTML = '<td><span style="color:' + colourOf(k) + '">■</span> </td><td></td>';
    tr.children[0].append(k);
    tr.children[1].textContent = (S.talk[k] || 0).toFixed(1) + " s";
    body.append(tr);
  }
}

function draw() {
  const c = $("timeline"), g = c.getContext("2d"), W = c.width, H = c.height;
  g.clearRect(0, 0, W, H);
  const last = S.labels.length ? S.labels[S.labels.length - 1].end_s : 0;
  const t0 = Math.max(0, last - WINDOW_S), x = (t) => ((t - t0) / WINDOW_S) * W;
  const bandH = 50;
  for (const l of S.labels) {
    if (l.end_s < t0) continue;
    g.fillStyle = colourOf(l.label);
    g.fillRect(x(l.start_s), 0, Math.max(1, x(l.end_s) - x(l.start_s)), bandH);
  }
  g.strokeStyle = "#333"; g.beginPath();
  let first = true;
  for (const l of S.labels) {
    if (l.end_s < t0) continue;
    const y = bandH + 10 + ((0 - Math.max(-90, l.level_dbfs)) / 90) * (H - bandH - 20);
    if (first) { g.moveTo(x(l.start_s), y); first = false; } else g.lineTo(x(l.start_s), y);
    g.lineTo(x(l.end_s), y);
  }
  g.stroke();
  g.fillStyle = "#555"; g.font = "11px sans-serif";
  for (let t = Math.ceil(t0 / 5) * 5; t <= t0 + WINDOW_S; t += 5) g.fillText(t + " s", x(t) + 2, H - 2);
}

// ------------------------------------------------------------ wiring
$("connect").onclick = async () => {
  try {
    if (!ctx) await startAudio();
  } catch (e) {
    say("No microphone: " + e.message + " (allow microphone access and reload).", true);
    return;
  }
  connect();
};
for (const i of [0, 1]) {
  $("record-" + i).onclick = () => recordEnroll(i);
  $("file-" + i).onchange = (e) => { if (e.target.files[0]) fileEnroll(i, e.target.files[0]); };
}
$("stream").onclick = () => {
  ws.send(JSON.stringify({ type: "stream" }));
  S.labels = []; S.talk = {}; S.mode = "stream"; buttons(); draw();
  say("Streaming: talk, and watch the timeline.");
};
$("stop").onclick = () => {
  S.mode = "ending"; buttons();
  ws.send(JSON.stringify({ type: "end" }));
};
buttons();
draw();
