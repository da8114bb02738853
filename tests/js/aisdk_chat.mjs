// The AI SDK's own chat engine (AbstractChat + DefaultChatTransport, the engine
// inside useChat) against a running turngate. Run by tests/test_aisdk_client.py.
//
//   node aisdk_chat.mjs <scenario> '<json options>'
//
// Scenarios: normal | stop | resume | history. Prints one JSON object on stdout.
import { AbstractChat, DefaultChatTransport, validateUIMessages } from 'ai';

const [scenario, rawOptions] = process.argv.slice(2);
const opts = JSON.parse(rawOptions ?? '{}');
const { url, key, chatId, model } = opts;
const headers = { authorization: `Bearer ${key}` };

// The state useChat keeps in React, kept in plain fields here.
class NodeChatState {
  constructor(messages = []) {
    this.status = 'ready';
    this.error = undefined;
    this.messages = messages;
  }
  pushMessage = message => { this.messages = this.messages.concat(message); };
  popMessage = () => { this.messages = this.messages.slice(0, -1); };
  replaceMessage = (index, message) => {
    this.messages = [
      ...this.messages.slice(0, index),
      this.snapshot(message),
      ...this.messages.slice(index + 1),
    ];
  };
  snapshot = thing => structuredClone(thing);
}

class NodeChat extends AbstractChat {
  constructor({ messages, ...init }) {
    super({ ...init, state: new NodeChatState(messages) });
  }
}

// A fetch whose response body dies after `dropAfterBytes` bytes, as a dropped
// network connection does (the socket is closed under the reader).
function droppingFetch(dropAfterBytes) {
  let armed = dropAfterBytes != null;
  return async (input, init) => {
    const response = await fetch(input, init);
    if (!armed || (init?.method ?? 'GET') !== 'POST' || !response.body) return response;
    armed = false;
    const reader = response.body.getReader();
    let seen = 0;
    const body = new ReadableStream({
      async pull(controller) {
        const { done, value } = await reader.read();
        if (done) { controller.close(); return; }
        seen += value.byteLength;
        controller.enqueue(value);
        if (seen >= dropAfterBytes) {
          await reader.cancel();
          controller.error(new TypeError('fetch failed: connection dropped by the test'));
        }
      },
      cancel(reason) { return reader.cancel(reason); },
    });
    return new Response(body, { status: response.status, headers: response.headers });
  };
}

function makeChat({ messages = [], dropAfterBytes } = {}) {
  const events = { finishes: [], errors: [], data: [] };
  const chat = new NodeChat({
    id: chatId,
    messages,
    transport: new DefaultChatTransport({
      api: `${url}/api/chat`,
      headers,
      body: model ? { model } : {},
      fetch: droppingFetch(dropAfterBytes),
    }),
    onFinish: ({ message, isAbort, isDisconnect, isError, finishReason }) => {
      events.finishes.push({ messageId: message.id, isAbort, isDisconnect, isError, finishReason });
    },
    onError: error => { events.errors.push(String(error?.message ?? error)); },
    // Data parts as useChat hands them to the app (transient ones only here).
    onData: part => { events.data.push(part); },
  });
  return { chat, events };
}

const textOf = message =>
  (message?.parts ?? []).filter(p => p.type === 'text').map(p => p.text).join('');

function report(chat, events, extra = {}) {
  return {
    scenario,
    status: chat.status,
    error: chat.error ? String(chat.error.message) : null,
    messages: chat.messages,
    lastText: textOf(chat.messages.at(-1)),
    finishes: events.finishes,
    errors: events.errors,
    data: events.data,
    ...extra,
  };
}

async function waitFor(predicate, timeoutMs = 15000) {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error('timed out waiting');
    await new Promise(resolve => setTimeout(resolve, 5));
  }
}

async function main() {
  if (scenario === 'normal') {
    const { chat, events } = makeChat();
    await chat.sendMessage({ text: opts.text ?? 'hello from the sdk' });
    return report(chat, events);
  }
  if (scenario === 'stop') {
    const { chat, events } = makeChat();
    const sending = chat.sendMessage({ text: opts.text ?? 'please stop me' });
    await waitFor(() => textOf(chat.messages.at(-1)).length >= (opts.stopAfterChars ?? 12)
      && chat.messages.at(-1)?.role === 'assistant');
    const textAtStop = textOf(chat.messages.at(-1));
    await chat.stop();
    await sending;
    return report(chat, events, { textAtStop });
  }
  if (scenario === 'resume') {
    const { chat, events } = makeChat({ dropAfterBytes: opts.dropAfterBytes ?? 1200 });
    await chat.sendMessage({ text: opts.text ?? 'resume me' });
    const afterDrop = {
      status: chat.status,
      error: chat.error ? String(chat.error.message) : null,
      text: textOf(chat.messages.at(-1)),
      messageId: chat.messages.at(-1)?.id,
    };
    await chat.resumeStream();
    return report(chat, events, { afterDrop });
  }
  if (scenario === 'history') {
    const response = await fetch(`${url}/v1/threads/${encodeURIComponent(chatId)}/messages?format=ui`, { headers });
    const stored = (await response.json()).messages;
    // The SDK's own validator accepts the stored history as UIMessages.
    const messages = await validateUIMessages({ messages: stored });
    const { chat, events } = makeChat({ messages });
    // Nothing runs on the thread: the resume endpoint answers 204, nothing changes.
    await chat.resumeStream();
    const afterIdleResume = { status: chat.status, count: chat.messages.length };
    await chat.sendMessage({ text: opts.text ?? 'and a follow-up' });
    return report(chat, events, { seeded: messages, afterIdleResume });
  }
  throw new Error(`unknown scenario ${scenario}`);
}

main().then(
  result => { process.stdout.write(JSON.stringify(result) + '\n'); },
  error => {
    process.stdout.write(JSON.stringify({ scenario, fatal: String(error?.stack ?? error) }) + '\n');
    process.exitCode = 1;
  },
);
