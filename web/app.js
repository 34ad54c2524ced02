// Sonora web client: microphone → /ws → engine → reply audio, transcripts,
// usage and latency. No build step, no network use but this server.

const TEXT = {
  es: {
    start: 'Hablar', stop: 'Detener', language: 'Idioma', voice: 'Voz', 'voice-default': 'Predeterminada',
    'low-bandwidth': 'Bajo ancho de banda (Opus)', transcript: 'Transcripción', type: 'Escribe un mensaje',
    send: 'Enviar', metrics: 'Uso y rendimiento', controls: 'Conversación',
    'm-latency': 'Latencia (fin de voz → audio)', 'm-server-latency': 'Latencia en el servidor', 'm-cost': 'Coste',
    'm-speech': 'Tokens de voz (entrada / salida)', 'm-text': 'Tokens de texto (entrada / salida)',
    'm-audio': 'Audio (enviado / reproducido)', 'm-decoder': 'Decodificador', 'm-queues': 'Colas',
    'm-capture': 'Captura', 'm-engine': 'Motor',
    you: 'Tú', assistant: 'Sonora', connecting: 'Conectando…', listening: 'Te escucho. Habla cuando quieras.',
    ended: 'Conversación terminada.', 'mic-denied': 'No hay permiso para usar el micrófono. Actívalo en el navegador o escribe tu pregunta.',
    'no-capture': 'Este navegador no puede capturar audio (ni AudioWorklet ni MediaRecorder con Opus). Escribe tu pregunta.',
    'no-mic': 'No se encontró ningún micrófono. Escribe tu pregunta.',
    'socket-failed': 'No se pudo conectar con el servidor.', busy: 'El servidor está ocupado; inténtalo de nuevo en un momento.',
    interrupted: 'interrumpida', worklet: 'AudioWorklet PCM 16 kHz', recorder: 'MediaRecorder', 'text-only': 'solo texto',
    concealed: 'ocultados', refused: 'rechazados', dropped: 'descartados', other: 'English',
  },
  en: {
    start: 'Talk', stop: 'Stop', language: 'Language', voice: 'Voice', 'voice-default': 'Default',
    'low-bandwidth': 'Low bandwidth (Opus)', transcript: 'Transcript', type: 'Type a message',
    send: 'Send', metrics: 'Usage and performance', controls: 'Conversation',
    'm-latency': 'Latency (end of speech → audio)', 'm-server-latency': 'Server latency', 'm-cost': 'Cost',
    'm-speech': 'Speech tokens (in / out)', 'm-text': 'Text tokens (in / out)',
    'm-audio': 'Audio (sent / played)', 'm-decoder': 'Decoder', 'm-queues': 'Queues',
    'm-capture': 'Capture', 'm-engine': 'Engine',
    you: 'You', assistant: 'Sonora', connecting: 'Connecting…', listening: 'Listening. Speak whenever you like.',
    ended: 'Conversation ended.', 'mic-denied': 'Microphone permission was denied. Allow it in the browser, or type your question.',
    'no-capture': 'This browser cannot capture audio (no AudioWorklet, no MediaRecorder with Opus). Type your question.',
    'no-mic': 'No microphone was found. Type your question.',
    'socket-failed': 'Could not connect to the server.', busy: 'The server is busy; try again in a moment.',
    interrupted: 'interrupted', worklet: 'AudioWorklet PCM 16 kHz', recorder: 'MediaRecorder', 'text-only': 'text only',
    concealed: 'concealed', refused: 'refused', dropped: 'dropped', other: 'Español',
  },
};

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
const VOICE_LEVEL = 0.02; // RMS above which a capture frame counts as speech
const RENDER_EVERY_MS = 100;
const MAX_PENDING_FRAMES = 1250; // 20 ms frames queued before `ready`
// Opus bit rate of the MediaRecorder path (`?kbps=` overrides). At 32 and 64
// kbit/s the recogniser misheard test questions it heard right from PCM; at
// 96 kbit/s it did not (still well under the 256 kbit/s of 16 kHz PCM).
const RECORDER_KBPS = 96;

