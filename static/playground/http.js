// HTTP for the playground: JSON requests relative to the page (so it works behind any host, port or path
// prefix), the API key as a Bearer header, and readable errors.
import {formatDetails} from "./dom.js";
import {ui} from "./state.js";

export function authHeaders() {
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

// GET (body undefined) or POST JSON; resolves to the parsed body, throws {title, details, status} otherwise.
export async function requestJson(path, body) {
  const init = body === undefined ? {headers: authHeaders()} : {
    method: "POST", headers: {"Content-Type": "application/json", ...authHeaders()}, body: JSON.stringify(body)};
  let response;
  try {
    response = await fetch(new URL(path, document.baseURI), init);
  } catch (err) {
    // A network failure, or a request the browser refuses to send (e.g. a key with non-ASCII characters).
    throw {title: `${init.method || "GET"} ${path} failed: the server is unreachable or the request is invalid`,
      details: String(err)};
  }
  const text = await response.text();
  let parsed = text;
  try {
    parsed = text ? JSON.parse(text) : null;
  } catch (_) { /* keep the raw text for the error message */ }
  if (!response.ok) throw {...describeHttpError(response.status, parsed), status: response.status};
  return parsed;
}

export const postJson = (path, body) => requestJson(path, body);

// The WebSocket URL for the session: same host as the page, ws: or wss: to match http: or https:. With an
// API key, a single-use ticket goes in the query, since browsers cannot set headers on a WebSocket and the
// long-lived key must never appear in a URL. `resumeFrom` (a seq, or null): resume after that notification.
export async function socketUrl(sessionId, resumeFrom = null) {
  const url = new URL(`ws/${encodeURIComponent(sessionId)}`, document.baseURI);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  if (resumeFrom !== null) url.searchParams.set("resume_from", String(resumeFrom));
  if (ui.apiKey.value.trim()) {
    const body = await postJson("auth/ticket", {session_id: sessionId});
    url.searchParams.set("ticket", body.ticket);
  }
  return url.toString();
}
