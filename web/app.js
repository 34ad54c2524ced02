// Sonora web client, the page itself: the talk button and the text box
// start a conversation over /ws (protocol.js) that captures the microphone
// (capture.js), plays the reply (player.js) and shows transcripts, tool
// calls, engine hand-offs, the wait for a free engine, usage and latency
// in the page's language (text.js). No build step, no network use but this
// server (and, when the server names one, the host application's
// client-token URL).

import { openMicrophone, pickRecorderType, startRecorderCapture, startWorkletCapture, workletsAvailable } from '/capture.js';
import { Player } from '/player.js';
import { Connection, hello, socketUrl } from '/protocol.js';
import { chooseLanguage, label, language, setLanguage, t, translatePage } from '/text.js';

const params = new URLSearchParams(location.search);
// A client token rides in the fragment (#token=ct_…), which is never sent
// to any server or kept in its logs; `?token=` still works for static ones.
const fragment = new URLSearchParams(location.hash.slice(1));
const pageToken = fragment.get('token') || params.get('token');
// Set from /api/engine: where the host application hands out client tokens,
// and the engine instances the gateway routes between, with their voices.
let tokenUrl = '';
let engines = { instances: [], voices: [] };
const $ = (id) => document.getElementById(id);
const VOICE_LEVEL = 0.02; // RMS above which a capture frame counts as speech
const RENDER_EVERY_MS = 100;
const MAX_PENDING_FRAMES = 1250; // 20 ms frames queued before `ready`
// Opus bit rate of the MediaRecorder path (`?kbps=` overrides). At 32 and 64
// kbit/s the recogniser misheard test questions it heard right from PCM; at
// 96 kbit/s it did not (still well under the 256 kbit/s of 16 kHz PCM).
const RECORDER_KBPS = 96;
const TAIL_LIMIT_MS = 30000; // longest reply tail played after the conversation ends
const TOOL_INPUT_SHOWN_CHARS = 160;
// What this page answers a tool call with: it runs no client-side tools.
const NO_TOOLS = { error: 'unavailable', message: 'This client runs no tools.' };

setLanguage(chooseLanguage(params.get('ui'), navigator.language));

const state = {
  connection: null, capture: null, player: null, mode: null, running: false, conversation: 0,
  sentMs: 0, lastVoiceAt: 0, speechEndAt: null, latencies: [], serverLatencyMs: null,
  usage: null, budget: null, stats: null, engine: null, ended: null, errors: [], pendingText: null,
  toolCalls: 0, rotations: 0, lastGapMs: null, resumes: 0, reconnecting: false, queued: null,
};

function setStatus(text, isError = false) {
  const status = $('status');
  status.textContent = text;
  status.classList.toggle('error', isError);
}

function applyLanguage() {
  translatePage();
  // The button names the other language, in that language.
  $('ui-lang').lang = language() === 'es' ? 'en' : 'es';
  updateButton();
  scheduleRender();
}

// ---- metrics panel, at most one render per 100 ms ----
let renderTimer = null;
let lastRender = 0;
function scheduleRender() {
  if (renderTimer) return;
  const wait = Math.max(0, lastRender + RENDER_EVERY_MS - performance.now());
  renderTimer = setTimeout(() => { renderTimer = null; lastRender = performance.now(); render(); }, wait);
}

