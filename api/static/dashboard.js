// afina's dashboard: every page reads and drives the service through its public HTTP API,
// with the key typed once per tab (sessionStorage). Text from users and models is only ever
// set as text (`el`, textContent), never parsed as HTML.
"use strict";

const KEY = "afina.apiKey";
const FINAL = ["succeeded", "failed", "cancelled"];
const body = document.body;
const root = document.querySelector("header .brand").getAttribute("href").replace(/\/$/, "");
const content = document.getElementById("content");
window.afina = { charts: {} }; // the pages' charts, for whoever reads the page (tests)

class ApiError extends Error {
  constructor(status, error) {
    super(error?.message || `HTTP ${status}`);
    this.status = status;
    this.error = error || {};
  }
}

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "class") node.className = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function showError(error) {
  const box = document.getElementById("error");
  box.textContent = error ? String(error.message || error) : "";
  box.hidden = !error;
}

function askForKey(message) {
  const form = document.getElementById("key-form");
  form.hidden = false;
  showError(message ? { message } : null);
  form.onsubmit = (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, document.getElementById("key-input").value.trim());
    location.reload();
  };
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = sessionStorage.getItem(KEY);
  if (key) headers.set("Authorization", `Bearer ${key}`);
  if (options.json !== undefined) {
    headers.set("Content-Type", "application/json");
    options = { ...options, body: JSON.stringify(options.json) };
  }
  const response = await fetch(root + path, { ...options, headers });
  if (!response.ok) {
    const answer = await response.json().catch(() => ({}));
    if (response.status === 401) askForKey(answer.error?.message);
    throw new ApiError(response.status, answer.error);
  }
  return response;
}

const getJson = async (path) => (await api(path)).json();
const postJson = async (path, json) => (await api(path, { method: "POST", json })).json();

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "";
}

function eta(job) {
  const finish = job.progress.estimated_finish;
  if (!finish || FINAL.includes(job.status)) return "";
  const left = Math.max(0, Math.round(finish - Date.now() / 1000));
  return left >= 3600 ? `${(left / 3600).toFixed(1)} h` : left >= 60 ? `${Math.round(left / 60)} min` : `${left} s`;
}

function progressBar(job) {
  const { steps_done: done, total_steps: total } = job.progress;
  return el("span", { class: "progress" },
    el("progress", { max: total || 1, value: total ? done : 0 }),
    ` ${done}${total ? ` / ${total}` : ""}`);
}

function method(job) {
  return job.method?.type === "dpo" ? "DPO" : "SFT";
}

function every(seconds, work) {
  let stopped = false;
  const tick = async () => {
    if (stopped) return;
    try {
      const more = await work();
      showError(null);
      if (more === false) return;
    } catch (error) {
      showError(error);
    }
    setTimeout(tick, seconds * 1000);
  };
  tick();
  return () => { stopped = true; };
}

// --- jobs ------------------------------------------------------------------------------------

function jobsPage() {
  const filter = el("select", { id: "status-filter", onchange: () => render() },
    el("option", { value: "" }, "every status"),
    ["queued", "running", "paused", "succeeded", "failed", "cancelled"].map((s) => el("option", { value: s }, s)));
  const table = el("tbody");
  let jobs = [];
  const render = () => {
    table.replaceChildren(...jobs.filter((job) => !filter.value || job.status === filter.value).map((job) =>
      el("tr", { "data-job": job.id },
        el("td", {}, el("a", { href: `${root}/jobs/${encodeURIComponent(job.id)}` }, job.id)),
        el("td", { class: `status ${job.status}` }, job.status),
        el("td", {}, progressBar(job)),
        el("td", {}, eta(job)),
        el("td", { class: "model" }, job.model),
        el("td", {}, method(job)),
        el("td", {}, job.suffix || ""),
        el("td", {}, when(job.created_at)),
        el("td", {}, when(job.finished_at)))));
  };
  content.replaceChildren(
    el("h1", {}, "Fine-tuning jobs"),
    el("p", {}, el("label", {}, "Show ", filter), " ", el("a", { href: `${root}/new` }, "New job")),
    el("table", { id: "jobs" },
      el("thead", {}, el("tr", {}, ["Job", "Status", "Progress", "ETA", "Base model", "Method", "Suffix", "Created", "Finished"].map((h) => el("th", {}, h)))),
      table));
  every(3, async () => {
    jobs = (await getJson("/v1/fine_tuning/jobs?limit=100")).data;
    render();
  });
}

