// The settings panel: tools and canned results (checked as JSON before anything is sent) and sampling.
import {ui} from "./state.js";

// The seed's weather tool, as scripts/weather_client.py and examples/tools.json define it.
export const DEFAULT_TOOLS = [{
  name: "get_weather",
  description: "Get the current weather for a city.",
  parameters: {
    type: "object",
    properties: {location: {type: "string", description: "City name"},
      unit: {type: "string", enum: ["celsius", "fahrenheit"]}},
    required: ["location"],
  },
}];

export function settingsError(message) {
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

export function readTools() {
  const value = parseJsonField(ui.tools, "Tools", (v) =>
    v === undefined || Array.isArray(v) ? "" : "must be a JSON array of tools ([] for none)");
  return value || [];
}

export function readCanned() {
  const value = parseJsonField(ui.canned, "Canned results", (v) =>
    v === undefined || (v !== null && typeof v === "object" && !Array.isArray(v))
      ? "" : 'must be a JSON object such as {"get_weather": {"temperature": "15°C"}}');
  return value || {};
}

export function samplingParams() {
  const params = {};
  // Number inputs give "" for empty or malformed text: leave those out and let the server's defaults apply.
  if (ui.maxNewTokens.value !== "") params.max_new_tokens = Number(ui.maxNewTokens.value);
  if (ui.temperature.value !== "") params.temperature = Number(ui.temperature.value);
  // A long answer: generation runs on past the end of the turn until max_new_tokens (so Cancel can be tried).
  if (ui.ignoreEos.checked) params.ignore_eos = true;
  return params;
}
