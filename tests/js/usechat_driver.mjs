// Drives the useChat page (tests/js/usechat/app.jsx) in Debian's headless Chromium for
// tests/test_usechat_browser.py. It bundles the page with esbuild, serves it from its
// own loopback port (another origin than the gateway), launches the browser, then
// answers one JSON command per stdin line with one JSON line on stdout:
//
//   {"op":"newPage","gateway":"<url>","key":"<key>"} a fresh browser context for a test
//   {"op":"open","chat":"<id>","model":"<model>"}  load the page for that chat
//   {"op":"eval","expr":"<js expression>"}         its value, evaluated in the page
//   {"op":"wait","expr":"<js expression>"}         until it is truthy (page.waitForFunction)
//   {"op":"send","text":"..."}                     type into the input and press Send
//   {"op":"responses"}                             the gateway responses the page got so far
//   {"op":"reload"}, {"op":"screenshot","path":"..."}, {"op":"close"}
//
// Every answer is {"ok":true,"value":...} or {"ok":false,"error":"..."}; page errors and
// console errors collected so far come with each answer.
//
//   node usechat_driver.mjs '<json: chromium>'
import http from 'node:http';
import readline from 'node:readline';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as esbuild from 'esbuild';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const opts = JSON.parse(process.argv[2] ?? '{}');
const ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
  '--disable-component-update', '--disable-sync'];

const HTML = `<!doctype html><html><head><meta charset="utf-8"><title>useChat</title>
<style>body{font:15px sans-serif;margin:20px;max-width:900px}.msg{margin:6px 0}
.error{color:#b00}#messages{list-style:none;padding:0}</style></head>
<body><div id="root"></div><script src="/app.js"></script></body></html>`;

async function bundle() {
  const result = await esbuild.build({
    entryPoints: [path.join(here, 'usechat', 'app.jsx')],
    bundle: true, write: false, format: 'iife', platform: 'browser', target: 'chrome120',
    jsx: 'automatic', define: { 'process.env.NODE_ENV': '"production"' }, minify: false,
    logLevel: 'silent',
  });
  return result.outputFiles[0].text;
}

function serve(js) {
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, 'http://x');
    if (url.pathname === '/') {
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' }).end(HTML);
    } else if (url.pathname === '/app.js') {
      res.writeHead(200, { 'content-type': 'text/javascript; charset=utf-8' }).end(js);
    } else {
      res.writeHead(404).end();
    }
  });
  return new Promise(resolve => server.listen(0, '127.0.0.1', () => resolve(server)));
}

const out = obj => process.stdout.write(JSON.stringify(obj) + '\n');

async function main() {
  const js = await bundle();
  const server = await serve(js);
  const origin = `http://127.0.0.1:${server.address().port}`;
  const browser = await chromium.launch({ executablePath: opts.chromium, args: ARGS, headless: true });
  // One fresh context (no cookies, storage or cache) per page: per test.
  let context = null;
  let page = null;
  let gateway = null;
  let key = null;
  let chat = null;
  let model = null;
  let pageErrors = [];
  let consoleErrors = [];
  let responses = []; // every gateway response the page got (and every failed request)

  const newPage = async cmd => {
    if (context) await context.close();
    gateway = cmd.gateway;
    key = cmd.key;
    pageErrors = [];
    consoleErrors = [];
    responses = [];
    context = await browser.newContext({ viewport: { width: 1000, height: 700 } });
    page = await context.newPage();
    page.setDefaultTimeout(opts.timeoutMs ?? 20000);
    page.on('pageerror', err => pageErrors.push(String(err)));
    page.on('console', msg => { if (msg.type() === 'error') consoleErrors.push(msg.text()); });
    page.on('response', r => {
      if (!r.url().startsWith(gateway)) return;
      const req = r.request();
      if (req.method() === 'OPTIONS') return;
      let body = null;
      try { body = req.method() === 'POST' ? req.postDataJSON() : null; } catch { /* not JSON */ }
      responses.push({ method: req.method(), path: new URL(r.url()).pathname, status: r.status(),
        errorCode: r.headers()['x-turngate-error-code'] ?? null,
        trigger: body?.trigger ?? null, messageId: body?.messageId ?? null });
    });
    page.on('requestfailed', req => {
      if (req.url().startsWith(gateway)) {
        responses.push({ method: req.method(), path: new URL(req.url()).pathname, status: null,
          failure: req.failure()?.errorText ?? null, trigger: null, messageId: null });
      }
    });
  };

  const mounted = () => page.waitForFunction(
    () => document.body.dataset.mounted === 'true' && document.querySelector('#status') !== null);

  const ops = {
    newPage,
    open: async cmd => {
      chat = cmd.chat;
      model = cmd.model;
      const q = new URLSearchParams({ gw: gateway, key, chat, model });
      await page.goto(`${origin}/?${q}`);
      await mounted();
      return origin;
    },
    reload: async () => { await page.reload(); await mounted(); },
    eval: async cmd => page.evaluate(cmd.expr),
    wait: async cmd => {
      await page.waitForFunction(cmd.expr, undefined, { timeout: cmd.timeoutMs, polling: 'raf' });
      return true;
    },
    send: async cmd => { await page.fill('#input', cmd.text); await page.click('#send'); },
    responses: async () => responses,
    screenshot: async cmd => { await page.screenshot({ path: cmd.path }); },
  };

  const rl = readline.createInterface({ input: process.stdin });
  out({ ok: true, value: origin, ready: true });
  for await (const line of rl) {
    if (!line.trim()) continue;
    const cmd = JSON.parse(line);
    if (cmd.op === 'close') break;
    try {
      const value = await ops[cmd.op](cmd);
      out({ ok: true, value: value ?? null, pageErrors, consoleErrors });
    } catch (err) {
      out({ ok: false, error: String(err?.stack ?? err), pageErrors, consoleErrors });
    }
  }
  await browser.close();
  server.close();
}

main().catch(err => {
  out({ ok: false, fatal: true, error: String(err?.stack ?? err) });
  process.exitCode = 1;
});