// --- one job ---------------------------------------------------------------------------------

function chart(name, target, series, axes) {
  const options = {
    width: Math.min(900, target.clientWidth || 900),
    height: 260,
    scales: { x: { time: false } },
    series: [{ label: "step" }, ...series],
    axes: [{ label: "step" }, ...axes],
  };
  const plot = new uPlot(options, [[], ...series.map(() => [])], target);
  window.afina.charts[name] = plot;
  return plot;
}

function jobPage(jobId) {
  const base = `/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}`;
  const header = el("div", { id: "job-header" });
  const actions = el("p", { class: "actions" });
  const lossBox = el("div", { id: "loss-chart", class: "chart" });
  const rateBox = el("div", { id: "rate-chart", class: "chart" });
  const events = el("ol", { id: "events" });
  const checkpoints = el("tbody");
  const config = el("pre", { id: "config" });
  content.replaceChildren(
    el("h1", {}, "Job ", el("code", {}, jobId)), header, actions,
    el("h2", {}, "Loss"), lossBox,
    el("h2", {}, "Learning rate and tokens/s"), rateBox,
    el("h2", {}, "Checkpoints"),
    el("table", { id: "checkpoints" },
      el("thead", {}, el("tr", {}, ["Step", "Model name", "Train loss", "Valid loss", "Accuracy"].map((h) => el("th", {}, h)))),
      checkpoints),
    el("h2", {}, "Events"), events,
    el("h2", {}, "Resolved config"), config);
  const loss = chart("loss", lossBox, [
    { label: "loss", stroke: "#2563eb", width: 2 },
    { label: "eval_loss", stroke: "#dc2626", width: 2, spanGaps: true, points: { show: true } },
  ], [{ label: "loss" }]);
  const rate = chart("rate", rateBox, [
    { label: "learning_rate", stroke: "#059669", scale: "lr" },
    { label: "tokens/s", stroke: "#7c3aed", scale: "tps" },
  ], [{ scale: "lr", label: "learning rate" }, { scale: "tps", side: 1, label: "tokens/s" }]);
  const act = (verb) => el("button", {
    type: "button", id: `${verb}-job`,
    onclick: async () => {
      try { await postJson(`${base}/${verb}`); refresh(); } catch (error) { showError(error); }
    },
  }, verb[0].toUpperCase() + verb.slice(1));
  const number = (value) => (value === null || value === undefined ? "" : Number(value).toPrecision(4));
  const refresh = async () => {
    const [job, metrics, page, saved] = await Promise.all([
      getJson(base), getJson(`${base}/metrics`), getJson(`${base}/events?limit=100`),
      getJson(`${base}/checkpoints?limit=100`),
    ]);
    header.replaceChildren(el("dl", {}, [
      ["Status", el("span", { class: `status ${job.status}`, id: "job-status" }, job.status + (job.pause_requested ? " (pausing)" : ""))],
      ["Progress", progressBar(job)], ["ETA", eta(job)],
      ["Base model", job.model], ["Method", method(job)],
      ["Fine-tuned model", job.fine_tuned_model || ""],
      ["Created", when(job.created_at)], ["Finished", when(job.finished_at)],
      ["Error", job.error ? `${job.error.code}: ${job.error.message}` : ""],
    ].flatMap(([term, value]) => [el("dt", {}, term), el("dd", {}, value)])));
    const buttons = [];
    if (!FINAL.includes(job.status)) buttons.push(act("cancel"));
    if (["queued", "running"].includes(job.status) && !job.pause_requested) buttons.push(act("pause"));
    if (job.status === "paused") buttons.push(act("resume"));
    if (job.fine_tuned_model && !job.model_deleted_at) buttons.push(el("a", { href: `${root}/playground?model=${encodeURIComponent(job.fine_tuned_model)}` }, "Try it in the playground"));
    actions.replaceChildren(...buttons);
    const points = metrics.data;
    const steps = points.map((p) => p.step);
    loss.setData([steps, points.map((p) => p.loss), points.map((p) => p.eval_loss)]);
    rate.setData([steps, points.map((p) => p.learning_rate), points.map((p) => p.tokens_per_second)]);
    events.replaceChildren(...page.data.map((event) =>
      el("li", { class: event.level }, el("time", {}, when(event.created_at)), " ", event.message)));
    checkpoints.replaceChildren(...saved.data.map((c) => el("tr", {},
      el("td", {}, c.step_number), el("td", {}, el("code", {}, c.fine_tuned_model_checkpoint)),
      el("td", {}, number(c.metrics.train_loss)), el("td", {}, number(c.metrics.valid_loss)),
      el("td", {}, number(c.metrics.train_mean_token_accuracy)))));
    config.textContent = JSON.stringify(job.config, null, 2);
    return !FINAL.includes(job.status);
  };
  every(2, refresh);
}

