// The playground page: task list, per-task input forms, streamed answers (optionally two side by side),
// the live /metrics panel and the admin actions.

import { ServerError, apiKey, imageUrl, request, setApiKey, streamGenerate } from "./api.js";
import { composition, createComposeControls, fillComposeTasks } from "./compose.js";
import { createForm } from "./forms.js";
import { startMetricsPanel } from "./metrics.js";

const $ = (selector) => document.querySelector(selector);
const state = { tasks: [], form: null, adminToken: "", composeRows: [] };

function showError(err) {
  const box = $("#error");
  box.textContent = err ? err.message : "";
  box.hidden = !err;
}

const number = (value) => (Number.isInteger(value) ? String(value) : value.toFixed(3));
const NOT_SCORES = new Set(["step", "num_sources"]);

/** Recorded metrics: training's held-out loss at the top level, `hub eval` scores under their split. */
function formatMetrics(metrics) {
  const scores = (entries) => entries
    .filter(([key, value]) => typeof value === "number" && !NOT_SCORES.has(key))
    .map(([key, value]) => `${key} ${number(value)}`).join(", ");
  const parts = [scores(Object.entries(metrics || {}))];
  for (const [split, values] of Object.entries(metrics || {})) {
    if (values && typeof values === "object") parts.push(`${split}: ${scores(Object.entries(values))}`);
  }
  return parts.filter(Boolean).join(" · ") || "–";
}

function renderTaskTable(tasks) {
  const body = $("#task-table tbody");
  body.replaceChildren(...tasks.map((task) => {
    const row = document.createElement("tr");
    row.dataset.task = task.name;
    const cells = [task.name, task.task_type, `${task.version} of ${task.versions.join(", ")}`,
      `${task.trainable_pct.toFixed(2)} %`, formatMetrics(task.metrics)];
    for (const text of cells) row.append(Object.assign(document.createElement("td"), { textContent: text }));
    const link = Object.assign(document.createElement("a"), { href: task.training_curve, textContent: "curve" });
    link.addEventListener("click", (event) => { event.preventDefault(); showCurve(task); });
    const curveCell = document.createElement("td");
    curveCell.append(link);
    row.append(curveCell);
    return row;
  }));
  $("#tasks-empty").hidden = tasks.length > 0;
}

function showCurve(task) {
  const figure = $("#curve");
  const image = figure.querySelector("img");
  imageUrl(`${task.training_curve}?t=${Date.now()}`).then((url) => { image.src = url; figure.hidden = false; },
    (err) => { figure.hidden = true; showError(err); });
  figure.querySelector("figcaption").textContent = `training curve of ${task.name}@${task.version}`;
  figure.hidden = false;
}

function fillSelect(select, tasks) {
  const chosen = select.value;
  select.replaceChildren(...tasks.map((task) => new Option(`${task.name} (${task.task_type})`, task.name)));
  if (tasks.some((task) => task.name === chosen)) select.value = chosen;
}

async function loadTasks() {
  try {
    const { tasks } = await request("/v1/tasks");
    state.tasks = tasks;
    $("#key-panel").hidden = true;
    renderTaskTable(tasks);
    for (const select of [$("#task-a"), $("#task-b"), $("#admin-unload-task")]) fillSelect(select, tasks);
    fillComposeTasks(state.composeRows, tasks);
    if (tasks.length > 1 && $("#task-b").value === $("#task-a").value) $("#task-b").selectedIndex = 1;
    rebuildForm();
    $("#server-state").textContent = `${tasks.length} task${tasks.length === 1 ? "" : "s"} served`;
    $("#server-state").className = "pill ok";
  } catch (err) {
    const needsKey = err instanceof ServerError && err.status === 401;
    $("#key-panel").hidden = !needsKey;
    $("#key-message").textContent = needsKey ? (apiKey() ? err.message : "this server needs an API key") : "";
    $("#server-state").textContent = needsKey ? "API key needed" : "unreachable";
    $("#server-state").className = "pill bad";
    if (!needsKey) showError(err);
  }
}

function wireKey() {
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setApiKey($("#api-key").value.trim());
    $("#api-key").value = "";
    loadTasks();
  });
}

function taskType(name) {
  return (state.tasks.find((task) => task.name === name) || {}).task_type;
}

function rebuildForm() {
  const type = taskType($("#task-a").value);
  if (state.formType !== type) {
    state.form = createForm(type, $("#task-input"));
    state.formType = type;
  }
}

function samplingParameters(form) {
  const data = new FormData(form);
  const number = (key) => (data.get(key) === "" ? undefined : Number(data.get(key)));
  const stop = String(data.get("stop") || "").split(",").map((s) => s.trim()).filter(Boolean);
  return { temperature: number("temperature"), top_p: number("top_p"), top_k: number("top_k"),
    max_new_tokens: number("max_new_tokens"), seed: number("seed"), stop };
}

function showFailure(pane, message, stats) {
  pane.classList.add("failed");
  pane.querySelector(".text").textContent = message;
  pane.querySelector(".stats").textContent = stats;
}

