// The `/ws` conversation protocol, version 1 (docs/protocol.md), from the
// page's side. Up: the hello, user audio (queued until `ready`, dropped while
// the conversation waits for a free engine), typed text, tool results and
// stop. Down: reply audio, and server messages checked for the fields the
// page reads, each handed to the handler named by its type.

export const VERSION = 1;

/** The fields each server message the page acts on must carry, by type. */
const REQUIRED = {
  ready: { output: 'object' },
  queued: { position: 'number', waiting: 'number' },
  speech: { state: 'string' },
  transcript: { role: 'string', stage: 'string', text: 'string', turn: 'number' },
  latency: { ms: 'number' },
  interrupted: { turn: 'number' },
  turn_end: { turn: 'number' },
  usage: { total: 'object' },
  stats: { queues: 'object', decoder: 'object' },
  tool: { id: 'string', name: 'string' },
  rotated: { generation: 'number', gap_ms: 'number' },
  resumed: { replayed: 'number', skipped: 'number', skipped_audio_ms: 'number' },
  error: { code: 'string', message: 'string' },
  end: { reason: 'string' },
};

export const SERVER_TYPES = Object.freeze(Object.keys(REQUIRED));

export function socketUrl(page = location) {
  return `${page.protocol === 'https:' ? 'wss' : 'ws'}://${page.host}/ws`;
}

/**
 * The hello for audio in `format` (`pcm16` at 16 kHz, `webm` or `ogg`);
 * `engine` (an instance name or an engine kind) and `token` only when given.
 */
export function hello({ format, language, voice, engine, token }) {
  const message = {
    type: 'hello',
    version: VERSION,
    audio: format === 'pcm16' ? { format, rate: 16000 } : { format },
    language,
    voice,
  };
  if (engine) message.engine = engine;
  if (token) message.token = token;
  return message;
}

/**
 * A server text frame as an object, or null when it is not JSON, has a type
 * this page does not know (a later version's) or lacks a field it reads.
 */
export function parseServerMessage(text) {
  let message;
  try { message = JSON.parse(text); } catch { return null; }
  if (message === null || typeof message !== 'object' || Array.isArray(message)) return null;
  const fields = Object.hasOwn(REQUIRED, message.type) ? REQUIRED[message.type] : null;
  if (!fields) return null;
  for (const [name, kind] of Object.entries(fields)) {
    const value = message[name];
    if (typeof value !== kind || value === null) return null;
  }
  return message;
}

// Waits between attempts to re-attach after a dropped connection, in ms;
// the last repeats until the server's window (`resume_window_ms`) passes.
const RETRY_MS = [250, 500, 1000, 2000, 4000];
const RESUME_WINDOW_MS = 30000;

/**
 * One conversation, over one socket or, when the connection drops, the
 * next: `handlers` has a function per server message type it wants
 * (`ready`, `transcript`, `tool`, `rotated`, …), plus `audio(bytes)` for
 * reply audio, `reconnecting(attempt)` and `close(event)` (the last
 * socket's). User audio sent before `ready` waits, copied; past `queueLimit`
 * pieces the oldest is dropped when `dropOldest` (PCM frames), never
 * otherwise (a container's first blob holds its header). Audio captured
 * while the connection is down is not sent: the server hears silence.
 * While the conversation waits for a free engine (`queued`, before
 * `ready`) audio is dropped, not held: the server would not hear it, and
 * a recorder starts a new stream, header first, once `ready` comes.
 *
 * Every frame of the conversation is numbered (`seq`; a binary frame takes
 * the next number): a socket that drops before `end` is replaced by one
 * whose hello names the conversation's `resume` secret and the last frame
 * received, and the server sends what was missed, then `resumed`. A frame
 * already seen is never handled twice.
 */
export class Connection {
  constructor({ url, greeting, handlers, queueLimit, dropOldest }) {
    this.url = url;
    this.greeting = greeting;
    this.handlers = handlers;
    this.queueLimit = queueLimit;
    this.dropOldest = dropOldest;
    this.pending = [];
    this.ready = false;
    this.queued = false; // waiting for a free engine, before `ready`
    this.stopped = false; // `stop` was called
    this.ended = false; // `end` arrived
    this.lastSeq = 0;
    this.secret = null;
    this.attempts = 0;
    this.awaySince = 0;
    this.retry = null;
    this.connect(greeting);
  }

