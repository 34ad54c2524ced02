// What the browser runs share: Debian's Chromium (with a fake microphone
// playing a WAV, when one is given), a record of every script the page
// loaded and every page error, and a snapshot of what the page shows and of
// the facts its test hook (`window.sonora.facts()`) reports.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

export async function openPage(wav) {
  const profile = mkdtempSync(join(tmpdir(), 'sonora-chromium-'));
  const microphone = wav ? ['--use-fake-device-for-media-stream', `--use-file-for-fake-audio-capture=${wav}`] : [];
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: [
      '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--disable-quic',
      ...microphone, '--use-fake-ui-for-media-stream', '--autoplay-policy=no-user-gesture-required',
    ],
    viewport: { width: 1100, height: 820 },
    locale: 'es-ES',
  });
  const page = context.pages()[0] ?? await context.newPage();
  const log = [];
  const pageErrors = [];
  const scripts = [];
  page.on('console', (m) => log.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => pageErrors.push(e.message));
  page.on('requestfailed', (r) => pageErrors.push(`request failed: ${r.url()} ${r.failure()?.errorText}`));
  page.on('response', (r) => {
    const path = new URL(r.url()).pathname;
    if (path.endsWith('.js')) scripts.push({ path, status: r.status(), type: r.headers()['content-type'] ?? null });
  });
  const close = async () => {
    await context.close();
    rmSync(profile, { recursive: true, force: true });
  };
  return { page, log, pageErrors, scripts, close };
}

/** What the page shows, and what its test hook reports. */
export function snapshot(page) {
  return page.evaluate(() => {
    const lines = [...document.querySelectorAll('[data-testid="transcript"] li')].map((li) => ({
      role: li.dataset.role,
      kind: li.dataset.kind ?? null,
      stage: li.dataset.stage ?? null,
      cut: li.classList.contains('cut'),
      mark: li.querySelector('.mark')?.textContent ?? null,
      who: li.firstChild.textContent,
      text: li.lastChild.textContent,
    }));
    return {
      ...window.sonora.facts(),
      hook: Object.keys(window.sonora),
      hookFrozen: Object.isFrozen(window.sonora),
      transcript: lines,
      metrics: document.querySelector('[data-testid="metrics"]').innerText,
      latencyShown: document.querySelector('[data-testid="latency"]').textContent,
      rotationsShown: document.querySelector('[data-testid="rotations"]').textContent,
      status: document.getElementById('status').textContent,
      talkLabel: document.querySelector('[data-testid="talk"]').textContent.trim(),
    };
  });
}

/** Waits for the conversation to end and for everything it opened to be closed. */
export async function waitClosed(page, timeout) {
  await page.waitForFunction(() => {
    const f = window.sonora.facts();
    const closed = (state) => state === null || state === 'closed';
    return f.end != null && !f.running && f.audio.player === 'closed' && closed(f.audio.capture)
      && f.audio.tracks !== 'live' && f.audio.recorder !== 'recording';
  }, null, { timeout, polling: 100 });
}

/**
 * Runs one browser check: opens the page (a fake microphone playing `wav`
 * when given), runs `body(page)`, and prints one JSON line: the page's final
 * snapshot with what `body` returned, or the failure with the page's log.
 * Exits 0 on success, 1 on failure.
 */
export async function runCheck(wav, screenshot, body) {
  const { page, log, pageErrors, scripts, close } = await openPage(wav);
  let code = 0;
  try {
    const extra = await body(page);
    console.log(JSON.stringify({ ...await snapshot(page), ...extra, scripts, pageErrors }));
  } catch (error) {
    code = 1;
    await page.screenshot({ path: screenshot, fullPage: true }).catch(() => {});
    const state = await snapshot(page).catch((e) => ({ snapshot: String(e) }));
    console.log(JSON.stringify({ failure: String(error), ...state, scripts, pageErrors, log }));
  } finally {
    await close();
  }
  process.exit(code);
}