/** Streams one answer into its pane; resolves to the full text, or null when the request failed. */
async function answerInto(pane, task, input, parameters, compose) {
  const text = pane.querySelector(".text");
  const stats = pane.querySelector(".stats");
  pane.querySelector("h3").textContent = task;
  pane.classList.remove("failed");
  text.textContent = "";
  stats.textContent = "waiting…";
  const started = performance.now();
  let firstAt = null;
  let finished = false;
  try {
    await streamGenerate({ task, input, ...parameters, ...(compose ? { compose } : {}) }, (event) => {
      if (event.text !== undefined) {
        firstAt ??= performance.now();
        text.textContent += event.text;
        stats.textContent = "streaming…";
      }
      if (event.finish_reason) {
        finished = true;
        const seconds = (performance.now() - started) / 1000;
        const tokens = event.usage.completion_tokens;
        pane.querySelector("h3").textContent = event.composed
          ? `${compose.average ? "average" : "stack"} of ${event.composed.join(" + ")}` : `${event.task}@${event.version}`;
        stats.textContent = `finish: ${event.finish_reason} · ${tokens} tokens · ` +
          `${(tokens / seconds).toFixed(1)} tokens/s · first token ${Math.round((firstAt ?? performance.now()) - started)} ms`;
      }
    });
  } catch (err) {
    const refused = err instanceof ServerError;
    showFailure(pane, refused ? err.message : `the stream broke off: ${err.message}`,
      refused ? "the server refused the request" : "stopped; the server log has the reason");
    return null;
  }
  if (!finished) {
    showFailure(pane, `${text.textContent}\n[the server ended the stream without finishing: timed out or failed; ` +
      "its log has the reason]", "stopped");
    return null;
  }
  return text.textContent;
}

/** A sentence-VAE operation (`POST /v1/vae/{task}/{operation}`): its texts, one per line, into the pane. */
async function vaeInto(pane, task, { operation, body }, parameters) {
  const text = pane.querySelector(".text");
  const stats = pane.querySelector(".stats");
  pane.querySelector("h3").textContent = `${task} · ${operation}`;
  pane.classList.remove("failed");
  text.textContent = "";
  stats.textContent = "waiting…";
  const started = performance.now();
  const { stop, ...sampling } = parameters;  // the VAE routes take no stop strings
  try {
    const answer = await request(`/v1/vae/${encodeURIComponent(task)}/${operation}`,
      { method: "POST", body: { ...body, ...sampling } });
    const texts = answer.texts ?? [answer.text];
    text.textContent = texts.map((t, i) => `${i}. ${t}`).join("\n");
    stats.textContent = `${texts.length} text${texts.length === 1 ? "" : "s"} · ` +
      `${Math.round(performance.now() - started)} ms`;
    return text.textContent;
  } catch (err) {
    showFailure(pane, err.message, "the server refused the request");
    return null;
  }
}

async function generate(event) {
  event.preventDefault();
  showError(null);
  let input;
  try {
    input = state.form.read();
  } catch (err) {
    showError(err);
    return;
  }
  const comparing = $("#compare").checked;
  const parameters = samplingParameters(event.target);
  let compose;
  try {
    compose = composition($("#compose-block").value, $("#task-a").value, $("#compose-first-weight").value,
      state.composeRows);
  } catch (err) {
    showError(err);
    return;
  }
  $("#send").disabled = true;
  $("#answer-b").hidden = !comparing;
  const answer = state.form.vae ? vaeInto : answerInto;
  const panes = [answer($("#answer-a"), $("#task-a").value, input, parameters, compose)];
  if (comparing) panes.push(answer($("#answer-b"), $("#task-b").value, input, parameters));
  const [first] = await Promise.all(panes);
  $("#send").disabled = false;
  if (first !== null) state.form.remember(input, first);
}

async function adminAction(run) {
  try {
    $("#admin-result").textContent = JSON.stringify(await run());
    await loadTasks();
  } catch (err) {
    $("#admin-result").textContent = err.message;
  }
}

function wireAdmin() {
  $("#admin-token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.adminToken = $("#admin-token").value.trim();
    $("#admin-actions").hidden = !state.adminToken;
    $("#admin-result").textContent = state.adminToken ? "" : "enter the server's HUB_ADMIN_TOKEN (or, with --keys, an admin key) first";
  });
  $("#admin-reload").addEventListener("click", () => adminAction(
    () => request("/v1/admin/reload", { method: "POST", token: state.adminToken })));
  $("#admin-unload").addEventListener("click", () => adminAction(() => request(
    `/v1/admin/adapters/${encodeURIComponent($("#admin-unload-task").value)}`,
    { method: "DELETE", token: state.adminToken })));
}

function main() {
  state.composeRows = createComposeControls($("#compose-members"));
  $("#task-a").addEventListener("change", rebuildForm);
  $("#compare").addEventListener("change", () => { $("#task-b").disabled = !$("#compare").checked; });
  $("#refresh-tasks").addEventListener("click", loadTasks);
  $("#request-form").addEventListener("submit", generate);
  wireAdmin();
  wireKey();
  startMetricsPanel({
    canvas: $("#tps-chart"),
    fields: { queue: $("#m-queue"), batch: $("#m-batch"), resident: $("#m-resident"), tps: $("#m-tps") },
    onError: showError,
  });
  loadTasks();
}

main();
