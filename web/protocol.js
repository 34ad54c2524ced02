// The `/ws` conversation protocol, version 1 (docs/protocol.md), from the
// page's side. Up: the hello, user audio (queued until `ready`), typed text,
// tool results and stop. Down: reply audio, and server messages checked for
// the fields the page reads, each handed to the handler named by its type.

export const VERSION = 1;

/** The fields each server message the page acts on must carry, by type. */
const REQUIRED = {
  ready: { output: 'object' },
  speech: { state: 'string' },
  transcript: { role: 'string', stage: 'string', text: 'string', turn: 'number' },
  latency: { ms: 'number' },
  interrupted: { turn: 'number' },
  turn_end: { turn: 'number' },
  usage: { total: 'object' },
  stats: { queues: 'object', decoder: 'object' },
  tool: { id: 'string', name: 'string' },
  rotated: { generation: 'number', gap_ms: 'number' },
  error: { code: 'string', message: 'string' },
  end: { reason: 'string' },
};

export const SERVER_TYPES = Object.freeze(Object.keys(REQUIRED));

export function socketUrl(page = location) {
  return `${page.protocol === 'https:' ? 'wss' : 'ws'}://${page.host}/ws`;
}

/** The hello for audio in `format` (`pcm16` at 16 kHz, `webm` or `ogg`). */
export function hello({ format, language, voice, token }) {
  const message = {
    type: 'hello',
    version: VERSION,
    audio: format === 'pcm16' ? { format, rate: 16000 } : { format },
    language,
    voice,
  };
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

/**
 * One conversation's socket. `handlers` has a function per server message
 * type it wants (`ready`, `transcript`, `tool`, `rotated`, …), plus
 * `audio(bytes)` for reply audio and `close(event)`. User audio sent before
 * `ready` waits, copied; past `queueLimit` pieces the oldest is dropped when
 * `dropOldest` (PCM frames), never otherwise (a container's first blob holds
 * its header).
 */
export class Connection {
  constructor({ url, greeting, handlers, queueLimit, dropOldest }) {
    this.handlers = handlers;
    this.queueLimit = queueLimit;
    this.dropOldest = dropOldest;
    this.pending = [];
    this.ready = false;
    this.stopped = false; // `stop` was called
    this.socket = new WebSocket(url);
    this.socket.binaryType = 'arraybuffer';
    this.socket.onopen = () => this.socket.send(JSON.stringify(greeting));
    this.socket.onmessage = (event) => this.receive(event.data);
    this.socket.onclose = (event) => {
      this.ready = false;
      this.pending.length = 0;
      this.handlers.close?.(event);
    };
  }

  get open() {
    return this.socket.readyState === WebSocket.OPEN;
  }

  receive(data) {
    if (typeof data !== 'string') {
      this.handlers.audio?.(data);
      return;
    }
    const message = parseServerMessage(data);
    if (!message) return;
    if (message.type === 'ready') {
      this.ready = true;
      for (const bytes of this.pending.splice(0)) this.socket.send(bytes);
    }
    this.handlers[message.type]?.(message);
  }

  /** User audio; the caller may reuse `bytes` once this returns. */
  sendAudio(bytes) {
    if (this.ready) {
      if (this.open) this.socket.send(bytes);
      return;
    }
    this.pending.push(bytes.slice(0));
    if (this.dropOldest && this.pending.length > this.queueLimit) this.pending.shift();
  }

  sendJson(message) {
    if (!this.open) return false;
    this.socket.send(JSON.stringify(message));
    return true;
  }

  sendText(text) {
    return this.sendJson({ type: 'text', text });
  }

  sendToolResult(id, result) {
    return this.sendJson({ type: 'tool_result', id, result });
  }

  /** Asks the server to end the conversation; a socket still connecting is just closed. */
  stop() {
    this.stopped = true;
    if (this.open) this.sendJson({ type: 'stop' });
    else if (this.socket.readyState === WebSocket.CONNECTING) this.socket.close();
  }
}
