// Resuming a dropped socket: it is reopened by itself with ?resume_from=<last seq> for a minute; the server replays
// what was missed, then says `resumed`; notifications already shown are dropped, the running turn adopts the task
// the replay names, and requests still unanswered are sent again. A turn whose socket was given up leaves its task
// "abandoned": it is cancelled once a socket opens again (Send waits for its end).
import {showError} from "./dom.js";
import {refreshButtons, rpc, setStatus, state} from "./state.js";
import {endTurnLocally} from "./turns.js";

const RESUME_FOR_MS = 60_000;
const NO_RESUME_CODES = [1008, 4000];  // refused by policy; replaced by a newer socket of this session

// After `ws` closed: whether another try at reopening it was scheduled (`connect` makes it). A socket that never
// opened is retried only while resuming; a refused or replaced one never.
export function resumeAfterClose(ws, event, connect) {
  if (!(ws.wasOpen || state.resuming) || NO_RESUME_CODES.includes(event.code)) return false;
  if (!state.resuming) state.resuming = {until: performance.now() + RESUME_FOR_MS, delay: 250};
  return retryResume(connect);
}

// Another try at reopening a dropped socket, unless the time for it is over; whether one was scheduled.
export function retryResume(connect) {
  const resuming = state.resuming;
  if (performance.now() + resuming.delay > resuming.until) {
    state.resuming = null;
    return false;
  }
  setStatus("reconnecting…", "busy");
  refreshButtons();
  setTimeout(() => { if (state.resuming === resuming && !state.ws) connect(); }, resuming.delay);
  resuming.delay = Math.min(2 * resuming.delay, 2000);
  return true;
}

// A socket opened: a task whose turn was given up on the page is stopped.
export function cancelAbandoned() {
  if (!state.abandoned) return;
  const taskId = state.abandoned;
  const done = () => { if (state.abandoned === taskId) state.abandoned = null; refreshButtons(); };
  rpc("cancel", {task_id: taskId}, {fail: done, quiet: true});
}

// Whether a notification is one to skip: seen already (a replay may overlap what arrived before a drop), or of
// the abandoned task (whose end lets Send go again). One for the running turn whose generate response was lost
// with a socket tells the turn its task.
export function skipNotification(method, params) {
  if (typeof params.seq === "number") {
    if (params.seq <= state.lastSeq) return true;
    state.lastSeq = params.seq;
  }
  if (params.task_id && params.task_id === state.abandoned) {
    if (method === "end") {
      state.abandoned = null;
      refreshButtons();
    }
    return true;
  }
  const turn = state.turn;
  if (turn && !turn.taskId && params.task_id && generatePending()) adoptTask(turn, params.task_id);
  return false;
}

// After a resumed socket's replay: requests sent on the old socket go again, except a generate whose task the
// server names (it did start).
export function onResumed(params) {
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

// A resent generate answered "session busy" with a task: the first one got through, and that task is its.
export function resentGenerateStarted(pending, message) {
  const busyWith = message.error && message.error.code === -32001 && (message.error.data || {}).task_id;
  if (!(pending && pending.resent && pending.method === "generate" && busyWith)) return false;
  if (pending.ok) pending.ok({status: "processing", task_id: busyWith});
  return true;
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
