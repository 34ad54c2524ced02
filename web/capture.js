// Microphone capture, in one of two forms: an AudioWorklet posting 20 ms
// frames of 16 kHz PCM (capture-worklet.js), or a MediaRecorder writing Opus
// in WebM (Chrome) or Ogg (Firefox). Both report the input level, which
// dates the end of the user's speech for the latency measurement. A capture
// owns its stream: `stop` ends the tracks and closes what it opened.

export const PCM_RATE_HZ = 16000;
const FRAME_MS = 20;
const BLOB_MS = 100;
const METER_EVERY_MS = 20;
const RECORDER_TYPES = [['audio/webm;codecs=opus', 'webm'], ['audio/ogg;codecs=opus', 'ogg']];

export function workletsAvailable() {
  return typeof AudioWorkletNode !== 'undefined';
}

/** The first Opus container this browser's MediaRecorder writes, as `{ mime, format }`, or null. */
export function pickRecorderType() {
  if (typeof MediaRecorder === 'undefined') return null;
  for (const [mime, format] of RECORDER_TYPES) {
    if (MediaRecorder.isTypeSupported(mime)) return { mime, format };
  }
  return null;
}

export async function openMicrophone() {
  if (!navigator.mediaDevices?.getUserMedia) {
    throw Object.assign(new Error('no getUserMedia'), { name: 'NotSupportedError' });
  }
  return navigator.mediaDevices.getUserMedia({
    audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
  });
}

function stopTracks(stream) {
  for (const track of stream.getTracks()) track.stop();
}

function tracksState(stream) {
  return stream.getTracks().some((track) => track.readyState === 'live') ? 'live' : 'ended';
}

function rms16(pcm) {
  let sum = 0;
  for (let i = 0; i < pcm.length; i++) sum += pcm[i] * pcm[i];
  return Math.sqrt(sum / pcm.length) / 32768;
}

/**
 * PCM capture. `onAudio(bytes, ms)` gets each frame's ArrayBuffer and must
 * send or copy it before returning: the buffer goes back to the worklet's
 * pool right after. `onLevel(rms)` gets each frame's level (0 to 1).
 */
export async function startWorkletCapture(stream, { onAudio, onLevel }) {
  let context;
  try { context = new AudioContext({ sampleRate: PCM_RATE_HZ }); } catch { context = new AudioContext(); }
  let source;
  try {
    source = context.createMediaStreamSource(stream);
  } catch {
    // Firefox will not connect a stream to a context at another rate.
    await context.close();
    context = new AudioContext();
    source = context.createMediaStreamSource(stream);
  }
  let node;
  try {
    await context.audioWorklet.addModule('/capture-worklet.js');
    node = new AudioWorkletNode(context, 'sonora-capture', { numberOfInputs: 1, numberOfOutputs: 0, channelCount: 1 });
  } catch (error) {
    source.disconnect();
    await context.close();
    throw error;
  }
  let droppedFrames = 0;
  node.port.onmessage = ({ data }) => {
    if (data instanceof ArrayBuffer) {
      onLevel(rms16(new Int16Array(data)));
      onAudio(data, FRAME_MS);
      node.port.postMessage(data, [data]);
    } else if (typeof data?.dropped === 'number') {
      droppedFrames = data.dropped;
    }
  };
  source.connect(node);
  await context.resume();
  let stopped = false;
  return {
    stop() {
      if (stopped) return;
      stopped = true;
      source.disconnect();
      node.port.onmessage = null;
      node.port.close();
      stopTracks(stream);
      context.close().catch(() => { /* already closed */ });
    },
    /** PCM has no header: a re-attached conversation goes on with the same stream. */
    restart() {},
    facts: () => ({ context: context.state, tracks: tracksState(stream), recorder: null, droppedFrames }),
  };
}

/**
 * Opus capture at `kbps`: `onAudio(bytes, ms)` gets each blob's bytes in
 * order (the first holds the container header); a level meter runs beside
 * the recorder for `onLevel(rms)`.
 */
export async function startRecorderCapture(stream, type, kbps, { onAudio, onLevel }) {
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
    onLevel(Math.sqrt(sum / frame.length));
  }, METER_EVERY_MS);
  // Each recorder writes a stream of its own, header first; blobs of one
  // that was replaced are dropped.
  let recorder;
  let generation = 0;
  let chain = Promise.resolve();
  const record = () => {
    const mine = ++generation;
    const next = new MediaRecorder(stream, { mimeType: type.mime, audioBitsPerSecond: kbps * 1000 });
    next.ondataavailable = (event) => {
      if (!event.data || event.data.size === 0) return;
      // Blobs are read in order, so the container stays contiguous.
      chain = chain.then(() => event.data.arrayBuffer())
        .then((bytes) => { if (mine === generation) onAudio(bytes, BLOB_MS); });
    };
    next.start(BLOB_MS);
    return next;
  };
  try {
    recorder = record();
  } catch (error) {
    clearInterval(meter);
    source.disconnect();
    await context.close();
    throw error;
  }
  let stopped = false;
  return {
    stop() {
      if (stopped) return;
      stopped = true;
      clearInterval(meter);
      if (recorder.state !== 'inactive') recorder.stop();
      source.disconnect();
      stopTracks(stream);
      context.close().catch(() => { /* already closed */ });
    },
    /** A new stream, header first (the server starts a new decoder for a re-attached conversation). */
    restart() {
      if (stopped) return;
      const old = recorder;
      recorder = record();
      if (old.state !== 'inactive') old.stop();
    },
    facts: () => ({ context: context.state, tracks: tracksState(stream), recorder: recorder.state, droppedFrames: 0 }),
  };
}
