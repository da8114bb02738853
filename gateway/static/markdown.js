// A small, safe Markdown renderer for the chat page: no HTML string is ever parsed.
// Every node is made with createElement/createTextNode, so raw HTML in a reply is
// shown as text; links are kept only for http(s) and mailto and open with
// rel="noopener noreferrer". Re-rendering the whole text on each delta is fine for
// chat-sized replies and keeps unfinished constructs (an open code fence) stable.
//
// Blocks: paragraphs, ATX headings, fenced code (``` / ~~~, with a copy button),
// bullet and ordered lists (nested by indentation), block quotes, tables, rules.
// Inline: `code`, **strong**, *em*, _em_, ~~del~~, [text](url), <url>, bare URLs,
// backslash escapes.
'use strict';

(() => {
  const SAFE_URL = /^(https?:\/\/|mailto:)/i;

  function safeUrl(raw) {
    const url = raw.trim();
    if (!SAFE_URL.test(url) || /[\u0000-\u001f\s]/.test(url)) return null;
    try {
      const parsed = new URL(url);
      if (!['http:', 'https:', 'mailto:'].includes(parsed.protocol)) return null;
    } catch (_) { return null; }
    return url;
  }

  function h(tag, className) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    return node;
  }

  function link(url, parent) {
    const a = h('a');
    a.href = url;
    a.target = '_blank';
    a.rel = 'noopener noreferrer';
    parent.append(a);
    return a;
  }

  const PUNCT = '!"#$%&\'()*+,-./:;<=>?@[\\]^_`{|}~';

  // ---- inline ----
  function inline(text, parent) {
    let buf = '';
    const flush = () => { if (buf) { parent.append(document.createTextNode(buf)); buf = ''; } };
    let i = 0;
    while (i < text.length) {
      const c = text[i];
      if (c === '\\' && i + 1 < text.length && PUNCT.includes(text[i + 1])) {
        buf += text[i + 1]; i += 2; continue;
      }
      if (c === '`') {
        let n = 0;
        while (text[i + n] === '`') n++;
        const fence = '`'.repeat(n);
        const end = text.indexOf(fence, i + n);
        if (end > 0) {
          flush();
          const code = h('code');
          let body = text.slice(i + n, end);
          if (/^ .* $/.test(body) && body.trim()) body = body.slice(1, -1);
          code.textContent = body;
          parent.append(code);
          i = end + n; continue;
        }
        buf += fence; i += n; continue;
      }
      if (c === '[') {
        const close = matchBracket(text, i);
        if (close > 0 && text[close + 1] === '(') {
          const paren = text.indexOf(')', close + 2);
          if (paren > 0) {
            const label = text.slice(i + 1, close);
            const target = text.slice(close + 2, paren).trim().split(/\s+/)[0] ?? '';
            const url = safeUrl(target.replace(/^<|>$/g, ''));
            if (url) {
              flush();
              inline(label, link(url, parent));
              i = paren + 1; continue;
            }
            // An unsafe or odd target: show the whole thing as text.
            buf += text.slice(i, paren + 1); i = paren + 1; continue;
          }
        }
      }
      if (c === '<') {
        const m = /^<((?:https?:\/\/|mailto:)[^\s<>]+)>/i.exec(text.slice(i));
        const url = m && safeUrl(m[1]);
        if (url) { flush(); link(url, parent).textContent = url; i += m[0].length; continue; }
      }
      if ((c === 'h' || c === 'H') && (i === 0 || /[\s(]/.test(text[i - 1]))) {
        const m = /^https?:\/\/[^\s<>]+/i.exec(text.slice(i));
        if (m) {
          let raw = m[0];
          while (/[.,;:!?'")\]]$/.test(raw)) raw = raw.slice(0, -1);
          const url = safeUrl(raw);
          if (url) { flush(); link(url, parent).textContent = url; i += raw.length; continue; }
        }
      }
      if (c === '~' && text[i + 1] === '~') {
        const end = text.indexOf('~~', i + 2);
        if (end > i + 2) { flush(); inline(text.slice(i + 2, end), parent.appendChild(h('del'))); i = end + 2; continue; }
      }
      if (c === '*' || c === '_') {
        const double = text[i + 1] === c;
        const mark = double ? c + c : c;
        const prev = i > 0 ? text[i - 1] : ' ';
        const next = text[i + mark.length] ?? ' ';
        const opens = !/\s/.test(next) && (c === '*' || !/[A-Za-z0-9]/.test(prev));
        if (opens) {
          const end = findClose(text, i + mark.length, mark, c);
          if (end > 0) {
            flush();
            inline(text.slice(i + mark.length, end), parent.appendChild(h(double ? 'strong' : 'em')));
            i = end + mark.length; continue;
          }
        }
        buf += mark; i += mark.length; continue;
      }
      buf += c; i++;
    }
    flush();
  }

  function matchBracket(text, open) {
    let depth = 0;
    for (let j = open; j < text.length; j++) {
      if (text[j] === '\\') { j++; continue; }
      if (text[j] === '[') depth++;
      else if (text[j] === ']' && --depth === 0) return j;
    }
    return -1;
  }

  function findClose(text, from, mark, c) {
    for (let j = from; j < text.length; j++) {
      if (text[j] === '\\') { j++; continue; }
      if (text[j] === '`') {
        const end = text.indexOf('`', j + 1);
        if (end > 0) { j = end; continue; }
      }
      if (text.startsWith(mark, j) && j > from && !/\s/.test(text[j - 1])) {
        if (mark.length === 1 && text[j + 1] === c) { j++; continue; }
        const after = text[j + mark.length] ?? ' ';
        if (c === '_' && /[A-Za-z0-9]/.test(after)) continue;
        return j;
      }
    }
    return -1;
  }

  // ---- blocks ----
  const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)/;
  const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
  const ITEM = /^( *)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const QUOTE = /^ {0,3}>\s?(.*)$/;
  const TABLE_SEP = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;

  function cells(line) {
    let s = line.trim();
    if (s.startsWith('|')) s = s.slice(1);
    if (s.endsWith('|') && !s.endsWith('\\|')) s = s.slice(0, -1);
    const out = [];
    let cur = '';
    for (let j = 0; j < s.length; j++) {
      if (s[j] === '\\' && s[j + 1] === '|') { cur += '|'; j++; continue; }
      if (s[j] === '|') { out.push(cur.trim()); cur = ''; continue; }
      cur += s[j];
    }
    out.push(cur.trim());
    return out;
  }

  function startsBlock(line, next) {
    return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || ITEM.test(line)
      || QUOTE.test(line) || (line.includes('|') && next !== undefined && TABLE_SEP.test(next) && next.includes('-'));
  }

  function codeBlock(lang, body, parent) {
    const box = h('div', 'code-block');
    const head = h('div', 'code-head');
    const label = h('span', 'code-lang');
    label.textContent = lang || 'code';
    const copy = h('button', 'copy-code');
    copy.type = 'button';
    copy.textContent = 'Copy';
    copy.setAttribute('aria-label', 'Copy code');
    head.append(label, copy);
    const pre = h('pre');
    const code = h('code');
    code.textContent = body;
    pre.append(code);
    box.append(head, pre);
    parent.append(box);
  }

  function blocks(lines, parent) {
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      if (!line.trim()) { i++; continue; }
      let m;
      if ((m = FENCE.exec(line))) {
        const fence = m[1];
        const body = [];
        i++;
        while (i < lines.length && !new RegExp(`^ {0,3}${fence[0]}{${fence.length},}\\s*$`).test(lines[i])) {
          body.push(lines[i]); i++;
        }
        i++; // the closing fence (or the end: an unfinished block while streaming)
        codeBlock(m[2], body.join('\n'), parent);
        continue;
      }
      if ((m = HEADING.exec(line))) {
        const node = h(`h${m[1].length}`);
        inline(m[2], node);
        parent.append(node);
        i++; continue;
      }
      if (RULE.test(line)) { parent.append(h('hr')); i++; continue; }
      if (QUOTE.test(line)) {
        const inner = [];
        while (i < lines.length && lines[i].trim() && (m = QUOTE.exec(lines[i]))) { inner.push(m[1]); i++; }
        const quote = h('blockquote');
        blocks(inner, quote);
        parent.append(quote);
        continue;
      }
      if ((m = ITEM.exec(line))) {
        i = list(lines, i, parent);
        continue;
      }
      if (line.includes('|') && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1]) && lines[i + 1].includes('-')) {
        const head = cells(line);
        const align = cells(lines[i + 1]).map(c => (c.startsWith(':') && c.endsWith(':') ? 'center'
          : c.endsWith(':') ? 'right' : c.startsWith(':') ? 'left' : ''));
        const wrap = h('div', 'table-wrap');
        const table = h('table');
        const thead = h('thead');
        const tr = h('tr');
        head.forEach((c, k) => {
          const th = h('th');
          if (align[k]) th.style.textAlign = align[k];
          inline(c, th); tr.append(th);
        });
        thead.append(tr);
        const tbody = h('tbody');
        i += 2;
        while (i < lines.length && lines[i].trim() && lines[i].includes('|')) {
          const row = h('tr');
          const values = cells(lines[i]);
          head.forEach((_, k) => {
            const td = h('td');
            if (align[k]) td.style.textAlign = align[k];
            inline(values[k] ?? '', td); row.append(td);
          });
          tbody.append(row);
          i++;
        }
        table.append(thead, tbody);
        wrap.append(table);
        parent.append(wrap);
        continue;
      }
      const para = [];
      while (i < lines.length && lines[i].trim() && (para.length === 0 || !startsBlock(lines[i], lines[i + 1]))) {
        para.push(lines[i].trim()); i++;
      }
      const p = h('p');
      para.forEach((text, k) => {
        if (k) p.append(h('br'));
        inline(text, p);
      });
      parent.append(p);
    }
  }

  function list(lines, i, parent) {
    const first = ITEM.exec(lines[i]);
    const indent = first[1].length;
    const ordered = /\d/.test(first[2]);
    const node = h(ordered ? 'ol' : 'ul');
    if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
    while (i < lines.length) {
      const m = ITEM.exec(lines[i]);
      if (!m || m[1].length !== indent || /\d/.test(m[2]) !== ordered) break;
      const content = [m[3]];
      const inner = indent + m[2].length + 1;
      i++;
      while (i < lines.length) {
        const line = lines[i];
        if (!line.trim()) {
          const next = lines[i + 1];
          if (next !== undefined && next.trim() && /^ */.exec(next)[0].length > indent) { content.push(''); i++; continue; }
          break;
        }
        const lead = /^ */.exec(line)[0].length;
        if (lead > indent) { content.push(line.slice(Math.min(lead, inner))); i++; continue; }
        if (ITEM.test(line) || startsBlock(line, lines[i + 1])) break;
        content.push(line.trim()); i++; // a lazy continuation line
      }
      const li = h('li');
      if (content.length === 1) inline(content[0], li);
      else blocks(content, li);
      // A tight item: unwrap its first paragraph.
      if (li.firstChild && li.firstChild.tagName === 'P' && !content.includes('')) {
        const p = li.firstChild;
        while (p.firstChild) li.insertBefore(p.firstChild, p);
        p.remove();
      }
      node.append(li);
      while (i < lines.length && !lines[i].trim() && lines[i + 1] !== undefined && ITEM.test(lines[i + 1])
        && ITEM.exec(lines[i + 1])[1].length === indent) i++;
    }
    parent.append(node);
    return i;
  }

  function render(text, into) {
    const target = into ?? document.createDocumentFragment();
    target.textContent = '';
    blocks(String(text).replace(/\r\n?/g, '\n').split('\n'), target);
    return target;
  }

  window.turngateMarkdown = { render, safeUrl };
})();
