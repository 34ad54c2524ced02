// Drives Debian's Chromium through one typed conversation with a gateway
// whose engine asks the client for a tool and hands its upstream connection
// over: the page must show both (in Spanish, then in English after the
// language button), answer the tool call, play the reply, drop a second
// reply the engine says was interrupted and, once the talk button stops the
// conversation, close its AudioContext.
// Usage: node events.mjs URL QUESTION SCREENSHOT.png
// Prints one JSON line with what the page showed; exits 1 on failure.
import { runCheck, snapshot, waitClosed } from './page.mjs';

const [url, question, screenshot] = process.argv.slice(2);
if (!url || !question || !screenshot) {
  console.error('usage: node events.mjs URL QUESTION SCREENSHOT.png');
  process.exit(2);
}

const notes = (page) => page.evaluate(() => [...document.querySelectorAll('[data-testid="transcript"] li[data-role="note"]')]
  .map((li) => ({ kind: li.dataset.kind, who: li.firstChild.textContent, text: li.lastChild.textContent })));

await runCheck(null, screenshot, async (page) => {
  await page.goto(`${url}/`);
  await page.getByLabel('Escribe un mensaje').fill(question);
  await page.getByLabel('Escribe un mensaje').press('Enter');
  await page.waitForFunction(() => {
    const f = window.sonora.facts();
    const kinds = [...document.querySelectorAll('[data-testid="transcript"] li[data-role="note"]')].map((li) => li.dataset.kind);
    const answered = document.querySelector('[data-testid="transcript"] li[data-role="assistant"][data-stage="final"]');
    const shown = document.querySelector('[data-testid="rotations"]').textContent !== '—';
    const cut = document.querySelector('[data-testid="transcript"] li.cut');
    return kinds.includes('tool') && kinds.includes('rotated') && answered && shown && cut && f.playedSamples > 0;
  }, null, { timeout: 30000, polling: 100 });
  const spanish = { notes: await notes(page), talkLabel: (await snapshot(page)).talkLabel };
  const during = await page.evaluate(() => window.sonora.facts().audio);
  await page.getByRole('button', { name: 'English' }).click();
  const english = { notes: await notes(page), talkLabel: (await snapshot(page)).talkLabel };
  await page.screenshot({ path: screenshot, fullPage: true });
  await page.getByTestId('talk').click();
  await waitClosed(page, 30000);
  return { spanish, english, during };
});