let ui = params.get('ui') || ((navigator.language || 'es').toLowerCase().startsWith('es') ? 'es' : 'en');
if (!TEXT[ui]) ui = 'es';
const t = (key) => TEXT[ui][key] ?? key;

// Everything the page knows; `window.sonora` exposes it to automation.
const state = {
  socket: null, capture: null, player: null, mode: null, running: false,
  sentMs: 0, receivedSamples: 0, playedSamples: 0,
  lastVoiceAt: 0, speechEndAt: null, latencies: [], serverLatencyMs: null,
  usage: null, stats: null, engine: null, ended: null, errors: [], conversation: 0,
};
window.sonora = state;

function setStatus(text, isError = false) {
  const status = $('status');
  status.textContent = text;
  status.classList.toggle('error', isError);
}

function applyLanguage() {
  document.documentElement.lang = ui;
  for (const el of document.querySelectorAll('[data-i18n]')) el.textContent = t(el.dataset.i18n);
  for (const el of document.querySelectorAll('[data-i18n-placeholder]')) el.placeholder = t(el.dataset.i18nPlaceholder);
  $('ui-lang').textContent = t('other');
  $('ui-lang').setAttribute('aria-label', t('other'));
  $('talk-label').textContent = state.running ? t('stop') : t('start');
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
  $('m-speech').textContent = u ? `${u.speech_in_tokens} / ${u.speech_out_tokens}` : '—';
  $('m-text').textContent = u ? `${u.text_in_tokens} / ${u.text_out_tokens}` : '—';
  const played = state.player ? state.playedSamples / state.player.rate * 1000 : 0;
  $('m-audio').textContent = `${fmtSeconds(state.sentMs)} / ${fmtSeconds(played)}`;
  if (s) {
    const d = s.decoder;
    $('m-decoder').textContent = `${(d.bytes_in / 1024).toFixed(0)} KiB, ${d.packets_concealed} ${t('concealed')}, ${d.bytes_refused} B ${t('refused')}`;
    const q = s.queues;
    $('m-queues').textContent = `↑ ${fmtMs(q.uplink_ms)} (${fmtMs(q.uplink_dropped_ms)} ${t('dropped')}) · ↓ ${fmtMs(q.downlink_ms)}`;
  }
  $('m-capture').textContent = state.mode ? t(state.mode) : '—';
  $('m-engine').textContent = state.engine ? `${state.engine.engine} · ${state.engine.voice || '—'}` : '—';
}

// ---- transcript ----
const lines = new Map(); // `${turn}:${role}` → <li>
function showTranscript(role, turn, text, stage) {
  const key = `${state.conversation}:${turn}:${role}`;
  let li = lines.get(key);
  if (!li) {
    li = document.createElement('li');
    li.className = role;
    const who = document.createElement('span');
    who.className = 'who';
    who.textContent = role === 'user' ? t('you') : t('assistant');
    li.append(who, document.createElement('span'));
    lines.set(key, li);
    $('transcript').append(li);
  }
  li.lastChild.textContent = text;
  li.classList.toggle('speculative', stage === 'speculative');
  li.dataset.stage = stage;
  li.dataset.turn = turn;
  $('transcript').scrollTop = $('transcript').scrollHeight;
}

// ---- playback ----
async function startPlayer() {
  let context;
  try { context = new AudioContext({ sampleRate: 24000, latencyHint: 'interactive' }); } catch { context = new AudioContext(); }
  await context.resume();
  const player = { context, rate: context.sampleRate, node: null, queue: [] };
  if (context.audioWorklet) {
    await context.audioWorklet.addModule('/playback-worklet.js');
    player.node = new AudioWorkletNode(context, 'sonora-playback', { outputChannelCount: [1] });
    player.node.connect(context.destination);
    player.node.port.onmessage = (event) => onPlayer(event.data);
  }
  state.player = player;
  return player;
}

