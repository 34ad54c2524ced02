// Drives Debian's Chromium through a typed conversation whose connection is
// cut in the middle of the reply (the test cuts a TCP proxy between the page
// and the gateway): the page must show that it is reconnecting, come back by
// itself, and end up with the whole reply received once and each transcript
// line once; then the talk button ends the conversation as usual.
// Usage: node resume.mjs URL QUESTION SCREENSHOT.png
// Prints one JSON line with what the page showed; exits 1 on failure.
import { runCheck, waitClosed } from './page.mjs';

const [url, question, screenshot] = process.argv.slice(2);
if (!url || !question || !screenshot) {
  console.error('usage: node resume.mjs URL QUESTION SCREENSHOT.png');
  process.exit(2);
}

await runCheck(null, screenshot, async (page) => {
  await page.goto(`${url}/`);
  // The reconnecting state may last a quarter of a second: watch for it.
  await page.evaluate(() => {
    window.seenWhileAway = null;
    new MutationObserver(() => {
      if (window.sonora.facts().reconnecting && !window.seenWhileAway) {
        window.seenWhileAway = document.getElementById('status').textContent;
      }
    }).observe(document.getElementById('status'), { childList: true, characterData: true, subtree: true });
  });
  await page.getByLabel('Escribe un mensaje').fill(question);
  await page.getByLabel('Escribe un mensaje').press('Enter');
  await page.waitForFunction(() => {
    const f = window.sonora.facts();
    const answered = document.querySelector('[data-testid="transcript"] li[data-role="assistant"][data-stage="final"]');
    return f.resumes >= 1 && answered && f.receivedSamples >= 48000 && f.playedSamples > 0;
  }, null, { timeout: 30000, polling: 50 });
  // Anything sent twice would arrive now.
  await page.waitForTimeout(500);
  const during = await page.evaluate(() => window.sonora.facts().audio);
  const afterResume = await page.evaluate(() => ({
    seenWhileAway: window.seenWhileAway,
    statusAfter: document.getElementById('status').textContent,
    received: window.sonora.facts().receivedSamples,
  }));
  await page.screenshot({ path: screenshot, fullPage: true });
  await page.getByTestId('talk').click();
  await waitClosed(page, 30000);
  return { during, ...afterResume };
});