// --- files -----------------------------------------------------------------------------------

function filesPage() {
  const table = el("tbody");
  const result = el("div", { id: "upload-result" });
  const bar = el("progress", { id: "upload-progress", max: 1, value: 0, hidden: true });
  const input = el("input", { type: "file", id: "file-input", accept: ".jsonl,.json,.txt" });
  const drop = el("div", { id: "drop-zone", class: "drop" },
    "Drop a JSONL dataset here, or ", el("label", {}, "choose one ", input));
  const load = async () => {
    const files = (await getJson("/v1/files?limit=100")).data;
    table.replaceChildren(...files.map((file) => el("tr", { "data-file": file.id },
      el("td", {}, el("code", {}, file.id)), el("td", { class: "filename" }, file.filename),
      el("td", {}, file.purpose), el("td", {}, file.validation?.format || ""),
      el("td", {}, file.validation?.num_examples ?? ""), el("td", {}, file.bytes),
      el("td", {}, when(file.created_at)),
      el("td", {}, el("button", {
        type: "button", class: "delete",
        onclick: async () => {
          if (!confirm(`Delete ${file.filename}?`)) return;
          try { await api(`/v1/files/${encodeURIComponent(file.id)}`, { method: "DELETE" }); load(); } catch (error) { showError(error); }
        },
      }, "Delete")))));
  };
  const upload = (file) => {
    const form = new FormData();
    form.append("purpose", "fine-tune");
    form.append("file", file);
    const request = new XMLHttpRequest(); // fetch reports no upload progress
    request.open("POST", `${root}/v1/files`);
    const key = sessionStorage.getItem(KEY);
    if (key) request.setRequestHeader("Authorization", `Bearer ${key}`);
    bar.hidden = false;
    request.upload.onprogress = (event) => { if (event.lengthComputable) bar.value = event.loaded / event.total; };
    request.onload = () => {
      bar.hidden = true;
      let answer = {};
      try { answer = JSON.parse(request.responseText); } catch { answer = {}; }
      if (request.status === 200) {
        const v = answer.validation;
        result.replaceChildren(el("p", { class: "ok" }, `Uploaded ${answer.filename} as `, el("code", {}, answer.id),
          v ? `: ${v.num_examples} ${v.format} examples, about ${v.estimated_tokens} tokens` : ""));
        load();
      } else {
        const error = answer.error || { message: `HTTP ${request.status}` };
        if (request.status === 401) askForKey(error.message);
        result.replaceChildren(el("p", { class: "bad" }, error.message),
          el("ul", { id: "line-errors" }, (error.errors || []).map((e) => el("li", {}, `line ${e.line}: ${e.message}`))));
      }
    };
    request.onerror = () => { bar.hidden = true; showError({ message: "the upload failed: is the server up?" }); };
    request.send(form);
  };
  input.addEventListener("change", () => input.files[0] && upload(input.files[0]));
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files[0]) upload(event.dataTransfer.files[0]);
  });
  content.replaceChildren(el("h1", {}, "Files"), drop, bar, result,
    el("table", { id: "files" },
      el("thead", {}, el("tr", {}, ["File", "Name", "Purpose", "Format", "Examples", "Bytes", "Uploaded", ""].map((h) => el("th", {}, h)))),
      table));
  load().catch(showError);
}

