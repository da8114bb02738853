// A real browser (Debian's headless Chromium, driven by playwright-core) on the
// chat page: send, watch tokens arrive, Stop mid-reply, reload, find the partial
// reply as stored. Run by tests/test_browser.py; prints one JSON object.
//
//   node browser_chat.mjs '<json options: url, key, chromium, screenshot, text, model>'
import { chromium } from 'playwright-core';

const opts = JSON.parse(process.argv[2] ?? '{}');
const ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
  '--disable-component-update', '--disable-sync'];

const assistantText = page => page.evaluate(() => {
  const replies = document.querySelectorAll('.msg.assistant');
  const last = replies[replies.length - 1];
  return last ? Array.from(last.querySelectorAll('.text')).map(n => n.dataset.raw ?? n.textContent).join('') : '';
});

async function main() {
  const browser = await chromium.launch({ executablePath: opts.chromium, args: ARGS, headless: true });
  const pageErrors = [];
  try {
    const context = await browser.newContext({ viewport: { width: 1180, height: 760 } });
    const page = await context.newPage();
    page.on('pageerror', err => pageErrors.push(String(err)));
    page.setDefaultTimeout(15000);

    await page.goto(`${opts.url}/#key=${encodeURIComponent(opts.key)}`);
    await page.waitForSelector('#input');
    await page.waitForFunction(() => !location.hash.includes('key='));
    const urlAfterLoad = page.url();
    const storedKey = await page.evaluate(() => localStorage.getItem('turngate.key'));

    await page.fill('#model', opts.model);
    await page.fill('#input', opts.text);
    await page.click('#send');

    // Tokens arrive: the reply grows while it streams.
    await page.waitForSelector('#stop:not([hidden])');
    await page.waitForFunction(() => {
      const t = document.querySelector('.msg.assistant .text');
      return t && t.dataset.raw.length >= 6;
    });
    const seen = [await assistantText(page)];
    await page.waitForFunction(
      n => (document.querySelector('.msg.assistant .text')?.dataset.raw.length ?? 0) > n,
      seen[0].length,
    );
    seen.push(await assistantText(page));
    const reasoningShown = await page.locator('.msg.assistant .reasoning').count();
    const toolsShown = await page.locator('.msg.assistant .tool').count();

    await page.click('#stop');
    await page.waitForSelector('.msg.assistant[data-status="cancelled"]');
    await page.waitForSelector('#stop', { state: 'hidden' });
    const textAtStop = await assistantText(page);
    await page.waitForTimeout(700); // let the page show the stored row, as reload will
    await page.screenshot({ path: opts.screenshot.replace(/\.png$/, '-stopped.png') });

    await page.reload();
    await page.waitForSelector('.msg.assistant[data-status="cancelled"]');
    const afterReload = await page.evaluate(() => {
      const reply = document.querySelector('.msg.assistant');
      return {
        status: reply.dataset.status,
        messageId: reply.dataset.messageId,
        text: Array.from(reply.querySelectorAll('.text')).map(n => n.dataset.raw).join(''),
        meta: reply.querySelector('.meta').textContent,
        tokens: reply.querySelector('.meta .tokens')?.textContent ?? null,
        cost: reply.querySelector('.meta .cost')?.textContent ?? null,
        reasoning: reply.querySelector('.reasoning .body')?.textContent ?? null,
        tools: reply.querySelectorAll('.tool').length,
        user: document.querySelector('.msg.user .user-text')?.textContent ?? null,
        threads: Array.from(document.querySelectorAll('#threads button')).map(b => b.textContent),
        activeThread: document.querySelector('#threads button.active')?.dataset.threadId ?? null,
        url: location.href,
      };
    });
    await page.screenshot({ path: opts.screenshot });

    // A bad key: the page says so in words and asks for a key.
    const other = await context.newPage();
    await other.goto(`${opts.url}/#key=not-a-real-key`);
    await other.waitForSelector('#key-form:not([hidden])');
    const badKeyBanner = await other.textContent('#banner');

    return {
      urlAfterLoad, storedKey, seen, reasoningShown, toolsShown, textAtStop, afterReload,
      badKeyBanner, pageErrors,
    };
  } finally {
    await browser.close();
  }
}

main().then(
  result => { process.stdout.write(JSON.stringify(result) + '\n'); },
  error => {
    process.stdout.write(JSON.stringify({ fatal: String(error?.stack ?? error) }) + '\n');
    process.exitCode = 1;
  },
);
