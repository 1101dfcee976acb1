// The web playground: a chat client for the server's WebSocket JSON-RPC protocol (see README "API").
//
// Plain browser JavaScript modules, no build step and no external resources. This module owns the session
// and its socket and routes what arrives; dom.js, http.js, settings.js, turns.js, toolcards.js and resume.js (a
// dropped socket reopens by itself and the answer goes on) do the rest.
import {addEntry, el, formatDetails, rpcErrorTitle, showError, showNote} from "./dom.js";
import {requestJson, postJson, socketUrl} from "./http.js";
import {cancelAbandoned, onResumed, resentGenerateStarted, resumeAfterClose, retryResume,
  skipNotification} from "./resume.js";
import {DEFAULT_TOOLS, readCanned, readTools, samplingParams, settingsError} from "./settings.js";
import {refreshButtons, rpc, setStatus, state, ui} from "./state.js";
import {onCallRequest} from "./toolcards.js";
import {endTurnLocally, newTurn, onEnd, onFinalText, onTextChunk} from "./turns.js";

// ---- which model ---------------------------------------------------------------------------------------------
// The header names the served model and says when it is the CPU fallback. /v1/models needs the key when the
// server has keys; /ready names the model without one.
async function showModel() {
  let model = null;
  try {
    model = ((await requestJson("v1/models")).data || [])[0] || null;
  } catch (_) {
    try {
      const ready = await requestJson("ready");
      model = ready.model ? {id: ready.model} : null;
    } catch (__) { /* the server is still loading or unreachable: the header says so */ }
  }
  ui.model.replaceChildren();
  if (!model) {
    ui.model.textContent = "model: unknown (is the server up?)";
    return;
  }
  ui.model.append(el("span", {className: "model-id", "data-testid": "model-id", text: model.id}));
  const how = model.quantization === "nf4" ? "nf4" : model.dtype;
  const where = [model.device, how].filter(Boolean).join(", ");
  if (where) ui.model.append(el("span", {className: "hint", text: ` ${where}`}));
  if (model.device === "cpu") {
    ui.model.append(el("span", {className: "badge", "data-testid": "cpu-fallback", title: model.note || "",
      text: "CPU fallback"}));
  }
  document.title = `${model.id} · Qwen2.5 playground`;
}

// ---- session and socket ---------------------------------------------------------------------------------------
async function createSession() {
  let tools;
  try {
    tools = readTools();
    readCanned();  // checked now so a typo shows up before the first tool call, not during it
  } catch (err) {
    settingsError(err.message);
    return;
  }
  settingsError("");
  ui.create.disabled = true;
  try {
    const body = await postJson("create_session", {tools});
    closeSocket("a new session was created");
    state.sessionId = body.session_id;
    state.lastSeq = 0;
    state.abandoned = null;
    ui.sessionId.textContent = `session ${body.session_id}`;
    const names = tools.map((t) => (t && (t.name || (t.function && t.function.name))) || "?");
    showNote(`New session with ${tools.length} tool(s)${names.length ? `: ${names.join(", ")}` : ""}.`);
    await connect();
  } catch (err) {
    showError(`Could not create a session: ${err.title || err.message}`, err.details);
    settingsError(err.title || err.message);
  } finally {
    ui.create.disabled = false;
    refreshButtons();
  }
}

// A socket reopened after a drop resumes after the last notification received, so an answer still running goes
// on where it was; one opened by hand (Reconnect) starts with the live stream.
async function connect() {
  if (state.sessionId === null) return;
  setStatus(state.resuming ? "reconnecting…" : "connecting…", "busy");
  let url;
  try {
    url = await socketUrl(state.sessionId, state.resuming ? state.lastSeq : null);
  } catch (err) {
    if (state.resuming && retryResume(connect)) return;
    if (state.turn) endTurnLocally("socket closed");  // gave up resuming: the answer will not come here
    refreshButtons();
    setStatus("not connected", "error");
    showError(`Could not get a WebSocket ticket: ${err.title || err.message}`, err.details);
    return;
  }
  const ws = new WebSocket(url);
  state.ws = ws;
  ws.addEventListener("open", () => onOpen(ws));
  ws.addEventListener("message", (event) => onMessage(ws, event));
  ws.addEventListener("close", (event) => onClose(ws, event));
}

function onOpen(ws) {
  if (ws !== state.ws) return;
  state.connected = true;
  state.resuming = null;
  ws.wasOpen = true;
  cancelAbandoned();  // a turn given up on the page: its task is stopped (Send waits for its end)
  setStatus("connected", "ok");
  refreshButtons();
  ui.message.focus();
}

