// The page's state and its controls: the session, its socket, pending JSON-RPC requests, the running turn.
import {$} from "./dom.js";

export const ui = {
  status: $("connection-status"), model: $("model-name"), apiKey: $("api-key"), tools: $("tools-json"),
  canned: $("canned-json"), settingsError: $("settings-error"), create: $("create-session"),
  reconnect: $("reconnect"), sessionId: $("session-id"), maxNewTokens: $("max-new-tokens"),
  temperature: $("temperature"), ignoreEos: $("ignore-eos"), transcript: $("transcript"), composer: $("composer"),
  message: $("message"), send: $("send"), cancel: $("cancel"), turnTemplate: $("turn-template"),
};

export const state = {
  sessionId: null,
  ws: null,
  connected: false,
  nextId: 1,
  pending: new Map(),  // JSON-RPC id -> {method, text, sentOn, ok, fail, quiet}
  turn: null,          // the running task's turn (see turns.js newTurn), or null when idle
  lastSeq: 0,          // the seq of the last notification received: where a resumed socket starts
  resuming: null,      // {until, delay} while a dropped socket is being reopened (resume.js)
  abandoned: null,     // a task whose turn ended here when its socket was given up: cancelled on reconnect
};

const PLACEHOLDERS = {
  none: "Create a session first (the button on the left, or above on a phone)",
  connected: "Type a message: Enter sends, Shift+Enter adds a line",
  resuming: "The connection dropped: reconnecting by itself, the answer goes on where it was",
  disconnected: "The socket is closed: Reconnect to continue this conversation, or create a new session",
};

export function setStatus(text, kind) {
  ui.status.textContent = text;
  ui.status.className = `status status-${kind}`;
}

// Send is possible on an open socket with no running task; Cancel only while a task runs. The composer's
// placeholder says what to do next.
export function refreshButtons() {
  const busy = state.turn !== null;
  ui.send.disabled = !state.connected || busy || state.abandoned !== null;
  ui.cancel.disabled = !state.connected || !busy || state.turn.cancelling;
  ui.reconnect.disabled = state.sessionId === null || state.connected || state.resuming !== null;
  const placeholder = state.connected ? "connected" : state.resuming ? "resuming"
    : state.sessionId ? "disconnected" : "none";
  ui.message.placeholder = PLACEHOLDERS[placeholder];
}

// Send one JSON-RPC request on the session's socket; `handlers.ok` / `handlers.fail` get its result or error
// (`handlers.quiet`: an error is not shown). A request waits in `pending` until its response; one whose socket
// dropped first is sent again once the server has replayed what was missed (resume.js onResumed).
export function rpc(method, params, handlers = {}) {
  const id = state.nextId++;
  const pending = {method, text: JSON.stringify({jsonrpc: "2.0", id, method, params}), sentOn: null, ...handlers};
  state.pending.set(id, pending);
  if (state.connected) {
    state.ws.send(pending.text);
    pending.sentOn = state.ws;
  }
  return id;
}