  connect(greeting) {
    // `?resume` lets a returning client in even when the server is full:
    // its conversation kept its place.
    const socket = new WebSocket(greeting.resume ? `${this.url}?resume` : this.url);
    this.socket = socket;
    socket.binaryType = 'arraybuffer';
    socket.onopen = () => socket.send(JSON.stringify(greeting));
    socket.onmessage = (event) => this.receive(event.data);
    socket.onclose = (event) => this.closed(event);
  }

  closed(event) {
    this.ready = false;
    this.queued = false;
    this.pending.length = 0;
    // 1008: the secret was refused (`resume_failed`); a busy server (1013)
    // is tried again while the conversation waits. One still in the queue
    // has no secret: it lost its place.
    if (this.secret && !this.stopped && !this.ended && event.code !== 1008) {
      const now = performance.now();
      if (!this.awaySince) this.awaySince = now;
      if (now - this.awaySince < RESUME_WINDOW_MS) {
        const wait = RETRY_MS[Math.min(this.attempts, RETRY_MS.length - 1)];
        this.attempts += 1;
        this.handlers.reconnecting?.(this.attempts);
        this.retry = setTimeout(() => {
          this.retry = null;
          // The engine is the conversation's already (perhaps another one since).
          this.connect({ ...this.greeting, token: undefined, engine: undefined, resume: this.secret, last_seq: this.lastSeq });
        }, wait);
        return;
      }
    }
    this.handlers.close?.(event);
  }

  get open() {
    return this.socket.readyState === WebSocket.OPEN;
  }

  get reconnecting() {
    return this.awaySince !== 0;
  }

  receive(data) {
    if (typeof data !== 'string') {
      this.lastSeq += 1;
      this.handlers.audio?.(data);
      return;
    }
    const message = parseServerMessage(data);
    if (!message) return;
    if (typeof message.seq === 'number') {
      if (message.seq <= this.lastSeq) return;
      this.lastSeq = message.seq;
    }
    if (message.type === 'ready') {
      if (typeof message.resume === 'string') this.secret = message.resume;
      this.attached();
    } else if (message.type === 'queued') {
      this.queued = true;
      this.pending.length = 0;
    } else if (message.type === 'resumed') {
      this.awaySince = 0;
      this.attempts = 0;
      this.attached();
    } else if (message.type === 'end') {
      this.ended = true;
    }
    this.handlers[message.type]?.(message);
  }

  attached() {
    this.ready = true;
    this.queued = false;
    for (const bytes of this.pending.splice(0)) this.socket.send(bytes);
  }

  /** User audio; the caller may reuse `bytes` once this returns. */
  sendAudio(bytes) {
    if (this.ready) {
      if (this.open) this.socket.send(bytes);
      return;
    }
    if (this.reconnecting || this.queued) return;
    this.pending.push(bytes.slice(0));
    if (this.dropOldest && this.pending.length > this.queueLimit) this.pending.shift();
  }

  sendJson(message) {
    if (!this.open || !this.ready) return false;
    this.socket.send(JSON.stringify(message));
    return true;
  }

  sendText(text) {
    return this.sendJson({ type: 'text', text });
  }

  sendToolResult(id, result) {
    return this.sendJson({ type: 'tool_result', id, result });
  }

  /**
   * Asks the server to end the conversation; a socket still connecting, or
   * one still waiting for a free engine, is just closed.
   */
  stop() {
    this.stopped = true;
    if (this.retry) {
      clearTimeout(this.retry);
      this.retry = null;
      this.handlers.close?.({ code: 1000, reason: '' });
      return;
    }
    if (this.queued) this.close();
    else if (this.open) this.socket.send(JSON.stringify({ type: 'stop' }));
    else if (this.socket.readyState === WebSocket.CONNECTING) this.socket.close();
  }

  /** Gives up on a conversation that never started (its hello refused, or still queued): closes without `stop`. */
  close() {
    this.stopped = true;
    if (this.socket.readyState !== WebSocket.CLOSED) this.socket.close(1000);
  }
}
