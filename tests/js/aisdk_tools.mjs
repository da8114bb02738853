// The AI SDK's chat engine (AbstractChat + DefaultChatTransport, the engine inside
// useChat) answering a paused turn: a tool approval (addToolApprovalResponse) or a
// client-side tool (onToolCall + addToolOutput), resubmitted by sendAutomaticallyWhen.
// Run by tests/test_agent_aisdk.py.
//
//   node aisdk_tools.mjs <approve|deny|client|double> '<json options>'
//
// `double` approves like `approve`, but every resubmission is sent twice at once (two
// tabs answering): the statuses of both are reported. Prints one JSON object.
import {
  AbstractChat,
  DefaultChatTransport,
  lastAssistantMessageIsCompleteWithApprovalResponses,
  lastAssistantMessageIsCompleteWithToolCalls,
} from 'ai';

const [scenario, rawOptions] = process.argv.slice(2);
const opts = JSON.parse(rawOptions ?? '{}');
const { url, key, chatId, model, tools } = opts;
const headers = { authorization: `Bearer ${key}` };

class NodeChatState {
  constructor() {
    this.status = 'ready';
    this.error = undefined;
    this.messages = [];
  }
  pushMessage = message => { this.messages = this.messages.concat(message); };
  popMessage = () => { this.messages = this.messages.slice(0, -1); };
  replaceMessage = (index, message) => {
    this.messages = [
      ...this.messages.slice(0, index),
      structuredClone(message),
      ...this.messages.slice(index + 1),
    ];
  };
  snapshot = thing => structuredClone(thing);
}

class NodeChat extends AbstractChat {
  constructor(init) {
    super({ ...init, state: new NodeChatState() });
  }
}

const requests = [];

// Every POST is recorded (what the client sent, what it got); with `double` a
// resubmission (messages ending with the assistant's) is sent twice at once and
// the client is given the one that succeeded.
async function recordingFetch(input, init) {
  if ((init?.method ?? 'GET') !== 'POST') return fetch(input, init);
  const body = JSON.parse(init.body);
  const resubmit = body.messages?.at(-1)?.role === 'assistant';
  if (scenario === 'double' && resubmit) {
    const [a, b] = await Promise.all([fetch(input, init), fetch(input, init)]);
    requests.push({ resubmit, statuses: [a.status, b.status] });
    const [ok, other] = a.ok ? [a, b] : [b, a];
    await other.text();
    return ok;
  }
  const response = await fetch(input, init);
  requests.push({ resubmit, statuses: [response.status], lastParts: body.messages?.at(-1)?.parts });
  return response;
}

const events = { finishes: [], errors: [], toolCalls: [] };
let chat;
chat = new NodeChat({
  id: chatId,
  transport: new DefaultChatTransport({
    api: `${url}/api/chat`,
    headers,
    body: { model, ...(tools ? { tools } : {}) },
    fetch: recordingFetch,
  }),
  sendAutomaticallyWhen: scenario === 'client'
    ? lastAssistantMessageIsCompleteWithToolCalls
    : lastAssistantMessageIsCompleteWithApprovalResponses,
  onToolCall: ({ toolCall }) => {
    events.toolCalls.push(toolCall.toolName);
    if (scenario === 'client' && toolCall.toolName === 'get_location') {
      chat.addToolOutput({ tool: 'get_location', toolCallId: toolCall.toolCallId,
                           output: { city: 'Paris' } });
    }
  },
  onFinish: ({ message, isAbort, isError, finishReason }) => {
    events.finishes.push({ messageId: message.id, isAbort, isError, finishReason });
  },
  onError: error => { events.errors.push(String(error?.message ?? error)); },
});

async function waitFor(predicate, timeoutMs = 20000) {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error('timed out waiting');
    await new Promise(resolve => setTimeout(resolve, 5));
  }
}

const toolParts = () => (chat.messages.at(-1)?.parts ?? []).filter(
  p => p.type.startsWith('tool-') || p.type === 'dynamic-tool');
const textOf = message =>
  (message?.parts ?? []).filter(p => p.type === 'text').map(p => p.text).join('');

async function main() {
  await chat.sendMessage({ text: opts.text ?? 'please' });
  let pausedMessageId = null;
  if (scenario === 'client') {
    // onToolCall answered; the automatic resubmit continues; wait for its text.
    await waitFor(() => chat.status === 'ready' && textOf(chat.messages.at(-1)).length > 0);
  } else {
    await waitFor(() => chat.status === 'ready'
      && toolParts().some(p => p.state === 'approval-requested'));
    pausedMessageId = chat.messages.at(-1).id;
    const part = toolParts().find(p => p.state === 'approval-requested');
    const approved = scenario !== 'deny';
    await chat.addToolApprovalResponse({ id: part.approval.id, approved,
                                         reason: approved ? undefined : 'not today' });
    await waitFor(() => chat.status === 'ready' && textOf(chat.messages.at(-1)).length > 0);
  }
  return {
    scenario,
    status: chat.status,
    error: chat.error ? String(chat.error.message) : null,
    messages: chat.messages,
    pausedMessageId,
    lastText: textOf(chat.messages.at(-1)),
    requests,
    ...events,
  };
}

main().then(
  out => { console.log(JSON.stringify(out)); process.exit(0); },
  error => { console.log(JSON.stringify({ fatal: String(error?.stack ?? error) })); process.exit(1); },
);
