// Tool calls: one card per function_call_request, with each call's tool, call id and arguments and a JSON
// textarea for its result. Submit sends one tool_result with every result; canned results answer it
// without a click.
import {el, pretty, scrollToEnd, showError} from "./dom.js";
import {readCanned} from "./settings.js";
import {rpc, state} from "./state.js";
import {markFirstOutput} from "./turns.js";

export function onCallRequest(turn, calls) {
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
