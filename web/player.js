// Reply playback: signed 16-bit PCM from the socket into the ring of
// playback-worklet.js, or, where worklets are missing, buffers scheduled
// back to back. One player per conversation: `finish` plays what is queued
// and then closes its AudioContext; `close` closes it at once.

const PREFERRED_RATE_HZ = 24000;
const SCHEDULE_AHEAD_S = 0.03; // first buffer of the fallback path
const TAIL_MARGIN_MS = 500; // beyond the queued audio, before `finish` gives up waiting

export class Player {
  /**
   * Opens a player. Call it straight from a click: the AudioContext is
   * made before the first `await`, inside the user's gesture.
   * `onStarted(atMs)`: reply sound begins, heard at `atMs` (performance.now() time).
   * `onProgress()`: the count of samples played moved.
   */
  static async open({ onStarted, onProgress }) {
    let context;
    try {
      context = new AudioContext({ sampleRate: PREFERRED_RATE_HZ, latencyHint: 'interactive' });
    } catch {
      context = new AudioContext();
    }
    const player = new Player(context, onStarted, onProgress);
    try {
      await context.resume();
      if (context.audioWorklet) {
        await context.audioWorklet.addModule('/playback-worklet.js');
        player.attachWorklet();
      }
    } catch (error) {
      await player.close();
      throw error;
    }
    return player;
  }

  constructor(context, onStarted, onProgress) {
    this.context = context;
    this.onStarted = onStarted;
    this.onProgress = onProgress;
    this.node = null;
    this.sources = []; // the fallback path's scheduled buffers
    this.next = 0; // when the fallback path's next buffer starts, in context time
    this.receivedSamples = 0; // at the server's rate
    this.pushedSamples = 0; // at the context's rate
    this.playedSamples = 0;
    this.onFinished = null;
    this.closed = null; // the promise of `close`, once called
  }

  attachWorklet() {
    this.node = new AudioWorkletNode(this.context, 'sonora-playback', { outputChannelCount: [1] });
    this.node.connect(this.context.destination);
    this.node.port.onmessage = (event) => this.onWorklet(event.data);
  }

  /** Samples per second of the output. */
  get rate() {
    return this.context.sampleRate;
  }

  /** How it plays: `worklet` (the ring) or `buffers` (scheduled back to back). */
  get path() {
    return this.node ? 'worklet' : 'buffers';
  }

  /** The AudioContext's state: `running`, `suspended` or `closed`. */
  get state() {
    return this.context.state;
  }

  onWorklet(message) {
    if (message.played != null) this.playedSamples = message.played;
    if (message.type === 'started') this.onStarted(performance.now() + (this.context.outputLatency || 0) * 1000);
    if (message.type === 'finished' && this.onFinished) this.onFinished();
    this.onProgress();
  }

  /** Queues reply audio: `bytes` of s16le mono at `rate` Hz. */
  push(bytes, rate) {
    if (this.closed) return;
    const pcm = new Int16Array(bytes);
    this.receivedSamples += pcm.length;
    let samples = new Float32Array(pcm.length);
    for (let i = 0; i < pcm.length; i++) samples[i] = pcm[i] / 32768;
    if (this.rate !== rate) samples = resampleLinear(samples, rate, this.rate);
    this.pushedSamples += samples.length;
    if (this.node) {
      this.node.port.postMessage({ type: 'push', samples }, [samples.buffer]);
      return;
    }
    const context = this.context;
    const buffer = context.createBuffer(1, samples.length, this.rate);
    buffer.copyToChannel(samples, 0);
    const source = context.createBufferSource();
    source.buffer = buffer;
    source.connect(context.destination);
    const at = Math.max(context.currentTime + SCHEDULE_AHEAD_S, this.next);
    source.start(at);
    this.next = at + buffer.duration;
    this.sources.push(source);
    source.onended = () => {
      this.sources.shift();
      this.playedSamples += buffer.length;
      this.onProgress();
    };
    this.onStarted(performance.now() + (at - context.currentTime) * 1000);
  }

  /** Barge-in: drops every queued sample at once. */
  flush() {
    if (this.node) this.node.port.postMessage({ type: 'flush' });
    for (const source of this.sources.splice(0)) {
      try { source.stop(); } catch { /* already ended */ }
    }
    this.next = 0;
  }

  /** The reply is complete: play its tail without waiting for the jitter buffer. */
  endOfTurn() {
    if (this.node && !this.closed) this.node.port.postMessage({ type: 'end' });
  }

  /** Plays what is queued (for at most `limitMs`), then closes. */
  async finish(limitMs) {
    if (this.closed) return this.closed;
    const queuedMs = this.node
      ? Math.max(0, this.pushedSamples - this.playedSamples) / this.rate * 1000
      : Math.max(0, this.next - this.context.currentTime) * 1000;
    await new Promise((resolve) => {
      const timer = setTimeout(resolve, Math.min(limitMs, queuedMs + TAIL_MARGIN_MS));
      if (this.node) {
        this.onFinished = () => { clearTimeout(timer); resolve(); };
        this.node.port.postMessage({ type: 'finish' });
      }
    });
    return this.close();
  }

  /** Stops playing and closes the AudioContext; safe to call again. */
  close() {
    if (this.closed) return this.closed;
    this.onFinished = null;
    if (this.node) {
      this.node.port.onmessage = null;
      this.node.disconnect();
      this.node.port.close();
    }
    for (const source of this.sources.splice(0)) {
      source.onended = null;
      try { source.stop(); } catch { /* already ended */ }
    }
    this.closed = this.context.close().catch(() => { /* already closed */ });
    return this.closed;
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