// --- new job ---------------------------------------------------------------------------------

function field(label, control, hint) {
  return el("label", { class: "field" }, el("span", {}, label), control, hint ? el("small", {}, hint) : null);
}

function newJobPage() {
  const input = (id, attributes = {}) => el("input", { id, name: id, ...attributes });
  const model = input("model", { list: "models", required: true, placeholder: "org/model or /path/to/model" });
  const models = el("datalist", { id: "models" });
  const training = el("select", { id: "training_file", required: true });
  const validation = el("select", { id: "validation_file" });
  const kind = el("select", { id: "method" }, el("option", { value: "supervised" }, "Supervised (SFT)"), el("option", { value: "dpo" }, "Preference (DPO)"));
  const epochs = input("n_epochs", { type: "number", min: 1, placeholder: "auto" });
  const batch = input("batch_size", { type: "number", min: 1, placeholder: "auto" });
  const rate = input("learning_rate", { type: "number", step: "any", min: 0, placeholder: "2e-4" });
  const length = input("max_seq_length", { type: "number", min: 8, placeholder: "auto" });
  const rank = input("lora_r", { type: "number", min: 1, placeholder: "16" });
  const suffix = input("suffix", { maxlength: 64 });
  const plan = el("div", { id: "estimate" });
  const jobBody = () => {
    const number = (control) => (control.value === "" ? undefined : Number(control.value));
    const hyperparameters = { n_epochs: number(epochs), batch_size: number(batch) };
    const body = {
      model: model.value.trim(), training_file: training.value,
      method: { type: kind.value, [kind.value]: { hyperparameters } },
    };
    if (validation.value) body.validation_file = validation.value;
    if (suffix.value) body.suffix = suffix.value;
    const trainingSettings = { learning_rate: number(rate), max_seq_length: number(length) };
    if (Object.values(trainingSettings).some((v) => v !== undefined)) body.training = trainingSettings;
    if (number(rank)) body.lora = { r: number(rank) };
    return JSON.parse(JSON.stringify(body)); // without the fields left empty
  };
  const estimate = async () => {
    try {
      const result = await postJson("/v1/fine_tuning/jobs/estimate", jobBody());
      const fits = result.fits;
      const verdict = !fits.checked ? "not checked: no worker is registered yet"
        : fits.workers.length ? `${fits.workers.length} worker(s), on queue ${result.queue}`
          : `none: it ${fits.reason} (change ${fits.param})`;
      plan.replaceChildren(el("pre", {}, JSON.stringify({
        memory: result.memory, steps: result.steps,
        estimated_seconds: result.estimated_seconds, estimated_from: result.estimated_from,
        settings: result.settings, fits: verdict,
      }, null, 2)));
    } catch (error) {
      plan.replaceChildren(el("p", { class: "bad" }, error.message));
    }
  };
  const form = el("form", {
    id: "new-job",
    onsubmit: async (event) => {
      event.preventDefault();
      try {
        const job = await postJson("/v1/fine_tuning/jobs", jobBody());
        location.href = `${root}/jobs/${encodeURIComponent(job.id)}`;
      } catch (error) { showError(error); }
    },
  },
  field("Base model", model), models,
  field("Training file", training), field("Validation file", validation, "optional: eval loss while training"),
  field("Method", kind), field("Epochs", epochs), field("Batch size", batch),
  field("Learning rate", rate), field("Max sequence length", length), field("LoRA rank", rank),
  field("Suffix", suffix),
  el("p", { class: "actions" },
    el("button", { type: "button", id: "estimate-job", onclick: estimate }, "Estimate"),
    el("button", { type: "submit", id: "create-job" }, "Create job")),
  plan);
  content.replaceChildren(el("h1", {}, "New fine-tuning job"), form);
  (async () => {
    const [files, known] = await Promise.all([getJson("/v1/files?limit=100&purpose=fine-tune"), getJson("/v1/models")]);
    const options = files.data.map((f) => el("option", { value: f.id }, `${f.filename} (${f.validation?.num_examples ?? "?"} ${f.validation?.format ?? ""})`));
    training.replaceChildren(...options);
    validation.replaceChildren(el("option", { value: "" }, "none"), ...options.map((o) => o.cloneNode(true)));
    models.replaceChildren(...known.data.map((m) => el("option", { value: m.id })));
  })().catch(showError);
}

