// A turn: one generate task, from the request to its end, with its streamed answer and its statistics.
import {addEntry, el, formatMs, scrollToEnd} from "./dom.js";
import {refreshButtons, state, ui} from "./state.js";

export function newTurn() {
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

export function markFirstOutput(turn) {
  if (turn.firstAt === null) turn.firstAt = performance.now();
}

export function onTextChunk(turn, chunk) {
  markFirstOutput(turn);
  turn.answer.append(chunk);  // a text node: streamed text is never parsed as HTML
  scrollToEnd();
}

export function onFinalText(turn, finalText) {
  // final_text is all chunks concatenated; show it as the authoritative answer in case a chunk went missing.
  if (turn.answer.textContent !== finalText) turn.answer.textContent = finalText;
  turn.node.classList.add("complete");
}

export function onEnd(turn, params) {
  if (turn.waitingSince !== null) turn.toolWaitMs += performance.now() - turn.waitingSince;
  renderStats(turn, params.finish_reason, params.usage || {});
  turn.node.classList.add("complete");  // no more text: drop the "…" placeholder of an empty answer
  disableCards(turn, "not answered");
  state.turn = null;
  refreshButtons();
}

// The turn ends without an `end` from the server (its socket went away).
export function endTurnLocally(reason) {
  const turn = state.turn;
  if (turn.taskId) state.abandoned = turn.taskId;  // it may still run on the server (INFERENCE_RESUME_GRACE_S)
  turn.node.classList.add("aborted");
  turn.stats.hidden = false;
  turn.stats.replaceChildren(el("span", {className: "finish finish-error", "data-testid": "stat-finish",
    text: reason}));
  disableCards(turn, reason);
  state.turn = null;
}

// When the task ends, tool cards still waiting for an answer can no longer be answered.
function disableCards(turn, reason) {
  for (const card of turn.calls.querySelectorAll(".tool-card:not(.sent)")) {
    for (const control of card.querySelectorAll("textarea, input, button")) control.disabled = true;
    const status = card.querySelector(".tool-status");
    if (status && !status.textContent) status.textContent = reason;
  }
}

// Usage from the server, timings measured here. Tokens/s divides by the time the server was generating:
// the total minus the time the task waited for tool results from the user.
function renderStats(turn, finishReason, usage) {
  const totalMs = performance.now() - turn.startedAt;
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
