// The chat page's features in headless Chromium (playwright-core), against a real
// gateway: Markdown, hostile HTML, copy, regenerate, rename, the model picker, a failed
// reply after reload, images by button and paste, Escape to stop, rejected sends,
// layout at 360 and 1280 px, dark mode, delete. Prints one JSON object that
// tests/test_browser_page.py checks against the database.
//
//   node browser_page.mjs '<json options: url, key, chromium, artifacts, db, markdown, hostile>'
import { chromium } from 'playwright-core';

const opts = JSON.parse(process.argv[2] ?? '{}');
const ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
  '--disable-component-update', '--disable-sync'];
const shot = name => `${opts.artifacts}/page-${name}-${opts.db}.png`;
// A 2x2 PNG.
const PNG = Buffer.from('iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGP8z8DAwMDAxMDAwMDAAAANHQEDasKb6QAAAABJRU5ErkJggg==', 'base64');

async function idle(page) {
  await page.waitForFunction(() => document.body.dataset.state === 'idle');
}

const ended = page => page.evaluate(() => Number(document.body.dataset.turnsEnded ?? 0));

// Wait until `n` more turns (sent, regenerated, stopped or refused) have ended and show as stored.
async function turnsEnded(page, before, n = 1) {
  await page.waitForFunction(([b, k]) => Number(document.body.dataset.turnsEnded ?? 0) >= b + k, [before, n]);
  await idle(page);
}

async function send(page, text, model) {
  if (model !== undefined) await page.fill('#model', model);
  await page.fill('#input', text);
  const before = await ended(page);
  await page.press('#input', 'Enter');
  await turnsEnded(page, before);
}

const lastReply = page => page.evaluate(() => {
  const replies = document.querySelectorAll('.msg.assistant');
  const reply = replies[replies.length - 1];
  if (!reply) return null;
  return {
    id: reply.dataset.messageId, status: reply.dataset.status,
    raw: Array.from(reply.querySelectorAll('.text.md')).map(n => n.dataset.raw).join(''),
    text: reply.querySelector('.body').textContent,
    meta: reply.querySelector('.meta').textContent,
    model: reply.querySelector('.meta .model-name')?.textContent ?? null,
    cost: reply.querySelector('.meta .cost')?.textContent ?? null,
    when: reply.querySelector('.meta time')?.getAttribute('datetime') ?? null,
    error: reply.querySelector('.error')?.textContent ?? null,
  };
});

// Inside the replies: what elements exist, and every link's target.
const replyDom = page => page.evaluate(() => {
  const out = { tags: {}, links: [], hostile: [] };
  for (const node of document.querySelectorAll('#messages *')) {
    out.tags[node.tagName.toLowerCase()] = (out.tags[node.tagName.toLowerCase()] ?? 0) + 1;
    for (const attr of node.getAttributeNames()) {
      if (/^on/i.test(attr)) out.hostile.push(`${node.tagName} ${attr}`);
    }
  }
  for (const a of document.querySelectorAll('#messages a')) {
    out.links.push({ href: a.getAttribute('href'), rel: a.rel, target: a.target, text: a.textContent });
  }
  return out;
});

async function overflow(page) {
  return page.evaluate(() => {
    const width = document.documentElement.clientWidth;
    const wide = [];
    for (const node of document.querySelectorAll('main *')) {
      const r = node.getBoundingClientRect();
      if (r.width === 0 || node.closest('.table-wrap, .code-block pre, #threads')) continue;
      if (r.right > width + 1 || r.left < -1) wide.push(`${node.tagName}.${node.className} ${Math.round(r.left)}..${Math.round(r.right)}`);
    }
    const input = document.querySelector('#input').getBoundingClientRect();
    const sendBtn = document.querySelector('#send').getBoundingClientRect();
    const sidebar = document.querySelector('#sidebar').getBoundingClientRect();
    return {
      width, scrollWidth: document.documentElement.scrollWidth, bodyScroll: document.body.scrollWidth,
      wide: wide.slice(0, 10), inputWidth: Math.round(input.width), sendVisible: sendBtn.right <= width && sendBtn.width > 0,
      sidebarRight: Math.round(sidebar.right),
    };
  });
}

