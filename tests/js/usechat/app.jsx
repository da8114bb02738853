// A minimal chat page on the real @ai-sdk/react useChat, for tests/test_usechat_browser.py.
// Bundled at test time by tests/js/usechat_driver.mjs (esbuild) and served from another
// origin than the gateway. Query: ?gw=<gateway url>&key=<api key>&chat=<chat id>&model=<model>.
//
// It does what a plain app would: load the thread's stored messages as UI messages
// (none for a new chat), mount useChat with resume, and show messages, status and error.
// window.tg exposes what the page shows (read from the DOM) to the driver.
import React, { useEffect, useRef, useState } from 'react';
import { createRoot } from 'react-dom/client';
import { useChat } from '@ai-sdk/react';
import { DefaultChatTransport } from 'ai';

const params = new URLSearchParams(location.search);
const gw = params.get('gw');
const key = params.get('key');
const chatId = params.get('chat');
window.currentModel = params.get('model') ?? 'scripted:tokens=5';
window.chatErrors = [];
window.finishes = []; // one per response useChat finished (also aborted or failed ones)

// What arrived from the network, as the page's fetch got it: for each event-stream
// response, [Date.now(), text] per body chunk. Lets a test tell a delta the page
// received but had not shown yet at Stop from one it never received.
window.wire = [];
async function recordingFetch(input, init) {
  const response = await fetch(input, init);
  if (!response.body || !response.headers.get('content-type')?.startsWith('text/event-stream')) {
    return response;
  }
  const log = { url: String(input), method: init?.method ?? 'GET', chunks: [] };
  window.wire.push(log);
  const decoder = new TextDecoder();
  const body = response.body.pipeThrough(new TransformStream({
    transform(chunk, controller) {
      log.chunks.push([Date.now(), decoder.decode(chunk, { stream: true })]);
      controller.enqueue(chunk);
    },
  }));
  return new Response(body, { status: response.status, statusText: response.statusText,
    headers: response.headers });
}

const textOf = message =>
  message.parts.filter(p => p.type === 'text').map(p => p.text).join('');

// What the page shows, from the DOM.
function shownMessages() {
  return Array.from(document.querySelectorAll('#messages .msg')).map(li => ({
    id: li.dataset.id,
    role: li.dataset.role,
    text: li.querySelector('.text').textContent,
  }));
}
function shownAssistantText() {
  const replies = shownMessages().filter(m => m.role === 'assistant');
  return replies.length ? replies[replies.length - 1].text : '';
}
window.tg = {
  status: () => document.querySelector('#status')?.textContent ?? null,
  error: () => {
    const node = document.querySelector('#error');
    return node && node.dataset.present === 'true' ? node.textContent : null;
  },
  messages: shownMessages,
  assistantText: shownAssistantText,
  // Stop as the user does it: read what is on screen, then press Stop in the same task.
  stop: () => {
    const shown = shownAssistantText();
    window.stoppedAt = Date.now();
    document.querySelector('#stop').click();
    return shown;
  },
  // Press Stop as soon as the reply on screen reaches n characters (in the same task
  // as the render that showed it); resolves with the text shown at that moment.
  stopWhenShown: n => new Promise(resolve => {
    const check = () => {
      if (shownAssistantText().length < n) return false;
      observer.disconnect();
      resolve(window.tg.stop());
      return true;
    };
    const observer = new MutationObserver(check);
    observer.observe(document.querySelector('#messages'),
      { childList: true, subtree: true, characterData: true });
    check();
  }),
};

async function loadMessages() {
  const r = await fetch(`${gw}/v1/threads/${encodeURIComponent(chatId)}/messages?format=ui`, {
    headers: { authorization: `Bearer ${key}` },
  });
  if (r.status === 404) return []; // a new chat
  if (!r.ok) throw new Error(`loading messages: ${r.status} ${await r.text()}`);
  return (await r.json()).messages;
}

function Chat({ initialMessages }) {
  const [transport] = useState(() => new DefaultChatTransport({
    api: `${gw}/api/chat`,
    headers: { authorization: `Bearer ${key}` },
    body: () => ({ model: window.currentModel }),
    fetch: recordingFetch,
  }));
  const { messages, sendMessage, status, error, stop, regenerate } = useChat({
    id: chatId,
    messages: initialMessages,
    resume: true,
    transport,
    onError: e => window.chatErrors.push(String(e?.message ?? e)),
    onFinish: ({ message, isAbort, isError }) =>
      window.finishes.push({ id: message.id, isAbort, isError, text: textOf(message) }),
  });
  const input = useRef(null);
  return (
    <div id="chat">
      <ul id="messages">
        {messages.map(m => (
          <li key={m.id} className={`msg ${m.role}`} data-id={m.id} data-role={m.role}>
            <b>{m.role}: </b><span className="text">{textOf(m)}</span>
            {m.role === 'assistant' && (
              <button className="regen" type="button"
                onClick={() => regenerate({ messageId: m.id })}>↻</button>)}
          </li>
        ))}
      </ul>
      <p>status: <span id="status">{status}</span></p>
      <p className="error">error: <span id="error" data-present={String(error != null)}>
        {error?.message ?? ''}</span></p>
      <form onSubmit={e => {
        e.preventDefault();
        const text = input.current.value;
        input.current.value = '';
        sendMessage({ text });
      }}>
        <input id="input" ref={input} />
        <button id="send" type="submit">Send</button>
        <button id="stop" type="button" onClick={() => stop()}>Stop</button>
        {/* Never disabled: a fast double click sends two requests, as on a slow page. */}
        <button id="regenerate" type="button" onClick={() => regenerate()}>Regenerate</button>
      </form>
    </div>
  );
}

loadMessages().then(
  initialMessages => {
    createRoot(document.getElementById('root')).render(<Chat initialMessages={initialMessages} />);
    document.body.dataset.mounted = 'true';
  },
  err => {
    document.getElementById('root').textContent = `load failed: ${err}`;
    document.body.dataset.mounted = 'failed';
  },
);
