// Microphone capture: resamples the context's audio to 16 kHz mono and
// posts 20 ms frames of signed 16-bit PCM, each frame's ArrayBuffer
// transferred to the page, which transfers it back when it has sent it.
// `process()` allocates nothing: frames come from a fixed pool, and when
// the page falls a whole pool behind, frames are dropped and counted.
const TARGET_RATE = 16000;
const FRAME_SAMPLES = 320; // 20 ms at 16 kHz
const POOL_FRAMES = 50; // 1 s of audio in flight to the page

class Capture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = sampleRate / TARGET_RATE; // input samples per output sample
    // One-pole low-pass before decimating, so that decimation does not alias.
    this.alpha = this.step > 1 ? Math.min(1, 1.2 / this.step) : 1;
    this.smooth = 0;
    this.previous = 0; // the last filtered input sample
    this.position = 1; // where the next output falls, in input samples after `previous`
    this.free = new Array(POOL_FRAMES);
    for (let i = 0; i < POOL_FRAMES; i++) this.free[i] = new Int16Array(FRAME_SAMPLES);
    this.freeCount = POOL_FRAMES - 1;
    this.frame = this.free[POOL_FRAMES - 1];
    this.free[POOL_FRAMES - 1] = null;
    this.filled = 0;
    this.dropped = 0;
    this.reported = 0;
    this.transfer = [null];
    this.port.onmessage = (event) => this.recycle(event.data);
  }

  // A frame's buffer back from the page (outside `process()`).
  recycle(buffer) {
    if (!(buffer instanceof ArrayBuffer) || buffer.byteLength !== FRAME_SAMPLES * 2) return;
    if (this.freeCount === POOL_FRAMES) return;
    this.free[this.freeCount++] = new Int16Array(buffer);
    if (this.dropped !== this.reported) {
      this.reported = this.dropped;
      this.port.postMessage({ dropped: this.dropped });
    }
  }

  process(inputs) {
    const input = inputs[0];
    if (input === undefined || input.length === 0) return true;
    const channel = input[0];
    if (this.step === 1) {
      for (let i = 0; i < channel.length; i++) this.put(channel[i]);
      return true;
    }
    // Low-pass, then linear interpolation at the 16 kHz positions.
    for (let i = 0; i < channel.length; i++) {
      this.smooth += this.alpha * (channel[i] - this.smooth);
      const current = this.smooth;
      while (this.position <= 1) {
        this.put(this.previous + (current - this.previous) * this.position);
        this.position += this.step;
      }
      this.position -= 1;
      this.previous = current;
    }
    return true;
  }

  put(sample) {
    const s = sample < -1 ? -1 : sample > 1 ? 1 : sample;
    if (this.frame !== null) this.frame[this.filled] = s < 0 ? s * 0x8000 : s * 0x7fff;
    this.filled += 1;
    if (this.filled < FRAME_SAMPLES) return;
    this.filled = 0;
    if (this.frame === null) {
      this.dropped += 1;
    } else {
      this.transfer[0] = this.frame.buffer;
      this.port.postMessage(this.transfer[0], this.transfer);
      this.transfer[0] = null;
    }
    // A new frame starts only at a frame boundary, so none is ever half old.
    if (this.freeCount > 0) {
      this.freeCount -= 1;
      this.frame = this.free[this.freeCount];
      this.free[this.freeCount] = null;
    } else {
      this.frame = null;
    }
  }
}

registerProcessor('sonora-capture', Capture);
