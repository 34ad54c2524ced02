// Drives Debian's Chromium through one spoken conversation with a running
// Sonora gateway: a fake microphone plays WAV, the page's talk button is
// pressed, and the run ends once an answer was heard, shown and played.
// Usage: node talk.mjs URL QUESTION.wav worklet|recorder SCREENSHOT.png
// Prints one JSON line with what the page showed; exits 1 on failure.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const [url, wav, mode, screenshot] = process.argv.slice(2);
if (!url || !wav || !['worklet', 'recorder'].includes(mode) || !screenshot) {
  console.error('usage: node talk.mjs URL QUESTION.wav worklet|recorder SCREENSHOT.png');
  process.exit(2);
}

const profile = mkdtempSync(join(tmpdir(), 'sonora-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: [
    '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--disable-quic',
    '--use-fake-device-for-media-stream', `--use-file-for-fake-audio-capture=${wav}`,
    '--use-fake-ui-for-media-stream', '--autoplay-policy=no-user-gesture-required',
  ],
  viewport: { width: 1100, height: 820 },
  locale: 'es-ES',
});
const page = context.pages()[0] ?? await context.newPage();
const log = [];
page.on('console', (m) => log.push(`${m.type()}: ${m.text()}`));
page.on('pageerror', (e) => log.push(`pageerror: ${e.message}`));

const snapshot = () => page.evaluate(() => {
  const s = window.sonora;
  const lines = [...document.querySelectorAll('[data-testid="transcript"] li')].map((li) => ({
    role: li.classList.contains('user') ? 'user' : 'assistant',
    stage: li.dataset.stage,
    text: li.lastChild.textContent,
  }));
  return {
    mode: s.mode,
    transcript: lines,
    playedSamples: s.playedSamples,
    receivedSamples: s.receivedSamples,
    playbackRate: s.player?.rate ?? null,
    latenciesMs: s.latencies,
    serverLatencyMs: s.serverLatencyMs,
    metrics: document.querySelector('[data-testid="metrics"]').innerText,
    latencyShown: document.querySelector('[data-testid="latency"]').textContent,
    status: document.getElementById('status').textContent,
    errors: s.errors,
    end: s.ended,
  };
});

let code = 0;
try {
  await page.goto(`${url}/${mode === 'recorder' ? '?capture=recorder' : ''}`);
  await page.getByTestId('talk').click();
  await page.waitForFunction(() => {
    const s = window.sonora;
    const finals = [...document.querySelectorAll('[data-testid="transcript"] li[data-stage="final"]')];
    const heard = finals.some((li) => li.classList.contains('user'));
    const answered = finals.some((li) => li.classList.contains('assistant'));
    const played = s.player && s.playedSamples > s.player.rate * 0.5;
    const shown = document.querySelector('[data-testid="latency"]').textContent !== '—';
    return heard && answered && played && s.latencies.length > 0 && shown;
  }, null, { timeout: 120000, polling: 100 });
  await page.screenshot({ path: screenshot, fullPage: true });
  await page.getByTestId('talk').click();
  await page.waitForFunction(() => window.sonora.ended != null, null, { timeout: 30000, polling: 100 });
  console.log(JSON.stringify(await snapshot()));
} catch (error) {
  code = 1;
  await page.screenshot({ path: screenshot, fullPage: true }).catch(() => {});
  const state = await snapshot().catch((e) => ({ snapshot: String(e) }));
  console.log(JSON.stringify({ failure: String(error), ...state, log }));
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
process.exit(code);
