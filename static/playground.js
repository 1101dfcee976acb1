// The web playground: a chat client for the server's WebSocket JSON-RPC protocol (see README "API").
//
// Plain browser JavaScript, no build step and no external resources. All model and user text goes into
// the page through textContent (or text nodes), never innerHTML, so nothing it contains can run as markup.
// URLs are relative to the page, so it works behind any host, port or path prefix.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const ui = {
    status: $("connection-status"), apiKey: $("api-key"), tools: $("tools-json"), canned: $("canned-json"),
    settingsError: $("settings-error"), create: $("create-session"), reconnect: $("reconnect"),
    sessionId: $("session-id"), maxNewTokens: $("max-new-tokens"), temperature: $("temperature"),
    transcript: $("transcript"), composer: $("composer"), message: $("message"), send: $("send"),
    cancel: $("cancel"), turnTemplate: $("turn-template"),
  };

  const DEFAULT_TOOLS = [{
    name: "get_weather",
    description: "Current weather for a city",
    parameters: {type: "object", properties: {location: {type: "string"}}, required: ["location"]},
  }];

  // Names for the server's JSON-RPC error codes (README "Errors"), shown next to the number.
  const ERROR_NAMES = {
    "-32700": "parse error", "-32600": "invalid request", "-32601": "unknown method", "-32602": "invalid params",
    "-32603": "internal error", "-32000": "generation failed", "-32001": "session busy",
    "-32002": "nothing to cancel", "-32003": "unknown task", "-32004": "prompt too long",
    "-32005": "tool result timeout", "-32006": "overloaded", "-32007": "not waiting for tool results",
    "-32008": "engine unavailable", "-32009": "rate limited", "-32010": "stream incomplete",
    "-32011": "task lost",
  };
  // A dropped socket is reopened with ?resume_from=<last seq> for this long; the server replays what was missed.
  const RESUME_FOR_MS = 60_000;
  const NO_RESUME_CODES = [1008, 4000];  // refused by policy; replaced by a newer socket of this session

  const state = {
    sessionId: null,
    ws: null,
    connected: false,
    nextId: 1,
    pending: new Map(),  // JSON-RPC id -> {method, text, sentOn, ok, fail}
    turn: null,          // the running task's turn (see newTurn), or null when idle
    lastSeq: 0,          // the seq of the last notification received: where a resumed socket starts
    resuming: null,      // {until, delay} while a dropped socket is being reopened
    abandoned: null,     // a task whose turn ended here when its socket was given up: cancelled on reconnect
  };

  // ---- small DOM helpers -------------------------------------------------------------------------------------
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (key === "text") node.textContent = value;
      else if (key === "className") node.className = value;
      else node.setAttribute(key, value);
    }
    node.append(...children);  // strings become text nodes: safe for any content
    return node;
  }

  function scrollToEnd() {
    ui.transcript.scrollTop = ui.transcript.scrollHeight;
  }

  function addEntry(node) {
    ui.transcript.append(node);
    scrollToEnd();
    return node;
  }

  function pretty(value) {
    return typeof value === "string" ? value : JSON.stringify(value, null, 2);
  }

  function showNote(text) {
    return addEntry(el("div", {className: "msg note", "data-testid": "note", text}));
  }

  // An error entry in the transcript: a one-line title, and optional details (any JSON) below it.
  function showError(title, details) {
    const entry = el("div", {className: "msg error", "data-testid": "error", role: "alert"},
      el("div", {className: "error-title", text: title}));
    if (details !== undefined && details !== null && details !== "") {
      entry.append(el("pre", {className: "error-details", text: pretty(details)}));
    }
    return addEntry(entry);
  }

  // Validation details ([{loc, msg, type}], from HTTP 422 and JSON-RPC -32602) read best as "loc: msg" lines.
  function formatDetails(details) {
    if (Array.isArray(details) && details.every((d) => d && typeof d === "object" && "loc" in d && "msg" in d)) {
      return details.map((d) => `${[].concat(d.loc).join(".")}: ${d.msg}`).join("\n");
    }
    return details;
  }

  function rpcErrorTitle(error, context) {
    const name = ERROR_NAMES[String(error.code)];
    return `${context}: error ${error.code}${name ? ` (${name})` : ""}: ${error.message}`;
  }

  function setStatus(text, kind) {
    ui.status.textContent = text;
    ui.status.className = `status status-${kind}`;
  }

  // Send is possible on an open socket with no running task; Cancel only while a task runs.
  function refreshButtons() {
    const busy = state.turn !== null;
    ui.send.disabled = !state.connected || busy || state.abandoned !== null;
    ui.cancel.disabled = !state.connected || !busy || state.turn.cancelling;
    ui.reconnect.disabled = state.sessionId === null || state.connected || state.resuming !== null;
  }

  // ---- settings panel ------------------------------------------------------------------------------------------
  function settingsError(message) {
    ui.settingsError.textContent = message;
    ui.settingsError.hidden = !message;
  }

  // Parse a JSON textarea; `check` returns a problem string or "". Throws an Error with a readable message.
  function parseJsonField(textarea, label, check) {
    const text = textarea.value.trim();
    let value;
    try {
      value = text ? JSON.parse(text) : undefined;
    } catch (err) {
      throw new Error(`${label} is not valid JSON: ${err.message}`);
    }
    const problem = check(value);
    if (problem) throw new Error(`${label}: ${problem}`);
    return value;
  }

  function readTools() {
    const value = parseJsonField(ui.tools, "Tools", (v) =>
      v === undefined || Array.isArray(v) ? "" : "must be a JSON array of tools ([] for none)");
    return value || [];
  }

  function readCanned() {
    const value = parseJsonField(ui.canned, "Canned results", (v) =>
      v === undefined || (v !== null && typeof v === "object" && !Array.isArray(v))
        ? "" : 'must be a JSON object such as {"get_weather": {"temperature": "15°C"}}');
    return value || {};
  }

  function samplingParams() {
    const params = {};
    // Number inputs give "" for empty or malformed text: leave those out and let the server's defaults apply.
    if (ui.maxNewTokens.value !== "") params.max_new_tokens = Number(ui.maxNewTokens.value);
    if (ui.temperature.value !== "") params.temperature = Number(ui.temperature.value);
    return params;
  }

  // ---- HTTP ------------------------------------------------------------------------------------------------------
  function authHeaders() {
    const key = ui.apiKey.value.trim();
    return key ? {Authorization: `Bearer ${key}`} : {};
  }

  // A readable description of a failed HTTP call: status, the server's error type and message, and each
  // validation detail as "loc: msg".
  function describeHttpError(status, body) {
    const error = body && typeof body === "object" && body.error ? body.error : null;
    if (!error) return {title: `HTTP ${status}`, details: body};
    const title = `HTTP ${status}${error.type ? ` ${error.type}` : ""}: ${error.message || ""}`;
    let details = formatDetails(error.details);
    if (status === 401 && details === undefined) details = "Fill in the API key field (this server requires one).";
    return {title, details};
  }

  // POST JSON to a path relative to the page; resolves to the parsed body, throws {title, details} otherwise.
  async function postJson(path, body) {
    let response;
    try {
      response = await fetch(new URL(path, document.baseURI), {
        method: "POST",
        headers: {"Content-Type": "application/json", ...authHeaders()},
        body: JSON.stringify(body),
      });
    } catch (err) {
      // A network failure, or a request the browser refuses to send (e.g. a key with non-ASCII characters).
      throw {title: `POST ${path} failed: the server is unreachable or the request is invalid`, details: String(err)};
    }
    const text = await response.text();
    let parsed = text;
    try {
      parsed = text ? JSON.parse(text) : null;
    } catch (_) { /* keep the raw text for the error message */ }
    if (!response.ok) throw describeHttpError(response.status, parsed);
    return parsed;
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
      showNote(`Session ${body.session_id} created with ${tools.length} tool(s).`);
      await connect();
    } catch (err) {
      showError(`Could not create a session: ${err.title || err.message}`, err.details);
      settingsError(err.title || err.message);
    } finally {
      ui.create.disabled = false;
      refreshButtons();
    }
  }

  // The WebSocket URL for the session: same host as the page, ws: or wss: to match http: or https:. With an
  // API key, a single-use ticket goes in the query, since browsers cannot set headers on a WebSocket and the
  // long-lived key must never appear in a URL.
  async function socketUrl(sessionId, resumeFrom) {
    const url = new URL(`ws/${encodeURIComponent(sessionId)}`, document.baseURI);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    if (resumeFrom !== null) url.searchParams.set("resume_from", String(resumeFrom));
    if (ui.apiKey.value.trim()) {
      const body = await postJson("auth/ticket", {session_id: sessionId});
      url.searchParams.set("ticket", body.ticket);
    }
    return url.toString();
  }

  // A socket reopened after a drop resumes after the last notification received, so an answer still running
  // goes on where it was; one opened by hand (Reconnect) starts with the live stream.
  async function connect() {
    if (state.sessionId === null) return;
    setStatus(state.resuming ? "reconnecting…" : "connecting…", "busy");
    let url;
    try {
      url = await socketUrl(state.sessionId, state.resuming ? state.lastSeq : null);
    } catch (err) {
      if (state.resuming && retryResume()) return;
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
    if (state.abandoned) {  // its turn is gone from the page: stop it (Send waits for its end)
      const taskId = state.abandoned;
      const done = () => { if (state.abandoned === taskId) state.abandoned = null; refreshButtons(); };
      rpc("cancel", {task_id: taskId}, {fail: done, quiet: true});
    }
    setStatus("connected", "ok");
    refreshButtons();
    ui.message.focus();
  }

  function onClose(ws, event) {
    if (ws !== state.ws) return;  // an old session's socket, closed on purpose
    state.ws = null;
    state.connected = false;
    if ((ws.wasOpen || state.resuming) && !NO_RESUME_CODES.includes(event.code)) {
      if (!state.resuming) state.resuming = {until: performance.now() + RESUME_FOR_MS, delay: 250};
      if (retryResume()) return;
    }
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

  // Another try at reopening a dropped socket, unless the time for it is over; whether one was scheduled.
  function retryResume() {
    const resuming = state.resuming;
    if (performance.now() + resuming.delay > resuming.until) return false;
    setStatus("reconnecting…", "busy");
    refreshButtons();
    setTimeout(() => { if (state.resuming === resuming && !state.ws) connect(); }, resuming.delay);
    resuming.delay = Math.min(2 * resuming.delay, 2000);
    return true;
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

  // ---- JSON-RPC ---------------------------------------------------------------------------------------------------
  // A request waits in `pending` until its response; one whose socket dropped first is sent again once the
  // server has replayed what was missed (see onResumed).
  function rpc(method, params, handlers = {}) {
    const id = state.nextId++;
    const pending = {method, text: JSON.stringify({jsonrpc: "2.0", id, method, params}), sentOn: null, ...handlers};
    state.pending.set(id, pending);
    if (state.connected) {
      state.ws.send(pending.text);
      pending.sentOn = state.ws;
    }
    return id;
  }

  // After a resumed socket's replay: requests sent on the old socket go again, except a generate whose task
  // the server names (it did start); a resent generate answered "session busy" started too.
  function onResumed(params) {
    const turn = state.turn;
    if (turn && !turn.taskId && params.task_id) adoptTask(turn, params.task_id);
    if (turn && turn.taskId && params.task_id !== turn.taskId) {  // it ended, but its end never reached us
      showError("The task is no longer running on the server and its outcome was lost with the socket.",
        "The conversation on the server holds whatever the task completed; send the message again if needed.");
      endTurnLocally("lost");
      refreshButtons();
    }
    for (const pending of state.pending.values()) {
      if (pending.sentOn === state.ws) continue;
      pending.resent = true;
      state.ws.send(pending.text);
      pending.sentOn = state.ws;
    }
  }

  function generatePending() {
    return [...state.pending.values()].some((pending) => pending.method === "generate");
  }

  // The running turn's task, learnt from its notifications when the generate response was lost with a socket.
  function adoptTask(turn, taskId) {
    turn.taskId = taskId;
    turn.node.dataset.taskId = taskId;
    for (const [id, pending] of state.pending) {
      if (pending.method === "generate") state.pending.delete(id);
    }
  }

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
    const busyWith = message.error && message.error.code === -32001 && (message.error.data || {}).task_id;
    if (pending && pending.resent && method === "generate" && busyWith) {
      if (pending.ok) pending.ok({status: "processing", task_id: busyWith});  // the first one got through
      return;
    }
    if (message.error) {
      if (!pending || !pending.quiet) showError(rpcErrorTitle(message.error, method), formatDetails(message.error.data));
      if (pending && pending.fail) pending.fail(message.error);
    } else if (pending && pending.ok) {
      pending.ok(message.result);
    }
  }

  function onNotification(method, params) {
    if (method === "resumed") return onResumed(params);
    if (typeof params.seq === "number") {
      if (params.seq <= state.lastSeq) return;  // already shown: a replay may overlap what arrived before a drop
      state.lastSeq = params.seq;
    }
    if (params.task_id && params.task_id === state.abandoned) {
      if (method === "end") {
        state.abandoned = null;
        refreshButtons();
      }
      return;
    }
    const turn = state.turn;
    if (turn && !turn.taskId && params.task_id && generatePending()) adoptTask(turn, params.task_id);
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

  // ---- a turn: one generate task, from the request to its end ------------------------------------------------------
  function newTurn() {
    const node = ui.turnTemplate.content.firstElementChild.cloneNode(true);
    addEntry(node);
    return {
      taskId: null,
      node,
      answer: node.querySelector(".answer"),
      calls: node.querySelector(".calls"),
      stats: node.querySelector(".stats"),
      startedAt: performance.now(),
      firstAt: null,      // first text_chunk or function_call_request
      toolWaitMs: 0,      // time spent waiting for the user's tool results: not generation time
      waitingSince: null,
      cancelling: false,
    };
  }

  function sendMessage() {
    const text = ui.message.value;
    if (!text.trim() || !state.connected || state.turn) return;
    const entry = addEntry(el("div", {className: "msg user", "data-testid": "user-msg"},
      el("div", {className: "who", text: "you"}), el("div", {className: "text", text})));
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

  function markFirstOutput(turn) {
    if (turn.firstAt === null) turn.firstAt = performance.now();
  }

  function onTextChunk(turn, chunk) {
    markFirstOutput(turn);
    turn.answer.append(chunk);  // a text node: streamed text is never parsed as HTML
    scrollToEnd();
  }

  function onFinalText(turn, finalText) {
    // final_text is all chunks concatenated; show it as the authoritative answer in case a chunk went missing.
    if (turn.answer.textContent !== finalText) turn.answer.textContent = finalText;
    turn.node.classList.add("complete");
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

  function onEnd(turn, params) {
    if (turn.waitingSince !== null) turn.toolWaitMs += performance.now() - turn.waitingSince;
    renderStats(turn, params.finish_reason, params.usage || {});
    turn.node.classList.add("complete");  // no more text: drop the "…" placeholder of an empty answer
    disableCards(turn, "not answered");
    state.turn = null;
    refreshButtons();
  }

  // The turn ends without an `end` from the server (its socket went away).
  function endTurnLocally(reason) {
    const turn = state.turn;
    if (turn.taskId) state.abandoned = turn.taskId;  // it may still run on the server (INFERENCE_RESUME_GRACE_S)
    turn.node.classList.add("aborted");
    turn.stats.hidden = false;
    turn.stats.replaceChildren(el("span", {className: "finish finish-error", "data-testid": "stat-finish",
      text: reason}));
    disableCards(turn, reason);
    state.turn = null;
  }

  function formatMs(ms) {
    return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
  }

  // Usage from the server, timings measured here. Tokens/s divides by the time the server was generating:
  // the total minus the time the task waited for tool results from the user.
  function renderStats(turn, finishReason, usage) {
    const now = performance.now();
    const totalMs = now - turn.startedAt;
    const generatingMs = Math.max(1, totalMs - turn.toolWaitMs);
    const completion = usage.completion_tokens || 0;
    const stat = (testid, label, value) => el("span", {className: "stat", "data-testid": testid},
      el("span", {className: "stat-label", text: label}), el("span", {className: "stat-value", text: value}));
    const parts = [
      el("span", {className: `finish finish-${finishReason}`, "data-testid": "stat-finish", text: finishReason}),
      stat("stat-prompt", "prompt", String(usage.prompt_tokens ?? "?")),
      stat("stat-completion", "completion", String(usage.completion_tokens ?? "?")),
      stat("stat-cached", "cached", String(usage.cached_tokens ?? "?")),
      stat("stat-ttfc", "first chunk", turn.firstAt === null ? "–" : formatMs(turn.firstAt - turn.startedAt)),
      stat("stat-total", "total", formatMs(totalMs)),
      stat("stat-tps", "tok/s", (completion / (generatingMs / 1000)).toFixed(1)),
    ];
    if (turn.toolWaitMs > 0) parts.push(stat("stat-tool-wait", "tool wait (excluded)", formatMs(turn.toolWaitMs)));
    turn.stats.replaceChildren(...parts);
    turn.stats.hidden = false;
    turn.node.classList.add(`finished-${finishReason}`);
  }

  // ---- tool calls ------------------------------------------------------------------------------------------------
  // One card per function_call_request: each call's tool, call id and arguments, and a JSON textarea for its
  // result. Submit sends one tool_result with every result; canned results answer it without a click.
  function onCallRequest(turn, calls) {
    // A request resent after a resume repeats calls this page shows already: their card stays as it is.
    const shown = new Set([...turn.calls.querySelectorAll("[data-call-id]")].map((node) => node.dataset.callId));
    if (calls.length && calls.every((call) => call.call_id && shown.has(call.call_id))) return;
    markFirstOutput(turn);
    turn.waitingSince = performance.now();
    const card = el("div", {className: "tool-card", "data-testid": "tool-card"},
      el("div", {className: "tool-card-title", text: `The model called ${calls.length} tool(s)`}));
    const inputs = calls.map((call) => {
      const input = el("textarea", {className: "tool-result-input", "data-testid": "tool-result-input", rows: "3",
        spellcheck: "false", placeholder: 'result as JSON, e.g. {"temperature": "15°C"} or "some text"'});
      const isError = el("input", {type: "checkbox", "data-testid": "tool-is-error"});
      card.append(el("div", {className: "tool-call", "data-testid": "tool-call", "data-call-id": call.call_id || ""},
        el("div", {className: "tool-call-head"},
          el("span", {className: "tool-name", "data-testid": "tool-name", text: call.tool}),
          el("span", {className: "mono small", text: call.call_id || ""})),
        el("pre", {className: "tool-args", "data-testid": "tool-args", text: pretty(call.parameters || {})}),
        ...(call.validation_error ? [el("div", {className: "field-error", "data-testid": "tool-validation-error",
          text: `invalid call: ${call.validation_error}`})] : []),
        input,
        el("label", {className: "inline"}, isError, " the tool failed (send as an error)")));
      return {call, input, isError};
    });
    const problem = el("div", {className: "field-error", "data-testid": "tool-error", role: "alert"});
    problem.hidden = true;
    const submit = el("button", {type: "button", "data-testid": "tool-submit", text: "Submit results"});
    const status = el("span", {className: "tool-status", "data-testid": "tool-status"});
    card.append(problem, el("div", {className: "row"}, submit, status));
    turn.calls.append(card);
    scrollToEnd();

    const form = {card, inputs, problem, submit, status, sent: false};
    submit.addEventListener("click", () => submitResults(turn, form));
    if (fillCanned(inputs)) {
      status.textContent = "answered automatically from canned results";
      submitResults(turn, form);
    } else {
      inputs[0].input.focus();
    }
  }

  // Fill each call that has a canned result; true when every call got one (so the card can answer itself).
  function fillCanned(inputs) {
    let canned;
    try {
      canned = readCanned();
    } catch (err) {
      showError(err.message, "Answer this tool call by hand, or fix the canned results.");
      return false;
    }
    let all = inputs.length > 0;
    for (const {call, input} of inputs) {
      // The textarea holds JSON, so a canned string shows quoted, exactly as it will be sent.
      if (Object.prototype.hasOwnProperty.call(canned, call.tool)) {
        input.value = JSON.stringify(canned[call.tool], null, 2);
      } else {
        all = false;
      }
    }
    return all;
  }

  function collectResults(form) {
    return form.inputs.map(({call, input, isError}, index) => {
      let result;
      try {
        result = JSON.parse(input.value);
      } catch (err) {
        input.focus();
        throw new Error(`Result ${index + 1} (${call.tool}) is not valid JSON: ${err.message}. ` +
          'Text must be quoted, e.g. "sunny".');
      }
      const item = {tool_name: call.tool, result, isError: isError.checked, call_id: call.call_id};
      if (isError.checked) item.error_message = pretty(result);
      return item;
    });
  }

  function submitResults(turn, form) {
    if (form.sent || state.turn !== turn || !state.connected) return;
    let results;
    try {
      results = collectResults(form);
    } catch (err) {
      form.problem.textContent = err.message;
      form.problem.hidden = false;
      return;
    }
    form.problem.hidden = true;
    setCardEnabled(form, false);
    form.sent = true;
    if (turn.waitingSince !== null) {
      turn.toolWaitMs += performance.now() - turn.waitingSince;
      turn.waitingSince = null;
    }
    rpc("tool_result", {task_id: turn.taskId, results}, {
      ok: () => { form.status.textContent ||= "sent"; form.card.classList.add("sent"); },
      fail: () => {  // e.g. the task ended meanwhile; let the user retry while it still runs
        form.sent = false;
        setCardEnabled(form, state.turn === turn);
      },
    });
  }

  function setCardEnabled(form, enabled) {
    for (const {input, isError} of form.inputs) {
      input.disabled = !enabled;
      isError.disabled = !enabled;
    }
    form.submit.disabled = !enabled;
  }

  // When the task ends, cards still waiting for an answer can no longer be answered.
  function disableCards(turn, reason) {
    for (const card of turn.calls.querySelectorAll(".tool-card:not(.sent)")) {
      for (const control of card.querySelectorAll("textarea, input, button")) control.disabled = true;
      const status = card.querySelector(".tool-status");
      if (status && !status.textContent) status.textContent = reason;
    }
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
    refreshButtons();
  }

  init();
})();