function onPlayer(message) {
  if (message.played != null) state.playedSamples = message.played;
  if (message.type === 'started' && state.speechEndAt != null) {
    const outputMs = (state.player.context.outputLatency || 0) * 1000;
    state.latencies.push(performance.now() + outputMs - state.speechEndAt);
    state.speechEndAt = null;
  }
  scheduleRender();
}

function playPcm(bytes, rate) {
  const player = state.player;
  if (!player) return;
  const pcm = new Int16Array(bytes);
  state.receivedSamples += pcm.length;
  let samples = new Float32Array(pcm.length);
  for (let i = 0; i < pcm.length; i++) samples[i] = pcm[i] / 32768;
  if (player.rate !== rate) samples = resampleLinear(samples, rate, player.rate);
  if (player.node) {
    player.node.port.postMessage({ type: 'push', samples }, [samples.buffer]);
  } else {
    // No worklets: schedule buffers back to back.
    const buffer = player.context.createBuffer(1, samples.length, player.rate);
    buffer.copyToChannel(samples, 0);
    const source = player.context.createBufferSource();
    source.buffer = buffer;
    source.connect(player.context.destination);
    const at = Math.max(player.context.currentTime + 0.03, player.next || 0);
    source.start(at);
    player.next = at + buffer.duration;
    player.queue.push(source);
    source.onended = () => { player.queue.shift(); state.playedSamples += samples.length; scheduleRender(); };
    if (state.speechEndAt != null) {
      state.latencies.push(performance.now() + (at - player.context.currentTime) * 1000 - state.speechEndAt);
      state.speechEndAt = null;
    }
  }
}

function resampleLinear(input, from, to) {
  const out = new Float32Array(Math.floor(input.length * to / from));
  const step = from / to;
  for (let i = 0; i < out.length; i++) {
    const x = i * step;
    const j = Math.floor(x);
    const f = x - j;
    out[i] = input[j] * (1 - f) + (input[j + 1] ?? input[j]) * f;
  }
  return out;
}

function flushPlayback() {
  const player = state.player;
  if (!player) return;
  if (player.node) player.node.port.postMessage({ type: 'flush' });
  for (const source of player.queue.splice(0)) { try { source.stop(); } catch { /* already ended */ } }
  player.next = 0;
}

// ---- capture ----
function pickRecorderType() {
  if (typeof MediaRecorder === 'undefined') return null;
  for (const [mime, format] of [['audio/webm;codecs=opus', 'webm'], ['audio/ogg;codecs=opus', 'ogg']]) {
    if (MediaRecorder.isTypeSupported(mime)) return { mime, format };
  }
  return null;
}

async function openMicrophone() {
  if (!navigator.mediaDevices?.getUserMedia) throw Object.assign(new Error('no getUserMedia'), { name: 'NotSupportedError' });
  return navigator.mediaDevices.getUserMedia({
    audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
  });
}

function noteLevel(rms) {
  if (rms > VOICE_LEVEL) state.lastVoiceAt = performance.now();
}

async function startWorkletCapture(stream, send) {
  let context;
  try { context = new AudioContext({ sampleRate: 16000 }); } catch { context = new AudioContext(); }
  let source;
  try { source = context.createMediaStreamSource(stream); } catch {
    await context.close();
    context = new AudioContext();
    source = context.createMediaStreamSource(stream);
  }
  await context.audioWorklet.addModule('/capture-worklet.js');
  const node = new AudioWorkletNode(context, 'sonora-capture', { numberOfInputs: 1, numberOfOutputs: 0, channelCount: 1 });
  node.port.onmessage = (event) => {
    noteLevel(event.data.rms);
    state.sentMs += 20;
    send(event.data.pcm);
  };
  source.connect(node);
  await context.resume();
  return { stop: () => { source.disconnect(); node.port.onmessage = null; stream.getTracks().forEach((tr) => tr.stop()); context.close(); } };
}