// --- playground ------------------------------------------------------------------------------

async function streamChat(model, messages, settings, output) {
  const response = await api("/v1/chat/completions", {
    method: "POST", json: { model, messages, stream: true, ...settings },
  });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let text = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const event of events) {
      const data = event.replace(/^data: /, "");
      if (data === "[DONE]") return text;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(500, chunk.error);
      const delta = chunk.choices?.[0]?.delta?.content || "";
      text += delta;
      output.textContent = text;
    }
  }
  return text;
}

function playgroundPage() {
  const chosen = new URLSearchParams(location.search).get("model");
  const model = el("select", { id: "playground-model" });
  const prompt = el("textarea", { id: "prompt", rows: 3, required: true, placeholder: "Ask something" });
  const temperature = el("input", { id: "temperature", type: "number", min: 0, max: 2, step: 0.1, value: 0 });
  const maxTokens = el("input", { id: "max_tokens", type: "number", min: 1, value: 128 });
  const columns = el("div", { class: "columns" });
  let panes = [];
  const pane = (label, name, role) => {
    const log = el("div", { class: "log", id: `${role}-log` });
    const item = { name, history: [], log };
    columns.append(el("section", { class: "pane" }, el("h2", {}, label, " ", el("code", {}, name)), log));
    return item;
  };
  const choose = (entries) => {
    const ft = entries.find((m) => m.id === model.value);
    columns.replaceChildren();
    panes = ft ? [pane("Fine-tuned", ft.id, "tuned"), pane("Base", ft.parent, "base")] : [];
  };
  const form = el("form", {
    id: "chat-form",
    onsubmit: async (event) => {
      event.preventDefault();
      const text = prompt.value.trim();
      if (!text || !panes.length) return;
      prompt.value = "";
      const settings = { temperature: Number(temperature.value), max_tokens: Number(maxTokens.value) };
      await Promise.all(panes.map(async (p) => {
        p.history.push({ role: "user", content: text });
        p.log.append(el("p", { class: "user" }, text));
        const answer = el("p", { class: "assistant" });
        p.log.append(answer);
        try {
          const reply = await streamChat(p.name, p.history, settings, answer);
          p.history.push({ role: "assistant", content: reply });
          answer.classList.add("done");
        } catch (error) {
          answer.classList.add("bad");
          answer.textContent = error.message;
        }
      }));
    },
  },
  field("Fine-tuned model", model),
  field("Temperature", temperature), field("Max tokens", maxTokens),
  field("Message", prompt),
  el("p", { class: "actions" }, el("button", { type: "submit", id: "send" }, "Send to both")));
  content.replaceChildren(el("h1", {}, "Playground"),
    el("p", {}, "The fine-tuned model and its base answer the same messages with the same settings."),
    form, columns);
  getJson("/v1/models").then(({ data }) => {
    const tuned = data.filter((m) => m.parent);
    model.replaceChildren(...tuned.map((m) => el("option", { value: m.id, selected: m.id === chosen }, m.id)));
    model.onchange = () => choose(tuned);
    choose(tuned);
  }).catch(showError);
}

// --- start -----------------------------------------------------------------------------------

const forget = document.getElementById("forget-key");
forget.hidden = !sessionStorage.getItem(KEY);
forget.addEventListener("click", () => { sessionStorage.removeItem(KEY); location.reload(); });
({ jobs: jobsPage, job: () => jobPage(body.dataset.job), files: filesPage, new: newJobPage, playground: playgroundPage })[body.dataset.page]();
