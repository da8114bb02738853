// Runs gateway/static/markdown.js in headless Chromium on a list of inputs and prints
// what each renders to (innerHTML), and whether anything ran. Used by tests/test_markdown.py.
//
//   node markdown_cases.mjs '<json: chromium, script, cases: [markdown, ...]>'
import { chromium } from 'playwright-core';

const opts = JSON.parse(process.argv[2] ?? '{}');

async function main() {
  const browser = await chromium.launch({ executablePath: opts.chromium, args: ['--headless', '--no-sandbox', '--disable-gpu'], headless: true });
  try {
    const page = await browser.newPage();
    const dialogs = [];
    const errors = [];
    page.on('dialog', d => { dialogs.push(d.message()); d.dismiss().catch(() => {}); });
    page.on('pageerror', e => errors.push(String(e)));
    page.on('console', m => { if (m.type() === 'error') errors.push(m.text()); });
    await page.setContent('<!doctype html><div id="out"></div>');
    await page.addScriptTag({ path: opts.script });
    const html = await page.evaluate(cases => cases.map(text => {
      const out = document.getElementById('out');
      window.turngateMarkdown.render(text, out);
      return out.innerHTML;
    }), opts.cases);
    // Give anything that would run (onerror, onload) its chance.
    await page.evaluate(() => new Promise(r => setTimeout(r, 100)));
    return { html, dialogs, errors };
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
