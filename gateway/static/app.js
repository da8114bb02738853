// turngate chat page: plain JavaScript, no build step (markdown.js renders replies).
// Talks to the turn API (POST /v1/threads/{id}/turns) and parses its SSE stream
// (AI SDK UI message stream chunks) with fetch + ReadableStream.
'use strict';

(() => {
  const KEY_STORE = 'turngate.key';
  const THREAD_STORE = 'turngate.thread';
  const MODEL_STORE = 'turngate.model';
  const IMAGE_TYPES = ['image/png', 'image/jpeg', 'image/gif', 'image/webp'];
  const $ = sel => document.querySelector(sel);
  const md = window.turngateMarkdown;

  const els = {
    threads: $('#threads'), messages: $('#messages'), input: $('#input'), send: $('#send'),
    stop: $('#stop'), model: $('#model'), modelList: $('#model-list'), title: $('#thread-title'),
    banner: $('#banner'), keyForm: $('#key-form'), keyEntry: $('#key-entry'),
    keyInput: $('#key-input'), keyStatus: $('#key-status'), newThread: $('#new-thread'),
    composer: $('#composer'), attach: $('#attach'), fileInput: $('#file-input'),
    attachments: $('#attachments'), renameThread: $('#rename-thread'),
    deleteThread: $('#delete-thread'), renameForm: $('#rename-form'),
    renameInput: $('#rename-input'), openSidebar: $('#open-sidebar'),
    closeSidebar: $('#close-sidebar'), scrim: $('#scrim'),
  };

  // What a turn accepts (GET /v1/models "limits"); these defaults until it answers.
  let limits = { max_text_chars: 100000, max_images: 4, max_image_bytes: 8388608, max_body_bytes: 50331648 };

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
    401: 'Your API key was not accepted. Open the link that “turngate serve” printed, or enter a key below.',
    404: 'This conversation no longer exists, or it belongs to another key.',
    409: 'A reply is still being written in this conversation. Wait for it to finish, then try again.',
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
    if ((response.status === 400 || response.status === 413) && detail) {
      return new ApiProblem(`The server did not accept the message: ${detail}.`, response.status, code);
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
  function formatBytes(n) {
    if (n >= 1048576) return `${(n / 1048576).toFixed(n % 1048576 ? 1 : 0)} MB`;
    if (n >= 1024) return `${Math.round(n / 1024)} KB`;
    return `${n} bytes`;
  }

  function costText(usage) {
    if (!usage || typeof usage.costMicros !== 'number') return '';
    if (usage.unpriced?.length) return `cost unknown (no price for ${usage.unpriced.join(', ')})`;
    if (usage.costMicros === 0) return usage.unpriced ? '$0 (free model)' : '$0';
    const dollars = usage.costMicros / 1e6;
    return '$' + (dollars >= 0.01 ? dollars.toFixed(4) : dollars.toFixed(6));
  }

  function usageText(usage) {
    if (!usage) return '';
    const total = usage.totalTokens ?? ((usage.inputTokens ?? 0) + (usage.outputTokens ?? 0));
    return `${total} tokens (${usage.inputTokens ?? 0} in, ${usage.outputTokens ?? 0} out)`
      + (usage.estimated ? ' · estimated' : '');
  }

  function timeText(iso) {
    const when = new Date(iso);
    if (Number.isNaN(when.getTime())) return '';
    const sameDay = when.toDateString() === new Date().toDateString();
    return sameDay ? when.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' })
      : when.toLocaleString([], { dateStyle: 'medium', timeStyle: 'short' });
  }

  const STATUS_WORDS = {
    cancelled: ['stopped', 'Stopped'], interrupted: ['stopped', 'Interrupted'],
    error: ['failed', 'Failed'], streaming: ['', 'Writing…'],
    requires_action: ['waiting', 'Waiting for you'],
  };

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function button(className, text, label) {
    const node = el('button', className, text);
    node.type = 'button';
    if (label) node.setAttribute('aria-label', label);
    return node;
  }

  function pretty(value) {
    if (typeof value === 'string') return value;
    try { return JSON.stringify(value, null, 2); } catch (_) { return String(value); }
  }

  async function copyText(text) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch (_) { /* not allowed here: the old way */ }
    const area = el('textarea');
    area.value = text;
    area.style.position = 'fixed';
    area.style.opacity = '0';
    document.body.append(area);
    area.select();
    let ok = false;
    try { ok = document.execCommand('copy'); } catch (_) { ok = false; }
    area.remove();
    return ok;
  }

  async function copyWithFeedback(node, text) {
    const ok = await copyText(text);
    const before = node.dataset.label ?? node.textContent;
    node.dataset.label = before;
    node.textContent = ok ? 'Copied' : 'Copy failed';
    setTimeout(() => { node.textContent = before; }, 1500);
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
      this.pending = false;
      this.turnId = null;
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
      const node = el('div', 'text md');
      node.dataset.raw = '';
      this.body.append(node);
      return node;
    }
    appendText(kind, id, delta) {
      if (!this.open || this.open.kind !== kind || this.open.id !== id) {
        this.endText();
        this.open = { kind, id, node: this.textPart(kind) };
      }
      const node = this.open.node;
      if (kind === 'reasoning') node.textContent += delta;
      else {
        node.dataset.raw += delta;
        node.classList.add('cursor');
        this.schedule();
      }
    }
    schedule() {
      if (this.pending) return;
      this.pending = true;
      setTimeout(() => { this.pending = false; this.renderText(); }, 30);
    }
    renderText() {
      const stick = nearBottom();
      for (const node of this.body.querySelectorAll('.text.md')) {
        if (node.dataset.rendered !== node.dataset.raw) {
          md.render(node.dataset.raw, node);
          node.dataset.rendered = node.dataset.raw;
        }
      }
      if (stick) scrollToEnd();
    }
    endText() {
      if (this.open) this.open.node.classList.remove('cursor');
      this.open = null;
      this.renderText();
    }
    rawText() {
      return Array.from(this.body.querySelectorAll('.text.md')).map(n => n.dataset.raw).join('\n\n');
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
        view = { box, state, args, result, argsText: '', name, approval: null };
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
    toolOutput(id, output, { label = 'Result', state = 'done' } = {}) {
      const view = this.tool(id, '?');
      view.result.hidden = false;
      view.result.textContent = `${label}: ${pretty(output)}`;
      view.state.textContent = state;
      this.endApproval(id);
    }
    // A call waiting for a person: Approve / Deny continue this same reply.
    approvalRequest(id, approvalId) {
      const view = this.tool(id, '?');
      this.endApproval(id);
      view.state.textContent = 'waiting for your approval';
      const bar = el('div', 'approval');
      const approve = button('approve', 'Approve', `Approve the call of ${view.name}`);
      const deny = button('deny', 'Deny', `Deny the call of ${view.name}`);
      approve.disabled = deny.disabled = Boolean(active);
      approve.addEventListener('click', () => answerApproval(this, approvalId, true));
      deny.addEventListener('click', () => answerApproval(this, approvalId, false));
      bar.append(approve, deny);
      view.box.append(bar);
      view.approval = bar;
    }
    endApproval(id) {
      const view = this.tools.get(id);
      if (view?.approval) { view.approval.remove(); view.approval = null; }
    }
    // The reply goes on (a continuation): streaming again, answered calls lose their buttons.
    reopen() {
      for (const id of this.tools.keys()) this.endApproval(id);
      for (const notice of this.body.querySelectorAll('.notice')) notice.remove();
      this.root.dataset.status = 'streaming';
      this.meta.textContent = '';
      return this;
    }
    error(text) {
      this.endText();
      const node = el('div', 'error', text);
      this.body.append(node);
      return node;
    }
    finish(status, usage, info = {}) {
      this.endText();
      for (const view of this.tools.values()) {
        if (view.result.hidden && !view.approval && status !== 'streaming') view.state.textContent = 'no result';
      }
      this.root.dataset.status = status;
      this.meta.textContent = '';
      const [badgeClass, words] = STATUS_WORDS[status] ?? ['', ''];
      if (words) this.meta.append(el('span', `badge ${badgeClass}`, words));
      if (info.model) this.meta.append(el('span', 'model-name', info.model));
      if (info.createdAt) {
        const time = el('time', 'when', timeText(info.createdAt));
        time.dateTime = info.createdAt;
        time.title = new Date(info.createdAt).toLocaleString();
        this.meta.append(time);
      }
      if (usage) {
        this.meta.append(el('span', 'tokens', usageText(usage)));
        this.meta.append(el('span', 'cost', costText(usage)));
      }
      if (status !== 'streaming') {
        const actions = el('span', 'actions');
        const copy = button('copy-reply', 'Copy', 'Copy this reply');
        copy.addEventListener('click', () => copyWithFeedback(copy, this.rawText()));
        actions.append(copy);
        if (info.turnId) {
          const again = button('regenerate', 'Regenerate', 'Write this reply again');
          again.addEventListener('click', () => regenerate(info.turnId, this));
          actions.append(again);
        }
        this.meta.append(actions);
      }
      if (!this.body.textContent.trim() && status === 'complete') {
        this.body.append(el('div', 'notice muted', '(no text response)'));
      }
    }

    // Stored content parts (docs/API.md, "Stored content parts").
    renderStored(row, usage) {
      this.setMessageId(row.id);
      this.turnId = row.turn_id ?? null;
      let errorText = null;
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
          else if (part.denied) this.toolOutput(part.toolCallId, part.errorText ?? '', { label: 'Denied', state: 'denied' });
          else if ('errorText' in part) this.toolOutput(part.toolCallId, part.errorText, { label: 'Error', state: 'failed' });
          else if (part.approval?.id && row.status === 'requires_action') this.approvalRequest(part.toolCallId, part.approval.id);
        } else if (part.type === 'status') this.body.append(el('div', 'notice muted', part.text));
        else if (part.type === 'error') errorText = part.errorText;
      });
      if (row.status === 'error') {
        this.error(errorText ? `The model could not finish this reply: ${errorText}`
          : 'The reply failed before it was complete.');
      }
      this.finish(row.status, usage, {
        model: usage?.models?.join(', '), createdAt: row.created_at, turnId: row.turn_id,
      });
    }
  }

  function nearBottom() {
    const m = els.messages;
    return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
  }
  function scrollToEnd() { els.messages.scrollTop = els.messages.scrollHeight; }

  function userView(content, container, createdAt) {
    const root = el('div', 'msg user');
    for (const part of content) {
      if (part.type === 'text') root.append(el('div', 'user-text', part.text));
      else if (part.type === 'image' && /^data:image\/(png|jpeg|gif|webp);base64,/.test(part.image)) {
        const img = el('img');
        img.src = part.image;
        img.alt = 'attached image';
        root.append(img);
      }
    }
    if (createdAt) {
      const time = el('time', 'when', timeText(createdAt));
      time.dateTime = createdAt;
      root.append(time);
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
        case 'start': view.setMessageId(chunk.messageId); break;
        case 'text-delta': view.appendText('text', chunk.id, chunk.delta); break;
        case 'reasoning-delta': view.appendText('reasoning', chunk.id, chunk.delta); break;
        case 'text-end': case 'reasoning-end': view.endText(); break;
        case 'tool-input-start': view.tool(chunk.toolCallId, chunk.toolName); break;
        case 'tool-input-delta': view.toolArgs(chunk.toolCallId, chunk.inputTextDelta); break;
        case 'tool-input-available': view.toolInput(chunk.toolCallId, chunk.toolName, chunk.input); break;
        case 'tool-output-available': view.toolOutput(chunk.toolCallId, chunk.output); break;
        case 'tool-output-error': view.toolOutput(chunk.toolCallId, chunk.errorText, { label: 'Error', state: 'failed' }); break;
        case 'tool-output-denied': view.toolOutput(chunk.toolCallId, chunk.errorText ?? 'denied', { label: 'Denied', state: 'denied' }); break;
        case 'tool-approval-request': view.approvalRequest(chunk.toolCallId, chunk.approvalId); break;
        case 'message-metadata': usage = chunk.messageMetadata?.usage ?? usage; break;
        // The server titled a new chat (transient: sent once, never replayed).
        case 'data-title': setTitle(chunk.data?.threadId, chunk.data?.title); break;
        case 'error':
          status = 'error';
          view.error(`The model could not finish this reply: ${chunk.errorText}`).scrollIntoView({ block: 'end' });
          break;
        case 'abort': status = 'cancelled'; break;
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
  const titles = new Map();
  // A new chat's first words, shown until the server's title arrives (data-title, or
  // the thread list): the server titles it after its first turn.
  const provisional = new Map();
  const threadPath = id => `/v1/threads/${encodeURIComponent(id)}`;
  const shownTitle = id => titles.get(id) || provisional.get(id) || 'Untitled chat';

  // The server's rule for a title from the user's words: at most 80 characters, whole words.
  function firstWords(text) {
    const words = text.trim().split(/\s+/).filter(Boolean);
    if (!words.length) return '';
    let title = words[0].slice(0, 80);
    for (const word of words.slice(1)) {
      if (title.length + 1 + word.length > 80) break;
      title += ` ${word}`;
    }
    return title;
  }

  function showTitle() {
    els.title.textContent = currentThread ? shownTitle(currentThread) : 'New chat';
    els.renameThread.hidden = els.deleteThread.hidden = !currentThread;
  }

  function setTitle(threadId, title) {
    if (typeof threadId !== 'string' || typeof title !== 'string' || !title) return;
    titles.set(threadId, title);
    for (const item of els.threads.querySelectorAll('button')) {
      if (item.dataset.threadId === threadId) item.textContent = item.title = title;
    }
    if (threadId === currentThread) showTitle();
  }

  // A model's title comes after the reply: ask the list again a few times until it has one.
  async function awaitTitle(threadId) {
    for (const seconds of [1, 2, 3, 5, 8, 13]) {
      if (titles.get(threadId)) return;
      await new Promise(resolve => setTimeout(resolve, seconds * 1000));
      if (active || !titles.has(threadId)) return;  // busy again, or the chat is gone
      await loadThreads().catch(() => {});
    }
  }

  async function loadThreads() {
    const response = await api('/v1/threads?limit=100');
    const { threads } = await response.json();
    els.threads.textContent = '';
    for (const thread of threads) {
      titles.set(thread.id, thread.title);
      const item = button(thread.id === currentThread ? 'active' : '', shownTitle(thread.id));
      item.title = thread.title || provisional.get(thread.id) || thread.id;
      item.dataset.threadId = thread.id;
      if (thread.id === currentThread) item.setAttribute('aria-current', 'page');
      item.addEventListener('click', () => { closeSidebar(); openThread(thread.id); });
      els.threads.append(item);
    }
    showTitle();
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
          models: Object.keys(row.model_breakdown ?? {}), unpriced: row.unpriced_models ?? [],
        });
      }
    } catch (_) { /* usage is a nicety; the conversation still shows */ }
    return map;
  }

  function emptyState() {
    els.messages.textContent = '';
    els.messages.append(el('div', 'empty', 'Send a message to start a conversation.'));
  }

  async function openThread(threadId, { keepBanner = false } = {}) {
    if (active) return;
    cancelRename();
    currentThread = threadId;
    if (threadId) localStorage.setItem(THREAD_STORE, threadId);
    else localStorage.removeItem(THREAD_STORE);
    showTitle();
    for (const b of els.threads.querySelectorAll('button')) {
      const on = b.dataset.threadId === threadId;
      b.classList.toggle('active', on);
      if (on) b.setAttribute('aria-current', 'page'); else b.removeAttribute('aria-current');
    }
    if (!keepBanner) showBanner('');
    if (!threadId) { emptyState(); return; }
    let rows;
    try {
      const response = await api(`${threadPath(threadId)}/messages`);
      rows = (await response.json()).messages;
    } catch (err) {
      if (err.status === 404) { await openThread(null); return; }
      showBanner(err.message);
      return;
    }
    if (currentThread !== threadId) return;
    const usage = await usageByMessage(threadId);
    els.messages.textContent = '';
    if (!rows.length) emptyState();
    let streaming = null;
    let lastReply = null;
    for (const row of rows) {
      if (row.role === 'user') userView(row.content, els.messages, row.created_at);
      else if (row.role === 'assistant') {
        if (row.status === 'streaming') { streaming = row; continue; }
        lastReply = new ReplyView(els.messages);
        lastReply.renderStored(row, usage.get(row.id));
      }
    }
    markLastReply();
    scrollToEnd();
    // A failed last reply: its reason and its Regenerate button in view, not below the fold.
    if (lastReply?.root.querySelector('.error') && !streaming) lastReply.root.scrollIntoView({ block: 'end' });
    if (streaming && streaming.turn_id) await follow(threadId, streaming.turn_id, null);
  }

  // Only the thread's last reply can be regenerated.
  function markLastReply() {
    const replies = els.messages.querySelectorAll('.msg.assistant');
    replies.forEach((reply, k) => {
      const again = reply.querySelector('.regenerate');
      if (again) again.hidden = k !== replies.length - 1;
    });
  }

  // ---- sending, following, stopping ----
  function setBusy(busy) {
    els.send.disabled = busy;
    els.stop.hidden = !busy;
    for (const node of els.messages.querySelectorAll('.regenerate, .approve, .deny')) node.disabled = busy;
  }

  function newId() {
    if (crypto.randomUUID) return crypto.randomUUID();
    return Array.from(crypto.getRandomValues(new Uint8Array(16)), b => b.toString(16).padStart(2, '0')).join('');
  }

  // Start (request), regenerate, continue (continueOf: the paused reply's view, which the
  // continued stream goes on filling) or resume a turn; the reply shows once the server took it.
  async function follow(threadId, turnId, request, { regenerateOf = null, continueOf = null, onAccepted = null } = {}) {
    const controller = new AbortController();
    const state = { stopped: false };
    active = { threadId, turnId, controller, state };
    setBusy(true);
    document.body.dataset.state = 'busy';
    let view = null;
    try {
      const path = `${threadPath(threadId)}/turns`;
      const response = continueOf
        ? await api(`${path}/${encodeURIComponent(turnId)}/continue`,
          { method: 'POST', json: request, signal: controller.signal })
        : regenerateOf
        ? await api(`${path}/${encodeURIComponent(turnId)}/regenerate`,
          { method: 'POST', json: request, signal: controller.signal })
        : request
          ? await api(path, { method: 'POST', json: request, signal: controller.signal })
          : await api(`${path}/${encodeURIComponent(turnId)}/stream`, { signal: controller.signal });
      if (response.status === 204) return 'none';
      if (onAccepted) onAccepted();
      if (regenerateOf) regenerateOf.root.remove();
      view = continueOf ? continueOf.reopen() : new ReplyView(els.messages);
      view.turnId = turnId;
      scrollToEnd();
      const { status, usage } = await streamInto(response, view, state);
      view.finish(status, usage, { model: request?.model });
      return status;
    } catch (err) {
      if (state.stopped || err?.name === 'AbortError') {
        view?.finish('cancelled', null);
        return 'cancelled';
      }
      const words = err instanceof ApiProblem ? err.message
        : err instanceof TypeError ? networkProblem().message
          : 'The reply stopped unexpectedly. Reload the page to see what was saved.';
      if (view) view.finish('error', null);
      showBanner(words);
      return err instanceof ApiProblem && !view ? 'rejected' : 'error';
    } finally {
      active = null;
      setBusy(false);
      if (view && currentThread === threadId && !state.deleted) {
        // Show the reply as stored: model, time, usage and cost, the stored reason of a failure.
        const banner = els.banner.hidden ? '' : els.banner.textContent;
        await openThread(threadId, { keepBanner: true });
        if (banner) showBanner(banner);
      }
      // Tests and scripts wait for this: the reply is finished and shown as stored.
      if (!active) document.body.dataset.state = 'idle';
      document.body.dataset.turnsEnded = String(Number(document.body.dataset.turnsEnded ?? 0) + 1);
    }
  }

  function checkBeforeSend(text) {
    if (text.length > limits.max_text_chars) {
      return `The message is ${text.length} characters long; the limit is ${limits.max_text_chars}. Shorten it and send again.`;
    }
    const bytes = attachments.reduce((sum, a) => sum + a.dataUrl.length, 0) + text.length * 3;
    if (bytes > limits.max_body_bytes) {
      return `The message with its images is about ${formatBytes(bytes)}; the server takes at most ${formatBytes(limits.max_body_bytes)}. Remove an image.`;
    }
    return '';
  }

  async function send() {
    const text = els.input.value;
    if (active || !text.trim()) return;
    showBanner('');
    const problem = checkBeforeSend(text);
    if (problem) { showBanner(problem); return; }
    let threadId = currentThread;
    let created = false;
    if (!threadId) {
      try {
        // Untitled: the server titles it after this first turn.
        const response = await api('/v1/threads', { method: 'POST', json: {} });
        threadId = (await response.json()).id;
        provisional.set(threadId, firstWords(text));
        created = true;
      } catch (err) { showBanner(err.message); return; }
    }
    const images = attachments.map(a => a.dataUrl);
    const model = els.model.value.trim();
    localStorage.setItem(MODEL_STORE, model);
    const turnId = newId();
    const request = { turn_id: turnId, text, ...(images.length ? { images } : {}), ...(model ? { model } : {}) };
    const accepted = () => {
      // Stored now (the user message is written before the stream starts): show it as sent.
      if (created) {
        currentThread = threadId;
        localStorage.setItem(THREAD_STORE, threadId);
        els.messages.textContent = '';
        showTitle();
        loadThreads().catch(() => {});
      }
      const empty = els.messages.querySelector('.empty');
      if (empty) empty.remove();
      els.input.value = '';
      clearAttachments();
      userView([{ type: 'text', text }, ...images.map(image => ({ type: 'image', image }))], els.messages);
    };
    const outcome = await follow(threadId, turnId, request, { onAccepted: accepted });
    if (outcome === 'rejected' && created) {
      // Nothing of the message was stored: the new chat made for it goes too.
      await api(threadPath(threadId), { method: 'DELETE' }).catch(() => {});
    }
    await loadThreads().catch(() => {});
    if (created && outcome !== 'rejected') awaitTitle(threadId);
  }

  async function regenerate(turnId, view) {
    if (active || !currentThread) return;
    showBanner('');
    const model = els.model.value.trim();
    const replaces = Number(view.root.dataset.messageId);
    const request = { ...(model ? { model } : {}), ...(Number.isFinite(replaces) ? { replaces } : {}) };
    await follow(currentThread, turnId, request, { regenerateOf: view });
  }

  // A person's answer to a tool call waiting for approval: the same reply continues.
  async function answerApproval(view, approvalId, approved) {
    if (active || !currentThread || !view.turnId) return;
    showBanner('');
    await follow(currentThread, view.turnId, { approvals: [{ approvalId, approved }] },
      { continueOf: view });
  }

  async function stop() {
    if (!active) return;
    const { threadId, turnId, controller, state } = active;
    state.stopped = true;
    els.stop.disabled = true;
    try {
      const timeout = new Promise(resolve => setTimeout(resolve, 2000));
      await Promise.race([
        api(`${threadPath(threadId)}/turns/${encodeURIComponent(turnId)}/cancel`, { method: 'POST' })
          .catch(() => {}),
        timeout,
      ]);
      // The stream ends by itself once the turn is finalized; abort only if it does not.
      setTimeout(() => { if (active?.controller === controller) controller.abort(); }, 3000);
    } finally {
      els.stop.disabled = false;
    }
  }

  // ---- rename and delete ----
  function startRename() {
    if (!currentThread) return;
    els.renameInput.value = titles.get(currentThread) ?? '';
    els.title.hidden = true;
    els.renameForm.hidden = false;
    els.renameInput.focus();
    els.renameInput.select();
  }
  function cancelRename() {
    els.renameForm.hidden = true;
    els.title.hidden = false;
  }
  async function saveRename() {
    const threadId = currentThread;
    const title = els.renameInput.value;
    cancelRename();
    try {
      const response = await api(threadPath(threadId), { method: 'PATCH', json: { title: title.trim() ? title : null } });
      titles.set(threadId, (await response.json()).title);
      showTitle();
      await loadThreads();
    } catch (err) { showBanner(err.message); }
  }

  let deleteTimer = null;
  async function deleteCurrent() {
    if (!currentThread) return;
    if (!els.deleteThread.classList.contains('confirm')) {
      els.deleteThread.classList.add('confirm');
      els.deleteThread.textContent = 'Delete for good?';
      clearTimeout(deleteTimer);
      deleteTimer = setTimeout(resetDelete, 5000);
      return;
    }
    resetDelete();
    const threadId = currentThread;
    if (active?.threadId === threadId) active.state.deleted = true;
    try {
      await api(threadPath(threadId), { method: 'DELETE' });
    } catch (err) {
      if (err.status !== 404) { showBanner(err.message); return; }
    }
    if (active?.threadId === threadId) active.controller.abort();
    titles.delete(threadId);
    const wait = () => (active ? new Promise(r => setTimeout(r, 50)).then(wait) : null);
    await wait();
    await openThread(null);
    await loadThreads().catch(() => {});
  }
  function resetDelete() {
    els.deleteThread.classList.remove('confirm');
    els.deleteThread.textContent = 'Delete';
  }

  // ---- images ----
  let attachments = []; // {dataUrl, name, size}

  function readAsDataUrl(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
  }

  async function addFiles(files) {
    const problems = [];
    for (const file of files) {
      const name = file.name || 'The pasted image';
      if (!IMAGE_TYPES.includes(file.type)) {
        problems.push(`${name} is ${file.type || 'not an image'}; only PNG, JPEG, GIF and WebP images can be sent.`);
        continue;
      }
      if (file.size > limits.max_image_bytes) {
        problems.push(`${name} is ${formatBytes(file.size)}; the server takes images up to ${formatBytes(limits.max_image_bytes)}.`);
        continue;
      }
      if (attachments.length >= limits.max_images) {
        problems.push(`A message can carry at most ${limits.max_images} images.`);
        break;
      }
      attachments.push({ dataUrl: await readAsDataUrl(file), name, size: file.size });
    }
    renderAttachments();
    if (problems.length) showBanner(problems.join(' '));
    else showBanner('');
  }

  function renderAttachments() {
    els.attachments.textContent = '';
    els.attachments.hidden = !attachments.length;
    attachments.forEach((a, k) => {
      const chip = el('div', 'attachment');
      const img = el('img');
      img.src = a.dataUrl;
      img.alt = a.name;
      const remove = button('remove', '✕', `Remove ${a.name}`);
      remove.addEventListener('click', () => { attachments.splice(k, 1); renderAttachments(); els.input.focus(); });
      chip.append(img, el('span', 'size', formatBytes(a.size)), remove);
      els.attachments.append(chip);
    });
  }
  function clearAttachments() { attachments = []; renderAttachments(); }

  // ---- models ----
  async function loadModels() {
    try {
      const body = await (await api('/v1/models')).json();
      limits = { ...limits, ...(body.limits ?? {}) };
      els.modelList.textContent = '';
      for (const model of body.models ?? []) {
        const option = el('option');
        option.value = model.id;
        option.label = model.label === model.id ? model.adapter : model.label;
        els.modelList.append(option);
      }
      els.model.placeholder = `default: ${body.default}`;
      const down = (body.adapters ?? []).filter(a => a.status === 'unavailable');
      els.model.title = down.length ? down.map(a => a.error).join('; ') : 'Pick a model or type "<adapter>:<model>"';
    } catch (_) { /* the field still takes a typed model */ }
  }

  // ---- layout: the sidebar on narrow screens ----
  function openSidebar() {
    document.body.classList.add('sidebar-open');
    els.scrim.hidden = false;
    els.openSidebar.setAttribute('aria-expanded', 'true');
    els.newThread.focus();
  }
  function closeSidebar() {
    if (!document.body.classList.contains('sidebar-open')) return;
    document.body.classList.remove('sidebar-open');
    els.scrim.hidden = true;
    els.openSidebar.setAttribute('aria-expanded', 'false');
  }

  // ---- wiring ----
  els.composer.addEventListener('submit', e => { e.preventDefault(); send(); });
  els.input.addEventListener('keydown', e => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  document.addEventListener('keydown', e => {
    if (e.key !== 'Escape') return;
    if (!els.renameForm.hidden) { cancelRename(); return; }
    if (active) { e.preventDefault(); stop(); return; }
    closeSidebar();
  });
  els.stop.addEventListener('click', stop);
  els.newThread.addEventListener('click', () => { closeSidebar(); openThread(null); els.input.focus(); });
  els.renameThread.addEventListener('click', startRename);
  els.title.addEventListener('dblclick', startRename);
  els.renameForm.addEventListener('submit', e => { e.preventDefault(); saveRename(); });
  els.renameInput.addEventListener('blur', () => { if (!els.renameForm.hidden) cancelRename(); });
  els.deleteThread.addEventListener('click', deleteCurrent);
  els.attach.addEventListener('click', () => els.fileInput.click());
  els.fileInput.addEventListener('change', async () => {
    await addFiles(Array.from(els.fileInput.files ?? []));
    els.fileInput.value = '';
  });
  els.input.addEventListener('paste', e => {
    const files = Array.from(e.clipboardData?.files ?? []);
    if (files.length) { e.preventDefault(); addFiles(files); }
  });
  const main = document.querySelector('main');
  main.addEventListener('dragover', e => {
    if (Array.from(e.dataTransfer?.types ?? []).includes('Files')) { e.preventDefault(); main.classList.add('dropping'); }
  });
  main.addEventListener('dragleave', e => { if (e.target === main) main.classList.remove('dropping'); });
  main.addEventListener('drop', e => {
    main.classList.remove('dropping');
    const files = Array.from(e.dataTransfer?.files ?? []);
    if (files.length) { e.preventDefault(); addFiles(files); }
  });
  els.messages.addEventListener('click', e => {
    const copy = e.target.closest('.copy-code');
    if (copy) copyWithFeedback(copy, copy.closest('.code-block').querySelector('code').textContent);
  });
  els.openSidebar.addEventListener('click', openSidebar);
  els.closeSidebar.addEventListener('click', closeSidebar);
  els.scrim.addEventListener('click', closeSidebar);
  els.keyEntry.addEventListener('submit', e => {
    e.preventDefault();
    const key = els.keyInput.value.trim();
    if (!key) return;
    localStorage.setItem(KEY_STORE, key);
    els.keyInput.value = '';
    start();
  });

  async function start() {
    document.body.dataset.state = 'loading';
    takeKeyFromUrl();
    const savedModel = localStorage.getItem(MODEL_STORE);
    if (savedModel !== null) els.model.value = savedModel;
    if (!apiKey()) { showKeyForm(); emptyState(); return; }
    els.keyForm.hidden = true;
    els.keyStatus.textContent = `Key …${apiKey().slice(-4)}`;
    try {
      const threads = await loadThreads();
      loadModels();
      if (currentThread && !threads.some(t => t.id === currentThread)) currentThread = null;
      await openThread(currentThread);
    } catch (err) {
      showBanner(err.message);
      emptyState();
    }
    if (!active) document.body.dataset.state = 'idle';
  }

  window.addEventListener('hashchange', () => { if (location.hash.includes('key=')) start(); });
  start();
})();
