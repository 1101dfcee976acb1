// DOM helpers for the playground. All model and user text goes into the page through textContent (or text
// nodes), never innerHTML, so nothing it contains can run as markup.

export const $ = (id) => document.getElementById(id);

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else if (key === "className") node.className = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);  // strings become text nodes: safe for any content
  return node;
}

export function pretty(value) {
  return typeof value === "string" ? value : JSON.stringify(value, null, 2);
}

export function formatMs(ms) {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

// Names for the server's JSON-RPC error codes (README "Errors"), shown next to the number.
const ERROR_NAMES = {
  "-32700": "parse error", "-32600": "invalid request", "-32601": "unknown method", "-32602": "invalid params",
  "-32603": "internal error", "-32000": "generation failed", "-32001": "session busy",
  "-32002": "nothing to cancel", "-32003": "unknown task", "-32004": "prompt too long",
  "-32005": "tool result timeout", "-32006": "overloaded", "-32007": "not waiting for tool results",
  "-32008": "engine unavailable", "-32009": "rate limited", "-32010": "stream incomplete",
  "-32011": "task lost",
};

export function rpcErrorTitle(error, context) {
  const name = ERROR_NAMES[String(error.code)];
  return `${context}: error ${error.code}${name ? ` (${name})` : ""}: ${error.message}`;
}

// Validation details ([{loc, msg, type}], from HTTP 422 and JSON-RPC -32602) read best as "loc: msg" lines.
export function formatDetails(details) {
  if (Array.isArray(details) && details.every((d) => d && typeof d === "object" && "loc" in d && "msg" in d)) {
    return details.map((d) => `${[].concat(d.loc).join(".")}: ${d.msg}`).join("\n");
  }
  return details;
}

// ---- the transcript ------------------------------------------------------------------------------------------
const transcript = () => $("transcript");

export function scrollToEnd() {
  const node = transcript();
  node.scrollTop = node.scrollHeight;
}

// Every entry goes through here: the first one replaces the empty-state hint.
export function addEntry(node) {
  const hint = $("empty-hint");
  if (hint) hint.hidden = true;
  transcript().append(node);
  scrollToEnd();
  return node;
}

export function showNote(text) {
  return addEntry(el("div", {className: "msg note", "data-testid": "note", text}));
}

// An error entry in the transcript: a one-line title, and optional details (any JSON) below it.
export function showError(title, details) {
  const entry = el("div", {className: "msg error", "data-testid": "error", role: "alert"},
    el("div", {className: "error-title", text: title}));
  if (details !== undefined && details !== null && details !== "") {
    entry.append(el("pre", {className: "error-details", text: pretty(details)}));
  }
  return addEntry(entry);
}
