// A tool call waiting for approval in the page (headless Chromium, playwright-core):
// the paused reply shows Approve / Deny; a click POSTs .../continue with the answer and
// the continued stream fills the same message. Then a reload shows the stored reply.
// Printed as one JSON object for tests/test_browser_page.py.
//
//   node browser_approval.mjs '<json options: url, key, chromium, model, text, approve,
//                               artifacts, db>'
import { chromium } from 'playwright-core';

const opts = JSON.parse(process.argv[2] ?? '{}');
const ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
  '--disable-component-update', '--disable-sync'];

const turnsEnded = n => page => page.waitForFunction(
  want => Number(document.body.dataset.turnsEnded ?? 0) >= want && document.body.dataset.state === 'idle', n);

function replies(page) {
  return page.$$eval('.msg.assistant', nodes => nodes.map(n => ({
    id: n.dataset.messageId ?? null,
    status: n.dataset.status,
    tools: Array.from(n.querySelectorAll('.tool')).map(t => ({
      name: t.querySelector('.name')?.textContent,
      state: t.querySelector('.state')?.textContent,
      result: t.querySelector('.result')?.hidden ? null : t.querySelector('.result')?.textContent,
      buttons: Array.from(t.querySelectorAll('.approval button')).map(b => ({
        text: b.textContent, label: b.getAttribute('aria-label'), disabled: b.disabled })),
    })),
    text: Array.from(n.querySelectorAll('.text.md')).map(t => t.textContent).join('\n'),
    badge: n.querySelector('.meta .badge')?.textContent ?? null,
  })));
}

async function main() {
  const browser = await chromium.launch({ executablePath: opts.chromium, args: ARGS, headless: true });
  const result = { pageErrors: [], continues: [] };
  try {
    const page = await browser.newPage();
    page.setDefaultTimeout(20000);
    page.on('pageerror', err => result.pageErrors.push(String(err)));
    page.on('request', r => {
      if (r.url().endsWith('/continue')) {
        result.continues.push({ method: r.method(), path: new URL(r.url()).pathname, body: r.postDataJSON() });
      }
    });
    await page.goto(`${opts.url}/#key=${encodeURIComponent(opts.key)}`);
    await page.waitForFunction(() => document.body.dataset.state === 'idle');
    await page.fill('#model', opts.model);
    await page.fill('#input', opts.text);
    await page.press('#input', 'Enter');
    await turnsEnded(1)(page);
    await page.waitForSelector('.tool .approval .approve:not([disabled])');
    result.paused = await replies(page);
    result.threadId = await page.evaluate(() => localStorage.getItem('turngate.thread'));
    await page.screenshot({ path: `${opts.artifacts}/page-approval-${opts.db}.png` });

    // Watch the paused reply's node: the continued stream must fill it, no second reply.
    await page.evaluate(() => {
      const root = Array.from(document.querySelectorAll('.msg.assistant')).pop();
      const seen = { maxReplies: 0, continuedText: '', continuedStatus: '' };
      window.__seen = seen;
      new MutationObserver(() => {
        seen.maxReplies = Math.max(seen.maxReplies, document.querySelectorAll('.msg.assistant').length);
        if (root.isConnected) {
          seen.continuedText = root.textContent;
          seen.continuedStatus = root.dataset.status;
        }
      }).observe(document.querySelector('#messages'),
        { subtree: true, childList: true, characterData: true, attributes: true });
    });
    await page.click(opts.approve ? '.tool .approval .approve' : '.tool .approval .deny');
    await turnsEnded(2)(page);
    result.seen = await page.evaluate(() => window.__seen);
    result.after = await replies(page);
    await page.screenshot({ path: `${opts.artifacts}/page-${opts.approve ? 'approved' : 'denied'}-${opts.db}.png` });

    await page.reload();
    await page.waitForFunction(() => document.body.dataset.state === 'idle');
    result.reloaded = await replies(page);
  } finally {
    await browser.close();
  }
  return result;
}

main().then(
  out => console.log(JSON.stringify(out)),
  err => { console.log(JSON.stringify({ fatal: String(err?.stack ?? err) })); process.exitCode = 1; },
);
