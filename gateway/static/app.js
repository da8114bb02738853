// turngate chat page: plain JavaScript, no build step.
// Talks to the turn API (POST /v1/threads/{id}/turns) and parses its SSE stream
// (AI SDK UI message stream chunks) with fetch + ReadableStream.
'use strict';

(() => {
  const KEY_STORE = 'turngate.key';
  const THREAD_STORE = 'turngate.thread';
  const MODEL_STORE = 'turngate.model';
  const $ = sel => document.querySelector(sel);

  const els = {
    threads: $('#threads'), messages: $('#messages'), input: $('#input'), send: $('#send'),
    stop: $('#stop'), model: $('#model'), title: $('#thread-title'), banner: $('#banner'),
    keyForm: $('#key-form'), keyEntry: $('#key-entry'), keyInput: $('#key-input'),
    keyStatus: $('#key-status'), newThread: $('#new-thread'), composer: $('#composer'),
  };

  // ---- the key: from #key=... once, then localStorage; never left in the URL ----
  function takeKeyFromUrl() {
    const params = new URLSearchParams(location.hash.slice(1));
    const key = params.get('key');
    if (key) {
      localStorage.setItem(KEY_STORE, key);
      params.delete('key');
      const rest = params.toString();
      history.replaceState(null, '', location.pathname + location.search + (rest ? '#' + rest : ''));
    }
  }
  const apiKey = () => localStorage.getItem(KEY_STORE);

  // ---- errors in plain words ----
  class ApiProblem extends Error {
    constructor(message, status, code) { super(message); this.status = status; this.code = code; }
  }

  const PLAIN = {
    401: 'Your API key was not accepted. Open the link that `turngate serve` printed, or enter a key.',
    404: 'This conversation no longer exists, or it belongs to another key.',
    409: 'A reply is still being written in this conversation. Wait for it to finish, then try again.',
    413: 'That message is too large to send.',
    429: 'Too many requests in a short time. Wait a few seconds and try again.',
    503: 'The server cannot reach its database right now. Try again in a moment.',
  };

  async function problemFrom(response) {
    let code = '', detail = '';
    try {
      const body = await response.json();
      code = body?.error?.code ?? '';
      detail = body?.error?.message ?? '';
    } catch (_) { /* not JSON */ }
    if (response.status === 400 && detail) {
      return new ApiProblem(`The server did not accept the request: ${detail}.`, 400, code);
    }
    if (response.status === 503 && code === 'shutting_down') {
      return new ApiProblem('The server is restarting. Try again in a few seconds.', 503, code);
    }
    const words = PLAIN[response.status]
      ?? `The server answered with an error (${response.status}${detail ? ': ' + detail : ''}).`;
    return new ApiProblem(words, response.status, code);
  }

  function networkProblem() {
    return new ApiProblem('Could not reach the server. Check that turngate is running and try again.', 0, 'network');
  }

  async function api(path, options = {}) {
    const headers = { authorization: `Bearer ${apiKey()}`, ...(options.headers ?? {}) };
    if (options.json !== undefined) {
      headers['content-type'] = 'application/json';
      options = { ...options, body: JSON.stringify(options.json) };
    }
    let response;
    try {
      response = await fetch(path, { ...options, headers });
    } catch (err) {
      if (err?.name === 'AbortError') throw err;
      throw networkProblem();
    }
    if (response.status === 401) showKeyForm();
    if (!response.ok) throw await problemFrom(response);
    return response;
  }

  function showBanner(text) {
    els.banner.textContent = text;
    els.banner.hidden = !text;
  }

  function showKeyForm() {
    els.keyForm.hidden = false;
    els.keyStatus.textContent = 'No valid key';
  }

  // ---- formatting ----
  function formatCost(micros) {
    if (typeof micros !== 'number') return '';
    if (micros === 0) return '$0';
    const dollars = micros / 1e6;
    return '$' + (dollars >= 0.01 ? dollars.toFixed(4) : dollars.toFixed(6));
  }

  function usageText(usage) {
    if (!usage) return '';
    const total = usage.totalTokens ?? ((usage.inputTokens ?? 0) + (usage.outputTokens ?? 0));
    return `${total} tokens (${usage.inputTokens ?? 0} in, ${usage.outputTokens ?? 0} out)`
      + (usage.estimated ? ' · estimated' : '');
  }

  const STATUS_WORDS = {
    cancelled: ['stopped', 'Stopped'], interrupted: ['stopped', 'Interrupted'],
    error: ['failed', 'Failed'], streaming: ['', 'Writing…'],
  };

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function pretty(value) {
    if (typeof value === 'string') return value;
    try { return JSON.stringify(value, null, 2); } catch (_) { return String(value); }
  }

  // ---- one assistant reply on screen, fed by stored parts or by stream chunks ----
  class ReplyView {
    constructor(container) {
      this.root = el('div', 'msg assistant');
      this.root.dataset.status = 'streaming';
      this.body = el('div', 'body');
      this.meta = el('div', 'meta');
      this.root.append(this.body, this.meta);
      container.append(this.root);
      this.open = null; // {kind, id, node}
      this.tools = new Map();
      this.usage = null;
    }
    setMessageId(id) { if (id !== undefined) this.root.dataset.messageId = String(id); }
    textPart(kind) {
      if (kind === 'reasoning') {
        const details = el('details', 'reasoning');
        details.open = true;
        details.append(el('summary', '', 'Reasoning'));
        const body = el('div', 'body');
        details.append(body);
        this.body.append(details);
        return body;
      }
      const node = el('div', 'text');
      this.body.append(node);
      return node;
    }
    appendText(kind, id, delta) {
      if (!this.open || this.open.kind !== kind || this.open.id !== id) {
        this.open = { kind, id, node: this.textPart(kind) };
      }
      this.open.node.textContent += delta;
      this.open.node.classList.toggle('cursor', kind === 'text');
      this.scroll();
    }
    endText() {
      if (this.open) this.open.node.classList.remove('cursor');
      this.open = null;
    }
    tool(id, name) {
      let view = this.tools.get(id);
      if (!view) {
        this.endText();
        const box = el('div', 'tool');
        const head = el('div');
        head.append(el('span', 'name', `Tool: ${name}`));
        const state = el('span', 'state', 'calling…');
        head.append(state);
        const args = el('pre', 'args');
        const result = el('pre', 'result');
        result.hidden = true;
        box.append(head, args, result);
        this.body.append(box);
        view = { box, state, args, result, argsText: '' };
        this.tools.set(id, view);
      }
      return view;
    }
    toolArgs(id, delta) {
      const view = this.tool(id, '?');
      view.argsText += delta;
      view.args.textContent = view.argsText;
    }
    toolInput(id, name, input) {
      const view = this.tool(id, name);
      view.args.textContent = 'Input: ' + pretty(input);
      view.state.textContent = 'waiting for the result…';
    }
    toolOutput(id, output) {
      const view = this.tool(id, '?');
      view.result.hidden = false;
      view.result.textContent = 'Result: ' + pretty(output);
      view.state.textContent = 'done';
    }
    error(text) {
      this.endText();
      this.body.append(el('div', 'error', text));
    }
    finish(status, usage) {
      this.endText();
      for (const view of this.tools.values()) {
        if (view.result.hidden && status !== 'streaming') view.state.textContent = 'no result';
      }
      this.root.dataset.status = status;
      this.meta.textContent = '';
      const [badgeClass, words] = STATUS_WORDS[status] ?? ['', ''];
      if (words) this.meta.append(el('span', `badge ${badgeClass}`, words));
      if (usage) {
        this.meta.append(el('span', 'tokens', usageText(usage)));
        this.meta.append(el('span', 'cost', formatCost(usage.costMicros)));
      }
      if (!this.body.textContent.trim() && status === 'complete') {
        this.body.append(el('div', 'text muted', '(no text response)'));
      }
    }
    scroll() { els.messages.scrollTop = els.messages.scrollHeight; }

    // Stored content parts (docs/API.md, "Stored content parts").
    renderStored(row, usage) {
      this.setMessageId(row.id);
      (row.content ?? []).forEach((part, index) => {
        this.endText();
        if (part.type === 'text' && part.text) this.appendText('text', `s${index}`, part.text);
        else if (part.type === 'reasoning' && part.text) {
          this.appendText('reasoning', `s${index}`, part.text);
          this.open.node.parentElement.open = false;
        } else if (part.type === 'tool-call') {
          this.tool(part.toolCallId, part.toolName);
          this.toolInput(part.toolCallId, part.toolName, part.args ?? part.argsText ?? {});
          if ('result' in part) this.toolOutput(part.toolCallId, part.result);
        } else if (part.type === 'status') this.body.append(el('div', 'text muted', part.text));
      });
      if (row.status === 'error') this.error('The reply failed before it was complete.');
      this.finish(row.status, usage);
    }
  }

  function userView(content, container) {
    const root = el('div', 'msg user');
    for (const part of content) {
      if (part.type === 'text') root.append(document.createTextNode(part.text));
      else if (part.type === 'image') {
        const img = el('img');
        img.src = part.image;
        img.alt = 'attached image';
        root.append(img);
      }
    }
    container.append(root);
    return root;
  }

  // ---- SSE: fetch body → events → chunks ----
  async function* sseChunks(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    try {
      while (true) {
        const { done, value } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, '\n');
        let cut;
        while ((cut = buffer.indexOf('\n\n')) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const data = block.split('\n')
            .filter(line => line.startsWith('data:'))
            .map(line => line.slice(line.startsWith('data: ') ? 6 : 5))
            .join('\n');
          if (!data || data === '[DONE]') continue;
          yield JSON.parse(data);
        }
      }
    } finally {
      reader.releaseLock();
    }
  }

  // Feed one stream into a ReplyView; returns {status, usage}.
  async function streamInto(response, view, state) {
    let status = 'complete';
    let usage = null;
    for await (const chunk of sseChunks(response)) {
      switch (chunk.type) {
        case 'start':
          view.setMessageId(chunk.messageId);
          break;
        case 'text-delta': view.appendText('text', chunk.id, chunk.delta); break;
        case 'reasoning-delta': view.appendText('reasoning', chunk.id, chunk.delta); break;
        case 'text-end': case 'reasoning-end': view.endText(); break;
        case 'tool-input-start': view.tool(chunk.toolCallId, chunk.toolName); break;
        case 'tool-input-delta': view.toolArgs(chunk.toolCallId, chunk.inputTextDelta); break;
        case 'tool-input-available': view.toolInput(chunk.toolCallId, chunk.toolName, chunk.input); break;
        case 'tool-output-available': view.toolOutput(chunk.toolCallId, chunk.output); break;
        case 'tool-output-error': view.toolOutput(chunk.toolCallId, chunk.errorText); break;
        case 'message-metadata':
          usage = chunk.messageMetadata?.usage ?? usage;
          break;
        case 'error':
          status = 'error';
          view.error(`The model could not finish this reply: ${chunk.errorText}`);
          break;
        case 'abort':
          status = 'cancelled';
          break;
        case 'finish':
          usage = chunk.messageMetadata?.usage ?? usage;
          if (chunk.finishReason === 'error') status = 'error';
          else if (chunk.finishReason === 'other' && status !== 'error') status = 'cancelled';
          break;
        default: break;
      }
      if (state.stopped && status === 'complete') status = 'cancelled';
    }
    if (state.stopped && status === 'complete') status = 'cancelled';
    return { status, usage };
  }

  // ---- threads ----
  let currentThread = localStorage.getItem(THREAD_STORE);
  let active = null; // {threadId, turnId, controller, state}

  async function loadThreads() {
    const response = await api('/v1/threads?limit=100');
    const { threads } = await response.json();
    els.threads.textContent = '';
    for (const thread of threads) {
      const button = el('button', thread.id === currentThread ? 'active' : '',
        thread.title || 'Untitled chat');
      button.type = 'button';
      button.title = thread.title || thread.id;
      button.dataset.threadId = thread.id;
      button.addEventListener('click', () => openThread(thread.id, thread.title));
      els.threads.append(button);
    }
    const current = threads.find(t => t.id === currentThread);
    if (current) els.title.textContent = current.title || 'Untitled chat';
    return threads;
  }

  async function usageByMessage(threadId) {
    const map = new Map();
    try {
      const response = await api(`/v1/usage?thread_id=${encodeURIComponent(threadId)}&limit=200`);
      for (const row of (await response.json()).usage) {
        map.set(row.message_id, {
          inputTokens: row.prompt_tokens, outputTokens: row.completion_tokens,
          totalTokens: row.total_tokens, costMicros: row.cost_micros, estimated: row.estimated,
        });
      }
    } catch (_) { /* usage is a nicety; the conversation still shows */ }
    return map;
  }

  function emptyState() {
    els.messages.textContent = '';
    els.messages.append(el('div', 'empty', 'Send a message to start a conversation.'));
  }

  async function openThread(threadId, title) {
    if (active) return;
    currentThread = threadId;
    if (threadId) localStorage.setItem(THREAD_STORE, threadId);
    else localStorage.removeItem(THREAD_STORE);
    els.title.textContent = threadId ? (title || 'Untitled chat') : 'New chat';
    for (const b of els.threads.querySelectorAll('button')) {
      b.classList.toggle('active', b.dataset.threadId === threadId);
    }
    showBanner('');
    if (!threadId) { emptyState(); return; }
    let rows;
    try {
      const response = await api(`/v1/threads/${encodeURIComponent(threadId)}/messages`);
      rows = (await response.json()).messages;
    } catch (err) {
      if (err.status === 404) { await openThread(null); return; }
      showBanner(err.message);
      return;
    }
    const usage = await usageByMessage(threadId);
    els.messages.textContent = '';
    if (!rows.length) emptyState();
    let streaming = null;
    for (const row of rows) {
      if (row.role === 'user') userView(row.content, els.messages);
      else if (row.role === 'assistant') {
        if (row.status === 'streaming') { streaming = row; continue; }
        new ReplyView(els.messages).renderStored(row, usage.get(row.id));
      }
    }
    els.messages.scrollTop = els.messages.scrollHeight;
    if (streaming && streaming.turn_id) await follow(threadId, streaming.turn_id, null);
  }

  // ---- sending, following, stopping ----
  function setBusy(busy) {
    els.send.disabled = busy;
    els.stop.hidden = !busy;
  }

  function newId() {
    if (crypto.randomUUID) return crypto.randomUUID();
    return Array.from(crypto.getRandomValues(new Uint8Array(16)), b => b.toString(16).padStart(2, '0')).join('');
  }

  async function follow(threadId, turnId, request) {
    const controller = new AbortController();
    const state = { stopped: false };
    active = { threadId, turnId, controller, state };
    setBusy(true);
    const view = new ReplyView(els.messages);
    view.scroll();
    try {
      const response = request
        ? await api(`/v1/threads/${encodeURIComponent(threadId)}/turns`,
          { method: 'POST', json: request, signal: controller.signal })
        : await api(`/v1/threads/${encodeURIComponent(threadId)}/turns/${encodeURIComponent(turnId)}/stream`,
          { signal: controller.signal });
      if (response.status === 204) { view.root.remove(); return; }
      const { status, usage } = await streamInto(response, view, state);
      view.finish(status, usage);
    } catch (err) {
      if (state.stopped || err?.name === 'AbortError') {
        view.finish('cancelled', null);
        // The stored row has the final text and usage: show it as stored.
        setTimeout(() => { if (!active && currentThread === threadId) openThread(threadId); }, 400);
      } else {
        const words = err instanceof ApiProblem ? err.message
          : err instanceof TypeError ? networkProblem().message
            : 'The reply stopped unexpectedly. Reload the page to see what was saved.';
        if (err instanceof ApiProblem && !view.body.textContent) view.root.remove();
        else view.finish('error', null);
        showBanner(words);
      }
    } finally {
      active = null;
      setBusy(false);
    }
  }

  async function send(text) {
    if (active || !text.trim()) return;
    showBanner('');
    if (!currentThread) {
      try {
        const response = await api('/v1/threads', {
          method: 'POST', json: { title: text.trim().replace(/\s+/g, ' ').slice(0, 80) },
        });
        currentThread = (await response.json()).id;
        localStorage.setItem(THREAD_STORE, currentThread);
      } catch (err) { showBanner(err.message); return; }
      els.messages.textContent = '';
      loadThreads().catch(() => {});
    }
    const empty = els.messages.querySelector('.empty');
    if (empty) empty.remove();
    els.input.value = '';
    userView([{ type: 'text', text }], els.messages);
    const model = els.model.value.trim();
    localStorage.setItem(MODEL_STORE, model);
    const turnId = newId();
    const request = { turn_id: turnId, text, ...(model ? { model } : {}) };
    await follow(currentThread, turnId, request);
    loadThreads().catch(() => {});
  }

  async function stop() {
    if (!active) return;
    const { threadId, turnId, controller, state } = active;
    state.stopped = true;
    els.stop.disabled = true;
    try {
      const timeout = new Promise(resolve => setTimeout(resolve, 2000));
      await Promise.race([
        api(`/v1/threads/${encodeURIComponent(threadId)}/turns/${encodeURIComponent(turnId)}/cancel`,
          { method: 'POST' }).catch(() => {}),
        timeout,
      ]);
    } finally {
      controller.abort();
      els.stop.disabled = false;
    }
  }

  // ---- wiring ----
  els.composer.addEventListener('submit', e => { e.preventDefault(); send(els.input.value); });
  els.input.addEventListener('keydown', e => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(els.input.value); }
  });
  els.stop.addEventListener('click', stop);
  els.newThread.addEventListener('click', () => openThread(null));
  els.keyEntry.addEventListener('submit', e => {
    e.preventDefault();
    const key = els.keyInput.value.trim();
    if (!key) return;
    localStorage.setItem(KEY_STORE, key);
    els.keyInput.value = '';
    start();
  });

  async function start() {
    takeKeyFromUrl();
    const savedModel = localStorage.getItem(MODEL_STORE);
    if (savedModel) els.model.value = savedModel;
    if (!apiKey()) { showKeyForm(); emptyState(); return; }
    els.keyForm.hidden = true;
    els.keyStatus.textContent = `Key …${apiKey().slice(-4)}`;
    try {
      const threads = await loadThreads();
      if (currentThread && !threads.some(t => t.id === currentThread)) currentThread = null;
      await openThread(currentThread, threads.find(t => t.id === currentThread)?.title);
    } catch (err) {
      showBanner(err.message);
      emptyState();
    }
  }

  window.addEventListener('hashchange', () => { if (location.hash.includes('key=')) start(); });
  start();
})();
