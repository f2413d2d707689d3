// turbo-serve web page: plain JS, no build step. Every default and choice comes from GET /v1/models,
// so the API schema stays the single source of truth.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: [], task: "t2v", jobId: null, pollTimer: null, videoUrl: null };

// Parameters shown in the form: [name, kind, tasks]; values and choices come from the model card.
const PARAMS = [
  ["resolution", "choice", "both"], ["aspect_ratio", "choice", "both"], ["size", "text", "both"],
  ["num_frames", "int", "both"], ["num_steps", "int", "both"], ["seed", "int", "both"],
  ["attention_type", "choice", "both"], ["sla_topk", "float", "both"], ["sampler", "choice", "both"],
  ["sigma_max", "float", "both"], ["guidance_scale", "float", "both"], ["negative_prompt", "text", "both"],
  ["ode", "bool", "both"], ["adaptive_resolution", "bool", "i2v"], ["boundary", "float", "i2v"],
];

function headers() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      const details = (body.error && body.error.details) || [];
      message = details.length ? details.map((d) => `${d.param}: ${d.message}`).join("\n") : body.error.message;
    } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

function currentModel() { return state.models.find((m) => m.id === $("model").value); }

function renderParams() {
  const model = currentModel();
  const box = $("params");
  box.querySelectorAll("label").forEach((l) => l.remove());
  if (!model) return;
  for (const [name, kind, tasks] of PARAMS) {
    if (tasks !== "both" && tasks !== model.task) continue;
    const label = document.createElement("label");
    label.textContent = name + " ";
    let input;
    const value = name === "size" ? "" : model.defaults[name];
    if (kind === "choice") {
      input = document.createElement("select");
      for (const choice of model.choices[name]) input.add(new Option(choice, choice, false, choice === value));
    } else if (kind === "bool") {
      input = document.createElement("input");
      input.type = "checkbox";
      input.checked = Boolean(value);
    } else {
      input = document.createElement("input");
      input.type = kind === "text" ? "text" : "number";
      if (kind === "float") input.step = "any";
      input.value = value === null || value === undefined ? "" : value;
      if (name === "size") input.placeholder = `e.g. ${model.defaults.size} (overrides resolution)`;
    }
    input.name = name;
    input.id = `param-${name}`;
    input.dataset.kind = kind;
    label.appendChild(input);
    box.appendChild(label);
  }
}

function renderModels() {
  const select = $("model");
  select.innerHTML = "";
  for (const model of state.models.filter((m) => m.task === state.task)) select.add(new Option(model.id, model.id));
  renderParams();
}

function setTask(task) {
  state.task = task;
  document.body.className = `task-${task}`;
  document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t.dataset.task === task));
  renderModels();
}

function formData() {
  const data = new FormData();
  data.append("model", $("model").value);
  data.append("prompt", $("prompt").value);
  const sized = $("param-size") && $("param-size").value.trim() !== "";
  for (const input of $("params").querySelectorAll("input, select")) {
    // An explicit size replaces the resolution table (the API refuses both when they disagree).
    if (sized && (input.name === "resolution" || input.name === "aspect_ratio")) continue;
    if (input.dataset.kind === "bool") data.append(input.name, input.checked ? "true" : "false");
    else if (input.value !== "") data.append(input.name, input.value);
  }
  if (state.task === "i2v" && $("image").files[0]) data.append("input_reference", $("image").files[0]);
  return data;
}

async function submit(event) {
  event.preventDefault();
  $("form-error").textContent = "";
  $("submit").disabled = true;
  try {
    const response = await api("/v1/videos", { method: "POST", body: formData() });
    const video = await response.json();
    showJob(video);
    poll(video.id);
  } catch (error) {
    $("form-error").textContent = error.message;
  } finally {
    $("submit").disabled = false;
  }
}

