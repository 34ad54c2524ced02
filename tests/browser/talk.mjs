// Drives Debian's Chromium through one spoken conversation with a running
// Sonora gateway: a fake microphone plays WAV, the page's talk button is
// pressed, and the run ends once an answer was heard, shown and played, and,
// after the talk button is pressed again, once the conversation has ended
// and closed its audio contexts, streams and recorder.
// Usage: node talk.mjs URL QUESTION.wav worklet|recorder SCREENSHOT.png
// Prints one JSON line with what the page showed; exits 1 on failure.
import { runCheck, snapshot, waitClosed } from './page.mjs';

const [url, wav, mode, screenshot] = process.argv.slice(2);
if (!url || !wav || !['worklet', 'recorder'].includes(mode) || !screenshot) {
  console.error('usage: node talk.mjs URL QUESTION.wav worklet|recorder SCREENSHOT.png');
  process.exit(2);
}

await runCheck(wav, screenshot, async (page) => {
  await page.goto(`${url}/${mode === 'recorder' ? '?capture=recorder' : ''}`);
  await page.getByTestId('talk').click();
  await page.waitForFunction(() => {
    const f = window.sonora.facts();
    const finals = [...document.querySelectorAll('[data-testid="transcript"] li[data-stage="final"]')];
    const heard = finals.some((li) => li.dataset.role === 'user');
    const answered = finals.some((li) => li.dataset.role === 'assistant');
    const played = f.playbackRate != null && f.playedSamples > f.playbackRate * 0.5;
    const shown = document.querySelector('[data-testid="latency"]').textContent !== '—';
    return heard && answered && played && f.latenciesMs.length > 0 && shown;
  }, null, { timeout: 120000, polling: 100 });
  const during = await page.evaluate(() => window.sonora.facts().audio);
  await page.screenshot({ path: screenshot, fullPage: true });
  await page.getByTestId('talk').click();
  await waitClosed(page, 60000);
  return { during };
});