async function startRecorderCapture(stream, type, send) {
  // A level meter beside the recorder, for the latency measurement.
  const context = new AudioContext();
  const source = context.createMediaStreamSource(stream);
  const analyser = context.createAnalyser();
  analyser.fftSize = 512;
  source.connect(analyser);
  const frame = new Float32Array(analyser.fftSize);
  const meter = setInterval(() => {
    analyser.getFloatTimeDomainData(frame);
    let sum = 0;
    for (const s of frame) sum += s * s;
    noteLevel(Math.sqrt(sum / frame.length));
  }, 20);
  const kbps = Number(params.get('kbps')) || RECORDER_KBPS;
  const recorder = new MediaRecorder(stream, { mimeType: type.mime, audioBitsPerSecond: kbps * 1000 });
  let chain = Promise.resolve();
  recorder.ondataavailable = (event) => {
    if (!event.data || event.data.size === 0) return;
    // Blobs are read in order, so the container stays contiguous.
    chain = chain.then(() => event.data.arrayBuffer()).then((bytes) => { state.sentMs += 100; send(bytes); });
  };
  recorder.start(100);
  return {
    stop: () => {
      clearInterval(meter);
      if (recorder.state !== 'inactive') recorder.stop();
      stream.getTracks().forEach((tr) => tr.stop());
      context.close();
    },
  };
}

// ---- the conversation ----
function socketUrl() {
  return `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws`;
}

