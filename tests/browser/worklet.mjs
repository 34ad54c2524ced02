// Runs web/capture-worklet.js outside a browser, with the worklet scope's
// globals stood in for, and reports what it posted: at 48, 44.1 and 16 kHz,
// a 1 kHz tone in 128-sample render quanta, each posted frame handed back
// as the page does; then at 48 kHz with nothing handed back, so that the
// pool runs dry and frames are dropped and counted. Typed arrays and arrays
// constructed inside `process()` are counted.
// Usage: node worklet.mjs PATH/TO/capture-worklet.js
// Prints one JSON line.
import { pathToFileURL } from 'node:url';

const [worklet] = process.argv.slice(2);
const QUANTUM = 128;
const TONE_HZ = 1000;
const AMPLITUDE = 0.5;

let inProcess = false;
const allocations = {};
for (const name of ['Array', 'ArrayBuffer', 'Float32Array', 'Float64Array', 'Int16Array']) {
  const Real = globalThis[name];
  allocations[name] = 0;
  globalThis[name] = new Proxy(Real, {
    construct(target, args, newTarget) {
      if (inProcess) allocations[name] += 1;
      return Reflect.construct(target, args, newTarget === globalThis[name] ? target : newTarget);
    },
  });
}

let Processor = null;
globalThis.registerProcessor = (name, processor) => { Processor = processor; };
globalThis.AudioWorkletProcessor = class {
  constructor() {
    const port = {
      onmessage: null,
      posted: [],
      postMessage(message) { port.posted.push(message); },
      // The page's reply: the frame's buffer, back to the pool.
      reply(data) { port.onmessage?.({ data }); },
    };
    this.port = port;
  }
};
globalThis.sampleRate = 48000;
await import(pathToFileURL(worklet).href);

function run(rate, seconds, handBack) {
  globalThis.sampleRate = rate;
  const processor = new Processor();
  const port = processor.port;
  const frames = [];
  const buffers = new Set();
  const reports = [];
  const quantum = new Float32Array(QUANTUM);
  const total = Math.floor(rate * seconds / QUANTUM) * QUANTUM;
  for (let start = 0; start < total; start += QUANTUM) {
    for (let i = 0; i < QUANTUM; i++) quantum[i] = AMPLITUDE * Math.sin(2 * Math.PI * TONE_HZ * (start + i) / rate);
    inProcess = true;
    processor.process([[quantum]], [], {});
    inProcess = false;
    for (const message of port.posted.splice(0)) {
      if (message instanceof ArrayBuffer) {
        buffers.add(message);
        frames.push(Array.from(new Int16Array(message)));
        if (handBack) port.reply(message);
      } else {
        reports.push(message);
      }
    }
  }
  // Hand one frame back at the end: the worklet then reports its drops.
  if (!handBack && buffers.size > 0) {
    port.reply(buffers.values().next().value);
    reports.push(...port.posted.splice(0));
  }
  const samples = frames.flat();
  let crossings = 0;
  for (let i = 1; i < samples.length; i++) if ((samples[i - 1] < 0) !== (samples[i] < 0)) crossings += 1;
  const rms = Math.sqrt(samples.reduce((sum, s) => sum + s * s, 0) / Math.max(1, samples.length)) / 32768;
  return {
    rate,
    inputSamples: total,
    frames: frames.length,
    frameSamples: frames[0]?.length ?? 0,
    distinctBuffers: buffers.size,
    crossingsPerSecond: crossings / (samples.length / 16000),
    rms,
    reports,
  };
}

const runs = [run(48000, 2, true), run(44100, 2, true), run(16000, 2, true), run(48000, 2, false)];
console.log(JSON.stringify({ runs, allocations }));