function fmtMs(ms) { return ms == null ? '—' : ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${Math.round(ms)} ms`; }
function fmtSeconds(ms) { return `${(ms / 1000).toFixed(1)} s`; }

function render() {
  const u = state.usage;
  const s = state.stats;
  const last = state.latencies.at(-1);
  const mean = state.latencies.length ? state.latencies.reduce((a, b) => a + b, 0) / state.latencies.length : null;
  $('m-latency').textContent = last == null ? '—' : `${fmtMs(last)} (${fmtMs(mean)} ⌀, ${state.latencies.length})`;
  $('m-server-latency').textContent = fmtMs(state.serverLatencyMs);
  $('m-cost').textContent = u ? `$${(u.cost_micro_usd / 1e6).toFixed(6)}` : '—';
  $('m-budget-row').hidden = state.budget == null;
  if (state.budget != null) $('m-budget').textContent = `$${(state.budget.remaining_micro_usd / 1e6).toFixed(6)}`;
  $('m-speech').textContent = u ? `${u.speech_in_tokens} / ${u.speech_out_tokens}` : '—';
  $('m-text').textContent = u ? `${u.text_in_tokens} / ${u.text_out_tokens}` : '—';
  const played = state.player ? state.player.playedSamples / state.player.rate * 1000 : 0;
  $('m-audio').textContent = `${fmtSeconds(state.sentMs)} / ${fmtSeconds(played)}`;
  if (s) {
    const d = s.decoder;
    $('m-decoder').textContent = `${(d.bytes_in / 1024).toFixed(0)} KiB, ${d.packets_concealed} ${t('concealed')}, ${d.bytes_refused} B ${t('refused')}`;
    const q = s.queues;
    $('m-queues').textContent = `↑ ${fmtMs(q.uplink_ms)} (${fmtMs(q.uplink_dropped_ms)} ${t('dropped')}) · ↓ ${fmtMs(q.downlink_ms)}`;
  }
  const dropped = state.capture?.facts().droppedFrames || 0;
  $('m-capture').textContent = !state.mode ? '—'
    : dropped > 0 ? `${t(state.mode)} (${t('frames-dropped', { count: dropped })})` : t(state.mode);
  $('m-engine').textContent = state.engine ? `${state.engine.engine} · ${state.engine.voice || '—'}` : '—';
  $('m-rotations').textContent = state.rotations === 0 ? '—' : `${state.rotations} (${t('last')}: ${fmtMs(state.lastGapMs)})`;
}

// ---- transcript ----
const lines = new Map(); // `${conversation}:${turn}:${role}` → <li>

function addLine(role, whoKey) {
  const li = document.createElement('li');
  li.className = role;
  li.dataset.role = role;
  const who = label(document.createElement('span'), whoKey);
  who.className = 'who';
  li.append(who, document.createElement('span'));
  $('transcript').append(li);
  return li;
}

function scrollTranscript() {
  $('transcript').scrollTop = $('transcript').scrollHeight;
}

function showTranscript(role, turn, text, stage) {
  const key = `${state.conversation}:${turn}:${role}`;
  let li = lines.get(key);
  if (!li) {
    li = addLine(role, role === 'user' ? 'you' : 'assistant');
    lines.set(key, li);
  }
  li.lastChild.textContent = text;
  li.classList.toggle('speculative', stage === 'speculative');
  li.dataset.stage = stage;
  li.dataset.turn = turn;
  scrollTranscript();
}

/** Barge-in: the reply on `li` was cut short. */
function markCut(li) {
  if (!li || li.classList.contains('cut')) return;
  li.classList.add('cut');
  const mark = label(document.createElement('span'), 'interrupted');
  mark.className = 'mark';
  li.insertBefore(mark, li.lastChild);
}

/** A line about the conversation rather than in it (a tool call, an engine hand-off). */
function showNote(kind, whoKey, textKey, args) {
  const li = addLine('note', whoKey);
  li.dataset.kind = kind;
  label(li.lastChild, textKey, args);
  scrollTranscript();
}

function preview(value) {
  const text = JSON.stringify(value ?? null);
  return text.length > TOOL_INPUT_SHOWN_CHARS ? `${text.slice(0, TOOL_INPUT_SHOWN_CHARS - 1)}…` : text;
}

// ---- the conversation ----
function noteLevel(rms) {
  if (rms > VOICE_LEVEL) state.lastVoiceAt = performance.now();
}

function onReplyStarted(atMs) {
  if (state.speechEndAt == null) return;
  state.latencies.push(atMs - state.speechEndAt);
  state.speechEndAt = null;
}

/** Decides how to capture: the worklet, the recorder (asked for, or the only way), or nothing. */
function captureChoice(withMicrophone) {
  if (!withMicrophone) return { mode: 'text-only', recorderType: null };
  const forceRecorder = params.get('capture') === 'recorder' || $('low-bandwidth').checked;
  const recorderType = forceRecorder || !workletsAvailable() ? pickRecorderType() : null;
  if (recorderType) return { mode: 'recorder', recorderType };
  if (workletsAvailable()) return { mode: 'worklet', recorderType: null };
  throw Object.assign(new Error('no capture'), { name: 'NoCapture' });
}

async function start({ withMicrophone = true } = {}) {
  if (state.running) return;
  state.running = true;
  state.conversation += 1;
  state.ended = null;
  state.engine = null;
  state.stats = null;
  state.speechEndAt = null;
  state.toolCalls = 0;
  state.rotations = 0;
  state.lastGapMs = null;
  state.resumes = 0;
  state.reconnecting = false;
  state.queued = null;
  state.player?.close(); // a previous reply's tail, if it is still playing
  updateButton();
  setStatus(t('connecting'));
  let stream = null;
  let mode = 'text-only';
  let recorderType = null;
  state.player = null;
  try {
    // First, inside the click: browsers let a context made here play.
    state.player = await Player.open({ onStarted: onReplyStarted, onProgress: scheduleRender });
    ({ mode, recorderType } = captureChoice(withMicrophone));
    if (mode !== 'text-only') stream = await openMicrophone();
  } catch (error) {
    const key = error.name === 'NotAllowedError' || error.name === 'SecurityError' ? 'mic-denied'
      : error.name === 'NotFoundError' ? 'no-mic'
      : 'no-capture';
    setStatus(t(key), true);
    mode = 'text-only';
    stream = null;
  }
  state.mode = mode;
  // Capture starts now, not when the server is ready: what the user says
  // right after pressing the button is queued, then sent on `ready`; if the
  // conversation has to wait for a free engine (`queued`), it is dropped.
  let connection = null;
  const early = [];
  const onAudio = (bytes, ms) => {
    if (connection?.queued) return; // waiting for a free engine: nobody would hear it
    state.sentMs += ms;
    if (connection) connection.sendAudio(bytes);
    else early.push(bytes.slice(0));
  };
  state.capture = null;
  if (stream) {
    try {
      state.capture = mode === 'recorder'
        ? await startRecorderCapture(stream, recorderType, Number(params.get('kbps')) || RECORDER_KBPS, { onAudio, onLevel: noteLevel })
        : await startWorkletCapture(stream, { onAudio, onLevel: noteLevel });
    } catch (error) {
      setStatus(`${t('no-capture')} (${error.message})`, true);
      for (const track of stream.getTracks()) track.stop();
      stream = null;
      state.mode = mode = 'text-only';
    }
  }
  const format = mode === 'recorder' ? recorderType.format : 'pcm16';
  let token = pageToken;
  if (tokenUrl) {
    try {
      const response = await fetch(tokenUrl, { method: 'POST', credentials: 'include' });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      token = (await response.json()).token;
    } catch (error) {
      setStatus(`${t('no-token')} (${error.message})`, true);
    }
  }
  connection = new Connection({
    url: socketUrl(),
    greeting: hello({ format, language: $('language').value, voice: $('voice').value, engine: $('engine').value, token }),
    handlers: conversationHandlers(() => connection, stream != null),
    queueLimit: MAX_PENDING_FRAMES,
    dropOldest: mode === 'worklet',
  });
  for (const bytes of early.splice(0)) connection.sendAudio(bytes);
  state.connection = connection;
  scheduleRender();
}

/** What one conversation does with each server message. */
function conversationHandlers(connection, listening) {
  let outputRate = 24000;
  let refused = false; // the hello was refused: the status says why
  const player = state.player;
  return {
    audio: (bytes) => player?.push(bytes, outputRate),
    queued: (m) => {
      state.queued = { position: m.position, waiting: m.waiting };
      setStatus(t('queued', { position: m.position, waiting: m.waiting }));
      scheduleRender();
    },
    ready: (message) => {
      outputRate = message.output.rate;
      // What a recorder wrote while queued was dropped: the server hears a
      // new stream, header first.
      if (state.queued) state.capture?.restart?.();
      state.queued = null;
      state.engine = message;
      state.budget = message.budget ?? null;
      scheduleRender();
      if (listening) setStatus(t('listening'));
      else if (!$('status').classList.contains('error')) setStatus('');
      if (state.pendingText) {
        connection().sendText(state.pendingText);
        state.pendingText = null;
      }
    },
    reconnecting: (attempt) => {
      state.reconnecting = true;
      setStatus(t('reconnecting', { attempt }));
      scheduleRender();
    },
    resumed: (m) => {
      state.reconnecting = false;
      state.resumes += 1;
      state.capture?.restart?.();
      if (m.skipped_audio_ms > 0) showNote('resumed', 'connection', 'resumed-skipped', { gap: fmtMs(m.skipped_audio_ms) });
      setStatus(listening ? t('listening') : '');
      if (state.pendingText) {
        connection().sendText(state.pendingText);
        state.pendingText = null;
      }
      scheduleRender();
    },
    transcript: (m) => showTranscript(m.role, m.turn, m.text, m.stage),
    speech: (m) => {
      if (m.state === 'ended') state.speechEndAt = state.lastVoiceAt || performance.now();
    },
    interrupted: (m) => {
      player?.flush();
      markCut(lines.get(`${state.conversation}:${m.turn}:assistant`));
    },
    usage: (m) => {
      state.usage = m.total;
      if (m.budget) state.budget = m.budget;
    },
    stats: (m) => { state.stats = m; },
    latency: (m) => { state.serverLatencyMs = m.ms; },
    turn_end: () => player?.endOfTurn(),
    tool: (m) => {
      state.toolCalls += 1;
      showNote('tool', 'tool', 'tool-call', { name: m.name, input: preview(m.input) });
      connection().sendToolResult(m.id, NO_TOOLS);
    },
    rotated: (m) => {
      state.rotations += 1;
      state.lastGapMs = m.gap_ms;
      if (typeof m.engine !== 'string' || !m.engine) {
        showNote('rotated', 'rotation', 'rotated', { generation: m.generation, gap: fmtMs(m.gap_ms) });
        return;
      }
      // Another engine instance took the conversation over, history and all.
      const voice = typeof m.voice === 'string' ? m.voice : state.engine?.voice;
      state.engine = { ...state.engine, engine: m.engine, model: m.model ?? state.engine?.model, voice };
      showNote('rotated', 'engine', voice ? 'rotated-engine-voice' : 'rotated-engine', { engine: m.engine, voice });
      scheduleRender();
    },
    error: (m) => {
      state.errors.push(m);
      if (m.code === 'budget_exceeded') setStatus(t(m.fatal ? 'budget-refused' : 'budget-spent'), true);
      else if (m.code === 'unknown_engine' || m.code === 'unknown_voice') {
        // The lists were out of date; the page sends no second hello. They
        // are loaded again once the socket closes.
        refused = true;
        setStatus(t(m.code === 'unknown_engine' ? 'unknown-engine' : 'unknown-voice', { engine: connection().greeting.engine ?? '' }), true);
        connection().close();
      } else if (m.fatal) setStatus(m.message, true);
    },
    end: (m) => {
      state.ended = m;
      const stopped = m.reason === 'client_stopped';
      if (m.reason === 'budget_exceeded') setStatus(t('budget-ended'), true);
      else setStatus(stopped ? t('ended') : `${t('ended')} ${m.message ?? ''}`.trim(), !stopped);
    },
    close: (event) => {
      state.reconnecting = false;
      state.queued = null;
      if (refused) { /* the status already says why */ }
      else if (event.code === 1013) setStatus(event.reason || t('busy'), true);
      else if (!state.ended && connection().stopped) setStatus(t('ended'));
      else if (!state.ended && event.code !== 1000) setStatus(event.reason || t('socket-failed'), true);
      state.capture?.stop();
      player?.finish(TAIL_LIMIT_MS).then(scheduleRender);
      if (state.connection === connection()) {
        state.connection = null;
        state.running = false;
        updateButton();
      }
      loadEngines(); // which instances are busy now, and any change of configuration
      scheduleRender();
    },
  };
}

function stop() {
  state.capture?.stop();
  state.connection?.stop();
}

// The button's name says what it does next; its colour shows a conversation running.
function updateButton() {
  $('talk').dataset.running = String(state.running);
  label($('talk-label'), state.running ? 'stop' : 'start');
}

async function loadEngines() {
  try {
    const info = await (await fetch('/api/engine')).json();
    tokenUrl = info.token_url || '';
    engines = {
      instances: Array.isArray(info.instances) ? info.instances : [],
      voices: Array.isArray(info.voices) ? info.voices : [],
    };
    fillEngines();
    fillVoices();
  } catch { /* "any engine" and the default voice still work */ }
}

/** Keeps the first option (the default) and the choice, when it is still there. */
function refill(select, options) {
  const chosen = select.value;
  select.replaceChildren(select.options[0], ...options);
  select.value = options.some((option) => option.value === chosen) ? chosen : '';
}

// The engine list shows only when there is a choice; an instance with no
// room keeps its place, since a conversation can wait for it.
function fillEngines() {
  const several = engines.instances.length > 1;
  refill($('engine'), !several ? [] : engines.instances.map((instance) => {
    const option = document.createElement('option');
    option.value = instance.name;
    const name = instance.kind && instance.kind !== instance.name ? `${instance.name} · ${instance.kind}` : instance.name;
    if (instance.available === false) label(option, 'engine-busy', { name });
    else option.textContent = name;
    return option;
  }));
  $('engine-field').hidden = !several;
}

/** The voices of the chosen engine, or of every engine for "any". */
function fillVoices() {
  const instance = engines.instances.find((i) => i.name === $('engine').value);
  const voices = instance ? instance.voices || [] : engines.voices;
  refill($('voice'), voices.map((voice) => {
    const option = document.createElement('option');
    option.value = voice.id;
    option.textContent = voice.label;
    return option;
  }));
}

/** `?lang=` picks the conversation's language, added to the list when it is not there. */
function applyLanguageParameter() {
  const lang = params.get('lang');
  if (!lang) return;
  const select = $('language');
  if (![...select.options].some((option) => option.value === lang)) {
    const option = document.createElement('option');
    option.value = option.textContent = lang;
    select.append(option);
  }
  select.value = lang;
}

// The narrow view automation gets: a fresh copy of a few facts, nothing to change.
function facts() {
  const capture = state.capture?.facts() ?? null;
  return structuredClone({
    running: state.running,
    conversation: state.conversation,
    mode: state.mode,
    ready: state.engine != null,
    playbackRate: state.player?.rate ?? null,
    receivedSamples: state.player?.receivedSamples ?? 0,
    playedSamples: state.player?.playedSamples ?? 0,
    latenciesMs: state.latencies,
    serverLatencyMs: state.serverLatencyMs,
    toolCalls: state.toolCalls,
    rotations: state.rotations,
    resumes: state.resumes,
    reconnecting: state.reconnecting,
    queued: state.queued,
    errors: state.errors,
    end: state.ended,
    audio: {
      player: state.player?.state ?? null,
      playback: state.player?.path ?? null,
      capture: capture?.context ?? null,
      tracks: capture?.tracks ?? null,
      recorder: capture?.recorder ?? null,
    },
  });
}
Object.defineProperty(window, 'sonora', { value: Object.freeze({ facts }), enumerable: true });

$('talk').addEventListener('click', () => (state.running ? stop() : start()));
$('engine').addEventListener('change', fillVoices);
$('ui-lang').addEventListener('click', () => {
  setLanguage(language() === 'es' ? 'en' : 'es');
  applyLanguage();
});
$('text-form').addEventListener('submit', (event) => {
  event.preventDefault();
  const text = $('text').value.trim();
  if (!text) return;
  $('text').value = '';
  if (state.connection?.ready && state.engine) {
    state.connection.sendText(text);
  } else if (state.connection?.reconnecting) {
    state.pendingText = text;
  } else {
    state.pendingText = text;
    start({ withMicrophone: false });
  }
  // After `start`, which forgets an earlier conversation's speech end.
  state.speechEndAt = performance.now();
});
applyLanguageParameter();
applyLanguage();
loadEngines();