function onClose(ws, event) {
  if (ws !== state.ws) return;  // an old session's socket, closed on purpose
  state.ws = null;
  state.connected = false;
  if (resumeAfterClose(ws, event, connect)) return;
  state.resuming = null;
  if (state.turn) endTurnLocally("socket closed");  // the server cancelled the task (or never will resume it)
  setStatus("disconnected", "error");
  if (ws.wasOpen) {
    showError(`Socket closed (code ${event.code}${event.reason ? `: ${event.reason}` : ""}).`,
      "The session is kept on the server: use Reconnect to continue the conversation.");
  } else {
    // A refused handshake gives the page no HTTP status (browsers hide it), only close code 1006.
    showError(`Could not open the WebSocket (code ${event.code}).`,
      "The handshake was refused (unknown or expired session, missing or wrong API key or ticket, " +
      "a foreign Origin, or another socket already attached to this session) or the server is unreachable.");
  }
  refreshButtons();
}

function closeSocket(reason) {
  const ws = state.ws;
  state.ws = null;  // set first so onClose ignores this deliberate close
  state.connected = false;
  state.resuming = null;
  if (state.turn) endTurnLocally(reason);
  if (ws) ws.close(1000, "closed by the playground");
  refreshButtons();
}

// ---- what arrives -----------------------------------------------------------------------------------------------
function onMessage(ws, event) {
  if (ws !== state.ws) return;
  let message;
  try {
    message = JSON.parse(event.data);
  } catch (err) {
    showError("The server sent a message that is not JSON.", String(event.data).slice(0, 500));
    return;
  }
  for (const item of Array.isArray(message) ? message : [message]) {
    if (item && typeof item.method === "string") onNotification(item.method, item.params || {});
    else if (item) onResponse(item);
  }
}

function onResponse(message) {
  const pending = state.pending.get(message.id);
  state.pending.delete(message.id);
  const method = pending ? pending.method : "request";
  if (resentGenerateStarted(pending, message)) return;
  if (message.error) {
    if (!pending || !pending.quiet) showError(rpcErrorTitle(message.error, method), formatDetails(message.error.data));
    if (pending && pending.fail) pending.fail(message.error);
  } else if (pending && pending.ok) {
    pending.ok(message.result);
  }
}

function onNotification(method, params) {
  if (method === "resumed") return onResumed(params);
  if (skipNotification(method, params)) return undefined;
  const turn = state.turn;
  // Every notification names its task; one belonging to no running turn (a late one) is ignored.
  if (!turn || (turn.taskId && params.task_id && params.task_id !== turn.taskId)) return;
  switch (method) {
    case "text_chunk": return onTextChunk(turn, params.chunk);
    case "function_call_request": return onCallRequest(turn, params.tool_calls || []);
    case "final_text": return onFinalText(turn, params.final_text);
    case "error": return showError(rpcErrorTitle(params.error || {}, "The task failed"),
      formatDetails((params.error || {}).data));
    case "end": return onEnd(turn, params);
    default: return undefined;  // unknown notifications are for newer clients
  }
}

// ---- what the user does ------------------------------------------------------------------------------------------
function sendMessage() {
  const text = ui.message.value;
  if (!text.trim() || !state.connected || state.turn) return;
  const entry = showUserMessage(text);
  ui.message.value = "";
  const turn = newTurn();
  state.turn = turn;
  refreshButtons();
  rpc("generate", {message: text, ...samplingParams()}, {
    ok: (result) => {
      turn.taskId = result.task_id;
      turn.node.dataset.taskId = result.task_id;
    },
    fail: () => {  // the task never started (no end will come) and the message is not in the conversation
      turn.node.remove();
      entry.classList.add("rejected");
      entry.querySelector(".who").textContent = "you (not sent: see the error below)";
      if (state.turn === turn) state.turn = null;
      refreshButtons();
    },
  });
}

function showUserMessage(text) {
  return addEntry(el("div", {className: "msg user", "data-testid": "user-msg"},
    el("div", {className: "who", text: "you"}), el("div", {className: "text", text})));
}

function cancelTask() {
  const turn = state.turn;
  if (!turn || !state.connected) return;
  turn.cancelling = true;
  refreshButtons();
  rpc("cancel", turn.taskId ? {task_id: turn.taskId} : {}, {
    fail: () => { turn.cancelling = false; refreshButtons(); },
  });
}

// ---- wiring -----------------------------------------------------------------------------------------------------
function init() {
  ui.tools.value = JSON.stringify(DEFAULT_TOOLS, null, 2);
  ui.create.addEventListener("click", createSession);
  ui.reconnect.addEventListener("click", connect);
  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    sendMessage();
  });
  ui.message.addEventListener("keydown", (event) => {
    // Enter sends, Shift+Enter adds a line; not while an input method is composing a character.
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      ui.composer.requestSubmit();
    }
  });
  ui.cancel.addEventListener("click", cancelTask);
  ui.apiKey.addEventListener("change", showModel);  // with keys, /v1/models answers once the key is in
  refreshButtons();
  showModel();
}

init();