async function main() {
  const browser = await chromium.launch({ executablePath: opts.chromium, args: ARGS, headless: true });
  const result = { dialogs: [], consoleErrors: [], pageErrors: [], badResponses: [] };
  try {
    const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: opts.url });
    // Anything hostile that ran would leave its mark here (on every load).
    await context.addInitScript(() => { window.__xss = []; });
    const page = await context.newPage();
    page.setDefaultTimeout(20000);
    page.on('dialog', dialog => { result.dialogs.push(dialog.message()); dialog.dismiss().catch(() => {}); });
    page.on('console', msg => { if (msg.type() === 'error') result.consoleErrors.push(msg.text()); });
    page.on('pageerror', err => result.pageErrors.push(String(err)));
    result.foreignRequests = [];
    page.on('request', r => {
      const url = r.url();
      if (!url.startsWith(opts.url) && !url.startsWith('data:')) result.foreignRequests.push(url);
    });
    page.on('response', r => { if (r.status() >= 400) result.badResponses.push(`${r.status()} ${r.url()}`); });
    await page.goto(`${opts.url}/#key=${encodeURIComponent(opts.key)}`);
    await idle(page);

    // -- Markdown, verbatim from the scripted adapter, rendered while it streams --
    await page.fill('#model', 'scripted:chunk=9,delay_ms=50');
    await page.fill('#input', opts.markdown);
    const beforeMarkdown = await ended(page);
    await page.press('#input', 'Enter');
    await page.waitForSelector('.msg.assistant .md h2');
    result.headingWhileStreaming = await page.evaluate(() => document.body.dataset.state);
    result.titleWhileStreaming = await page.textContent('#thread-title');
    await turnsEnded(page, beforeMarkdown);
    result.markdown = await page.evaluate(() => {
      const md = document.querySelector('.msg.assistant .md');
      const q = sel => Array.from(md.querySelectorAll(sel)).map(n => n.textContent);
      return {
        h2: q('h2'), h3: q('h3'), li: q('ul > li'), ol: q('ol > li'), th: q('th'), td: q('td'),
        strong: q('strong'), em: q('em'), code: q('p code, li code'), pre: q('.code-block code'),
        lang: q('.code-lang'), copyButtons: md.querySelectorAll('.code-block .copy-code').length,
        links: Array.from(md.querySelectorAll('a')).map(a => ({ href: a.getAttribute('href'), rel: a.rel, target: a.target })),
        literal: md.textContent.includes('**') || md.textContent.includes('```'),
      };
    });
    result.markdownReply = await lastReply(page);
    result.threadId = await page.evaluate(() => localStorage.getItem('turngate.thread'));
    await page.screenshot({ path: shot('markdown') });

    // -- copy: the reply's Markdown source, and one code block --
    await page.click('.msg.assistant .copy-reply');
    await page.waitForSelector('.msg.assistant .copy-reply:text("Copied")');
    result.copiedReply = await page.evaluate(() => navigator.clipboard.readText());
    await page.click('.msg.assistant .copy-code');
    await page.waitForSelector('.msg.assistant .copy-code:text("Copied")');
    result.copiedCode = await page.evaluate(() => navigator.clipboard.readText());

    // -- hostile HTML and links: shown as text, nothing runs --
    await send(page, opts.hostile);
    await page.waitForTimeout(0);
    result.hostileReply = await lastReply(page);
    result.hostileDom = await replyDom(page);
    result.xss = await page.evaluate(() => window.__xss);

    // -- regenerate the last reply with another model --
    result.beforeRegenerate = await lastReply(page);
    await page.fill('#model', 'scripted:tokens=3');
    const regenerateButtons = await page.locator('.msg.assistant .regenerate:visible').count();
    result.regenerateButtons = regenerateButtons;
    const beforeRegenerate = await ended(page);
    await page.click('.msg.assistant:last-of-type .regenerate');
    await turnsEnded(page, beforeRegenerate);
    result.afterRegenerate = await lastReply(page);
    result.repliesAfterRegenerate = await page.locator('.msg.assistant').count();

    // -- rename --
    await page.click('#rename-thread');
    await page.fill('#rename-input', 'Markdown and friends');
    await page.press('#rename-input', 'Enter');
    await page.waitForFunction(() => document.querySelector('#threads button.active')?.textContent === 'Markdown and friends');
    result.renamedTitle = await page.textContent('#thread-title');

    // -- after a reload: stored replies render the same, hostile ones still inert --
    await send(page, opts.hostile, 'scripted:chunk=50');
    await page.reload();
    await idle(page);
    result.reloadedDom = await replyDom(page);
    result.reloadedTitle = await page.textContent('#thread-title');
    result.reloadedH2 = await page.locator('.msg.assistant .md h2').count();

    // -- the model picker: the listed presets; pick the failing one --
    result.modelOptions = await page.evaluate(() => Array.from(document.querySelectorAll('#model-list option')).map(o => o.value));
    const failing = result.modelOptions.find(m => m.includes('fail_after'));
    await send(page, 'please fail', failing);
    result.failedLive = await lastReply(page);
    await page.reload();
    await idle(page);
    result.failedAfterReload = await lastReply(page);
    result.failedInView = await page.evaluate(() => {
      const error = document.querySelectorAll('.msg.assistant .error');
      const r = error[error.length - 1].getBoundingClientRect();
      const box = document.querySelector('#messages').getBoundingClientRect();
      return r.bottom <= box.bottom + 1 && r.top >= box.top - 1;
    });
    await page.screenshot({ path: shot('failed') });

    // -- images: the button, then paste; wrong type and too large are refused --
    await page.fill('#model', 'scripted');
    await page.setInputFiles('#file-input', { name: 'dot.png', mimeType: 'image/png', buffer: PNG });
    await page.waitForSelector('#attachments .attachment img');
    await send(page, 'an image by button');
    result.buttonImage = await page.evaluate(() => {
      const users = document.querySelectorAll('.msg.user');
      return users[users.length - 1].querySelector('img')?.src ?? null;
    });
    const paste = (name, type, size) => page.evaluate(([n, t, s, b64]) => {
      const bytes = s ? new Uint8Array(s) : Uint8Array.from(atob(b64), c => c.charCodeAt(0));
      const data = new DataTransfer();
      data.items.add(new File([bytes], n, { type: t }));
      document.querySelector('#input').dispatchEvent(new ClipboardEvent('paste', { clipboardData: data, bubbles: true, cancelable: true }));
    }, [name, type, size, PNG.toString('base64')]);
    await paste('notes.txt', 'text/plain', 10);
    await page.waitForSelector('#banner:not([hidden])');
    result.wrongTypeBanner = await page.textContent('#banner');
    await paste('huge.png', 'image/png', 8388608 + 1);
    await page.waitForFunction(() => document.querySelector('#banner').textContent.includes('huge.png'));
    result.tooLargeBanner = await page.textContent('#banner');
    result.refusedAttached = await page.locator('#attachments .attachment').count();
    // drag-and-drop attaches too; an attachment can be removed before sending
    await page.evaluate(b64 => {
      const data = new DataTransfer();
      data.items.add(new File([Uint8Array.from(atob(b64), c => c.charCodeAt(0))], 'dropped.png', { type: 'image/png' }));
      document.querySelector('main').dispatchEvent(new DragEvent('drop', { dataTransfer: data, bubbles: true, cancelable: true }));
    }, PNG.toString('base64'));
    await page.waitForSelector('#attachments .attachment img[alt="dropped.png"]');
    result.dropped = await page.locator('#attachments .attachment').count();
    await page.click('#attachments .attachment .remove');
    await page.waitForSelector('#attachments', { state: 'hidden' });
    await paste('pasted.png', 'image/png', 0);
    await page.waitForSelector('#attachments .attachment img');
    await send(page, 'an image by paste');
    result.pasteImage = await page.evaluate(() => {
      const users = document.querySelectorAll('.msg.user');
      return users[users.length - 1].querySelector('img')?.src ?? null;
    });

    // -- Escape stops a running reply --
    await page.fill('#model', 'scripted:tokens=300,delay_ms=40');
    await page.fill('#input', 'a long one');
    const beforeStop = await ended(page);
    await page.press('#input', 'Enter');
    await page.waitForFunction(() => (document.querySelector('.msg.assistant[data-status="streaming"] .text')?.dataset.raw.length ?? 0) > 10);
    await page.keyboard.press('Escape');
    await turnsEnded(page, beforeStop);
    result.stopped = await lastReply(page);
    result.titleAfterStop = await page.textContent('#thread-title');

    // -- a rejected send keeps the text and shows why; nothing appears as sent --
    const usersBefore = await page.locator('.msg.user').count();
    await page.fill('#model', 'nosuch:model');
    await page.fill('#input', 'keep this text');
    await send(page, 'keep this text');
    result.rejected = {
      banner: await page.textContent('#banner'), input: await page.inputValue('#input'),
      usersBefore, usersAfter: await page.locator('.msg.user').count(),
    };
    // the same in a new chat: no chat is left behind for it
    await page.click('#new-thread');
    await send(page, 'keep this too');
    await page.waitForFunction(n => document.querySelectorAll('#threads button').length === n, 1);
    result.rejectedNew = {
      input: await page.inputValue('#input'), threads: await page.locator('#threads button').count(),
      users: await page.locator('.msg.user').count(), title: await page.textContent('#thread-title'),
    };
    await page.click('#threads button');
    await page.waitForSelector('.msg.assistant');
    await idle(page);

    // -- layout: 360 px (sidebar collapsed, composer usable) and 1280 px; dark mode --
    await page.fill('#model', 'scripted:chunk=40');
    await send(page, opts.wide);
    for (const [width, height] of [[360, 740], [1280, 800]]) {
      await page.setViewportSize({ width, height });
      // The sidebar slides out (a short transition) when the window becomes narrow.
      await page.waitForFunction(() => innerWidth > 760 || document.querySelector('#sidebar').getBoundingClientRect().right <= 0);
      await page.evaluate(() => { document.querySelector('#messages').scrollTop = 0; });
      result[`layout${width}`] = await overflow(page);
      await page.screenshot({ path: shot(`w${width}`) });
      await page.evaluate(() => { const m = document.querySelector('#messages'); m.scrollTop = m.scrollHeight; });
      await page.screenshot({ path: shot(`w${width}-end`) });
    }
    await page.setViewportSize({ width: 360, height: 740 });
    await page.click('#open-sidebar');
    await page.waitForFunction(() => document.querySelector('#sidebar').getBoundingClientRect().left >= 0);
    result.sidebarOpen = await overflow(page);
    await page.screenshot({ path: shot('w360-sidebar') });
    await page.keyboard.press('Escape');
    await page.waitForFunction(() => document.querySelector('#sidebar').getBoundingClientRect().right <= 0);
    // the scrim closes it too, and so does picking a chat
    await page.click('#open-sidebar');
    await page.waitForFunction(() => document.querySelector('#sidebar').getBoundingClientRect().left >= 0);
    await page.mouse.click(340, 400);
    await page.waitForFunction(() => document.querySelector('#sidebar').getBoundingClientRect().right <= 0);
    await page.click('#open-sidebar');
    await page.waitForFunction(() => document.querySelector('#sidebar').getBoundingClientRect().left >= 0);
    await page.click('#threads button');
    await page.waitForFunction(() => document.querySelector('#sidebar').getBoundingClientRect().right <= 0);
    await idle(page);
    result.sidebarClosedBy = 'escape, scrim, choice';
    await page.fill('#model', 'scripted');
    await page.fill('#input', 'typed at 360 px');
    const beforeNarrow = await ended(page);
    await page.click('#send');
    await turnsEnded(page, beforeNarrow);
    result.narrowSend = await lastReply(page);
    // an unpriced model says so instead of "$0"
    await send(page, 'who prices you', 'echo2');
    result.unpriced = await lastReply(page);
    // a text over the server's limit is refused before sending, and kept
    const long = 'y'.repeat(100001);
    await page.fill('#input', long);
    await page.press('#input', 'Enter');
    await page.waitForFunction(() => document.querySelector('#banner').textContent.includes('100001'));
    result.tooLong = { banner: await page.textContent('#banner'), kept: (await page.inputValue('#input')).length };
    await page.fill('#input', '');
    await page.emulateMedia({ colorScheme: 'dark' });
    result.darkBackground = await page.evaluate(() => getComputedStyle(document.body).backgroundColor);
    await page.screenshot({ path: shot('w360-dark') });
    await page.setViewportSize({ width: 1280, height: 800 });
    await page.screenshot({ path: shot('w1280-dark') });
    await page.emulateMedia({ colorScheme: 'light' });
    result.lightBackground = await page.evaluate(() => getComputedStyle(document.body).backgroundColor);

    // -- keyboard focus is visible --
    await page.focus('#input');
    await page.keyboard.press('Shift+Tab');
    result.focusOutline = await page.evaluate(() => {
      const node = document.activeElement;
      const style = getComputedStyle(node);
      return { id: node.id, outline: style.outlineStyle, width: style.outlineWidth };
    });
    await page.fill('#input', 'line one');
    await page.press('#input', 'Shift+Enter');
    await page.keyboard.type('line two');
    result.shiftEnter = await page.inputValue('#input');
    await page.fill('#input', '');

    // -- delete a chat while its reply runs --
    await page.click('#new-thread');
    await page.fill('#model', 'scripted:tokens=1000,delay_ms=30');
    await page.fill('#input', 'delete me while you talk');
    const beforeDelete = await ended(page);
    await page.press('#input', 'Enter');
    await page.waitForFunction(() => (document.querySelector('.msg.assistant .text')?.dataset.raw.length ?? 0) > 10);
    result.deletedThread = await page.evaluate(() => localStorage.getItem('turngate.thread'));
    await page.click('#delete-thread');
    await page.click('#delete-thread');
    await turnsEnded(page, beforeDelete);
    await page.waitForFunction(id => !document.querySelector(`#threads button[data-thread-id="${id}"]`), result.deletedThread);
    result.afterDelete = {
      title: await page.textContent('#thread-title'), threads: await page.locator('#threads button').count(),
      messages: await page.locator('.msg').count(),
    };

    // -- favicon, bad key --
    const icon = await page.request.get(`${opts.url}/favicon.ico`);
    result.favicon = { status: icon.status(), type: icon.headers()['content-type'] };
    const other = await context.newPage();
    await other.goto(`${opts.url}/#key=not-a-real-key`);
    await other.waitForSelector('#key-form:not([hidden])');
    result.badKeyBanner = await other.textContent('#banner');
    result.xssFinal = await page.evaluate(() => window.__xss);
    return result;
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