async function start({ withMicrophone = true } = {}) {
  if (state.running) return;
  state.running = true;
  state.conversation += 1;
  state.ended = null;
  state.engine = null;
  state.stats = null;
  state.speechEndAt = null;
  updateButton();
  setStatus(t('connecting'));
  let stream = null;
  let recorderType = null;
  let mode = 'text-only';
  const forceRecorder = params.get('capture') === 'recorder' || $('low-bandwidth').checked;
  try {
    await startPlayer();
    if (withMicrophone) {
      const worklets = typeof AudioWorkletNode !== 'undefined' && !forceRecorder;
      recorderType = worklets ? null : pickRecorderType();
      if (!worklets && !recorderType) {
        if (typeof AudioWorkletNode !== 'undefined') {
          mode = 'worklet';
        } else {
          throw Object.assign(new Error('no capture'), { name: 'NoCapture' });
        }
      } else {
        mode = worklets ? 'worklet' : 'recorder';
      }
      stream = await openMicrophone();
    }
  } catch (error) {
    const key = error.name === 'NotAllowedError' || error.name === 'SecurityError' ? 'mic-denied'
      : error.name === 'NotFoundError' ? 'no-mic'
      : 'no-capture';
    setStatus(t(key), true);
    mode = 'text-only';
    stream = null;
  }
  state.mode = mode;
  const format = mode === 'recorder' ? recorderType.format : 'pcm16';
  // Capture starts now, not when the server is ready: what the user says
  // right after pressing the button is queued, then sent on `ready`.
  let socket = null;
  let live = false;
  const pending = [];
  const send = (bytes) => {
    if (live) {
      if (socket.readyState === WebSocket.OPEN) socket.send(bytes);
      return;
    }
    pending.push(bytes);
    // PCM frames may be dropped from the front (25 s at most); a recorder's
    // blobs may not, since the first one holds the stream header.
    if (mode === 'worklet' && pending.length > MAX_PENDING_FRAMES) pending.shift();
  };
  if (stream) {
    try {
      state.capture = mode === 'recorder'
        ? await startRecorderCapture(stream, recorderType, send)
        : await startWorkletCapture(stream, send);
    } catch (error) {
      setStatus(`${t('no-capture')} (${error.message})`, true);
      stream.getTracks().forEach((tr) => tr.stop());
      stream = null;
      state.mode = mode = 'text-only';
    }
  }
  socket = new WebSocket(socketUrl());
  socket.binaryType = 'arraybuffer';
  state.socket = socket;
  let outputRate = 24000;
  socket.onopen = () => {
    const audio = format === 'pcm16' ? { format, rate: 16000 } : { format };
    const hello = { type: 'hello', version: 1, audio, language: $('language').value, voice: $('voice').value };
    const token = params.get('token');
    if (token) hello.token = token;
    socket.send(JSON.stringify(hello));
  };
  socket.onmessage = (event) => {
    if (typeof event.data !== 'string') { playPcm(event.data, outputRate); return; }
    const message = JSON.parse(event.data);
    switch (message.type) {
      case 'ready':
        outputRate = message.output.rate;
        state.engine = message;
        for (const bytes of pending.splice(0)) socket.send(bytes);
        live = true;
        if (stream) {
          setStatus(t('listening'));
        } else if (mode === 'text-only' && !$('status').classList.contains('error')) {
          setStatus('');
        }
        if (state.pendingText) { socket.send(JSON.stringify({ type: 'text', text: state.pendingText })); state.pendingText = null; }
        break;
      case 'transcript': showTranscript(message.role, message.turn, message.text, message.stage); break;
      case 'speech':
        if (message.state === 'ended') state.speechEndAt = state.lastVoiceAt || performance.now();
        break;
      case 'interrupted': {
        flushPlayback();
        const li = lines.get(`${state.conversation}:${message.turn}:assistant`);
        if (li) li.classList.add('cut');
        break;
      }
      case 'usage': state.usage = message.total; break;
      case 'stats': state.stats = message; break;
      case 'latency': state.serverLatencyMs = message.ms; break;
      case 'turn_end': if (state.player?.node) state.player.node.port.postMessage({ type: 'end' }); break;
      case 'error':
        state.errors.push(message);
        if (message.fatal) setStatus(message.message, true);
        break;
      case 'end':
        state.ended = message;
        setStatus(message.reason === 'client_stopped' ? t('ended') : `${t('ended')} ${message.message}`, message.reason !== 'client_stopped');
        break;
      default: break;
    }
    scheduleRender();
  };
  socket.onclose = (event) => {
    if (event.code === 1013) setStatus(event.reason || t('busy'), true);
    else if (!state.ended && event.code !== 1000) setStatus(event.reason || t('socket-failed'), true);
    stopCapture();
    state.running = false;
    state.socket = null;
    updateButton();
  };
}

function stopCapture() {
  if (state.capture) { state.capture.stop(); state.capture = null; }
}

function stop() {
  stopCapture();
  if (state.socket?.readyState === WebSocket.OPEN) state.socket.send(JSON.stringify({ type: 'stop' }));
}

function updateButton() {
  $('talk').setAttribute('aria-pressed', String(state.running));
  $('talk-label').textContent = state.running ? t('stop') : t('start');
}

async function loadVoices() {
  try {
    const info = await (await fetch('/api/engine')).json();
    const select = $('voice');
    for (const voice of info.voices || []) {
      const option = document.createElement('option');
      option.value = voice.id;
      option.textContent = voice.label;
      select.append(option);
    }
  } catch { /* the default voice still works */ }
}

$('talk').addEventListener('click', () => (state.running ? stop() : start()));
$('ui-lang').addEventListener('click', () => { ui = ui === 'es' ? 'en' : 'es'; applyLanguage(); });
$('text-form').addEventListener('submit', (event) => {
  event.preventDefault();
  const text = $('text').value.trim();
  if (!text) return;
  $('text').value = '';
  state.speechEndAt = performance.now();
  if (state.socket?.readyState === WebSocket.OPEN && state.engine) {
    state.socket.send(JSON.stringify({ type: 'text', text }));
  } else {
    state.pendingText = text;
    start({ withMicrophone: false });
  }
});
if (params.get('lang')) $('language').value = params.get('lang');
applyLanguage();
loadVoices();
