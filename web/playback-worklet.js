// Reply playback: a ring buffer of mono samples at the context's rate with
// a small jitter buffer. Posts `started` when sound begins after silence,
// the running count of samples played, and `finished` once the ring is
// empty after a `finish` (the conversation is over: the page then closes
// the context).
const CAPACITY_SECONDS = 30;
const JITTER_SECONDS = 0.06;

class Playback extends AudioWorkletProcessor {
  constructor() {
    super();
    this.ring = new Float32Array(Math.ceil(sampleRate * CAPACITY_SECONDS));
    this.read = 0;
    this.write = 0;
    this.size = 0;
    this.playing = false;
    this.jitter = Math.ceil(sampleRate * JITTER_SECONDS);
    this.played = 0;
    this.dropped = 0;
    this.lastReport = 0;
    this.ending = false; // the reply is complete: play the tail without waiting
    this.finishing = false; // the conversation is over: say when the ring is empty
    this.port.onmessage = (event) => this.onMessage(event.data);
  }

  onMessage(message) {
    if (message.type === 'push') {
      const samples = message.samples;
      for (let i = 0; i < samples.length; i++) {
        if (this.size === this.ring.length) {
          // Full: drop the oldest sample.
          this.read = (this.read + 1) % this.ring.length;
          this.size--;
          this.dropped++;
        }
        this.ring[this.write] = samples[i];
        this.write = (this.write + 1) % this.ring.length;
        this.size++;
      }
      this.ending = false;
    } else if (message.type === 'flush') {
      this.read = this.write = this.size = 0;
      this.playing = false;
      this.port.postMessage({ type: 'flushed', played: this.played });
      if (this.finishing) this.finished();
    } else if (message.type === 'end') {
      this.ending = true;
    } else if (message.type === 'finish') {
      this.ending = true;
      this.finishing = true;
      if (this.size === 0) this.finished();
    }
  }

  finished() {
    this.finishing = false;
    this.port.postMessage({ type: 'finished', played: this.played });
  }

  process(_inputs, outputs) {
    const output = outputs[0];
    const channel = output[0];
    if (!this.playing && (this.size >= this.jitter || (this.ending && this.size > 0))) {
      this.playing = true;
      this.port.postMessage({ type: 'started', time: currentTime, played: this.played });
    }
    let n = 0;
    if (this.playing) {
      n = Math.min(channel.length, this.size);
      for (let i = 0; i < n; i++) {
        channel[i] = this.ring[this.read];
        this.read = (this.read + 1) % this.ring.length;
      }
      this.size -= n;
      this.played += n;
      if (this.size === 0) {
        this.playing = false;
        this.port.postMessage({ type: 'drained', played: this.played });
        if (this.finishing) this.finished();
      }
    }
    for (let i = n; i < channel.length; i++) channel[i] = 0;
    for (let c = 1; c < output.length; c++) output[c].set(channel);
    if (currentTime - this.lastReport > 0.1) {
      this.lastReport = currentTime;
      this.port.postMessage({ type: 'played', played: this.played, queued: this.size, dropped: this.dropped });
    }
    return true;
  }
}

registerProcessor('sonora-playback', Playback);
