// A new chat's title in the page (headless Chromium, playwright-core): the first words
// while the first reply streams, then the title model's title, without a reload.
// Printed as one JSON object for tests/test_titles.py.
//
//   node browser_title.mjs '<json options: url, key, chromium, text, model, expected>'
import { chromium } from 'playwright-core';

const opts = JSON.parse(process.argv[2] ?? '{}');
const ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
  '--disable-component-update', '--disable-sync'];

async function main() {
  const browser = await chromium.launch({ executablePath: opts.chromium, args: ARGS, headless: true });
  const result = { pageErrors: [], requests: [] };
  try {
    const page = await browser.newPage();
    page.setDefaultTimeout(20000);
    page.on('pageerror', err => result.pageErrors.push(String(err)));
    page.on('request', r => { if (r.url().includes('/v1/threads')) result.requests.push(`${r.method()} ${new URL(r.url()).pathname}`); });
    await page.goto(`${opts.url}/#key=${encodeURIComponent(opts.key)}`);
    await page.waitForFunction(() => document.body.dataset.state === 'idle');
    await page.fill('#model', opts.model);
    await page.fill('#input', opts.text);
    await page.press('#input', 'Enter');
    await page.waitForSelector('.msg.assistant');
    result.titleWhileStreaming = await page.textContent('#thread-title');
    await page.waitForFunction(() => Number(document.body.dataset.turnsEnded ?? 0) >= 1);
    const expected = opts.expected;
    await page.waitForFunction(
      want => document.querySelector('#thread-title').textContent === want, expected);
    result.titleLater = await page.textContent('#thread-title');
    result.sidebar = await page.textContent('#threads button[aria-current="page"]');
    result.threadId = await page.evaluate(() => localStorage.getItem('turngate.thread'));
  } finally {
    await browser.close();
  }
  return result;
}

main().then(
  out => console.log(JSON.stringify(out)),
  err => { console.log(JSON.stringify({ fatal: String(err?.stack ?? err) })); process.exitCode = 1; },
);