function showJob(video) {
  $("job-id").textContent = `${video.id} · ${video.model} · ${video.size} · ${video.seconds} s`;
  $("progress-bar").style.width = `${video.progress}%`;
  let text = `${video.status} (${video.stage}) · ${video.progress}%`;
  if (video.error) text += ` · ${video.error.message}`;
  if (video.status === "completed" && video.timings && video.timings.total) text += ` · ${video.timings.total.toFixed(2)} s`;
  $("job-status").textContent = text;
  $("job-status").className = video.status === "failed" ? "error" : "muted";
}

function poll(id) {
  state.jobId = id;
  clearTimeout(state.pollTimer);
  $("player").hidden = true;
  $("download").hidden = true;
  const tick = async () => {
    if (state.jobId !== id) return;
    try {
      const video = await (await api(`/v1/videos/${id}`)).json();
      showJob(video);
      if (["completed", "failed", "cancelled"].includes(video.status)) {
        refreshStatus();
        if (video.status === "completed") await play(id);
        return;
      }
    } catch (error) {
      $("job-status").textContent = error.message;
    }
    state.pollTimer = setTimeout(tick, 400);
  };
  tick();
}

async function play(id) {
  const blob = await (await api(`/v1/videos/${id}/content`)).blob();
  if (state.videoUrl) URL.revokeObjectURL(state.videoUrl);
  state.videoUrl = URL.createObjectURL(blob);
  const player = $("player");
  player.src = state.videoUrl;
  player.hidden = false;
  player.play().catch(() => {});
  $("download").href = state.videoUrl;
  $("download").download = `${id}.mp4`;
  $("download").hidden = false;
}

function table(element, rows) {
  element.innerHTML = rows.map((r) => `<tr>${r.map((c) => `<td>${c}</td>`).join("")}</tr>`).join("");
}

function gib(bytes) { return (bytes / 2 ** 30).toFixed(1); }

async function refreshStatus() {
  try {
    const status = await (await api("/v1/status")).json();
    table($("jobs-by-state"), [["queue depth", status.queue_depth], ["running", status.running],
      ...Object.entries(status.jobs).map(([k, v]) => [k, v])]);
    table($("deployments"), Object.entries(status.deployments || {}).map(([name, d]) =>
      [name, d.status, Object.entries(d.replicas).map(([s, n]) => `${n} ${s}`).join(", ")]));
    const gpus = status.gpus || {};
    $("gpus").innerHTML = gpus.available
      ? gpus.devices.map((g) => `GPU ${g.index} ${g.name}: ${gib(g.memory_used_bytes)} / ${gib(g.memory_total_bytes)} GiB, ${g.utilization_percent}% busy`).join("<br>")
      : (gpus.reason || "no GPU");
    const recent = await (await api("/v1/videos?limit=8")).json();
    $("recent").innerHTML = "";
    for (const video of recent.data) {
      const item = document.createElement("li");
      const link = document.createElement("a");
      link.textContent = video.id.slice(0, 14);
      link.onclick = () => poll(video.id);
      item.append(link, ` ${video.status} ${video.progress}% · ${video.prompt.slice(0, 40)}`);
      $("recent").appendChild(item);
    }
  } catch (error) {
    $("gpus").textContent = error.message;
  }
}

async function start() {
  $("api-key").value = localStorage.getItem("turbo-serve-api-key") || "";
  $("api-key").addEventListener("change", () => { localStorage.setItem("turbo-serve-api-key", $("api-key").value); load(); });
  document.querySelectorAll(".tab").forEach((tab) => tab.addEventListener("click", () => setTask(tab.dataset.task)));
  $("model").addEventListener("change", renderParams);
  $("form").addEventListener("submit", submit);
  await load();
  setInterval(refreshStatus, 2000);
}

async function load() {
  try {
    state.models = (await (await api("/v1/models")).json()).data;
  } catch (error) {
    $("form-error").textContent = error.message;
    return;
  }
  $("tab-i2v").disabled = !state.models.some((m) => m.task === "i2v");
  $("tab-t2v").disabled = !state.models.some((m) => m.task === "t2v");
  setTask(state.models.some((m) => m.task === "t2v") ? "t2v" : "i2v");
  refreshStatus();
}

start();
