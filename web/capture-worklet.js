// Microphone capture: resamples the context's audio to 16 kHz mono and
// posts 20 ms frames of signed 16-bit PCM, each with its RMS level.
const TARGET_RATE = 16000;
const FRAME = 320; // 20 ms at 16 kHz

class Capture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = sampleRate / TARGET_RATE; // input samples per output sample
    this.pos = 0; // fractional read position into the pending input
    this.pending = new Float32Array(0);
    this.smooth = 0; // one-pole low-pass state, used when decimating
    this.alpha = this.step > 1 ? Math.min(1, 1.2 / this.step) : 1;
    this.frame = new Int16Array(FRAME);
    this.filled = 0;
    this.energy = 0;
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0) return true;
    const channel = input[0];
    let samples;
    if (this.step === 1) {
      samples = channel;
    } else {
      // Low-pass, then linear interpolation at the 16 kHz positions.
      const filtered = new Float32Array(this.pending.length + channel.length);
      filtered.set(this.pending);
      for (let i = 0; i < channel.length; i++) {
        this.smooth += this.alpha * (channel[i] - this.smooth);
        filtered[this.pending.length + i] = this.smooth;
      }
      const out = [];
      while (this.pos + 1 < filtered.length) {
        const i = Math.floor(this.pos);
        const f = this.pos - i;
        out.push(filtered[i] * (1 - f) + filtered[i + 1] * f);
        this.pos += this.step;
      }
      const keep = Math.floor(this.pos);
      this.pending = filtered.slice(keep);
      this.pos -= keep;
      samples = out;
    }
    for (let i = 0; i < samples.length; i++) {
      const s = Math.max(-1, Math.min(1, samples[i]));
      this.energy += s * s;
      this.frame[this.filled++] = s < 0 ? s * 0x8000 : s * 0x7fff;
      if (this.filled === FRAME) {
        const rms = Math.sqrt(this.energy / FRAME);
        const buffer = this.frame.buffer;
        this.port.postMessage({ pcm: buffer, rms }, [buffer]);
        this.frame = new Int16Array(FRAME);
        this.filled = 0;
        this.energy = 0;
      }
    }
    return true;
  }
}

registerProcessor('sonora-capture', Capture);
