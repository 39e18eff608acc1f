/* qdpo dashboard: the tenant's jobs and one job's training and evaluation, from the REST API.
 *
 * Plain JavaScript, no build step; charts by the vendored uPlot. The API key is kept in
 * sessionStorage (this tab only) and sent as the Bearer header of every request — never in a URL,
 * so the live event stream is read with fetch() and a streaming body, not EventSource (which
 * cannot send headers). Everything shown is text (textContent), never parsed as HTML.
 */
"use strict";

(function () {
  const KEY_STORAGE = "qdpo.apiKey";
  const STATUSES = ["validating", "queued", "running", "cancelling", "succeeded", "failed", "cancelled"];
  const TERMINAL = ["succeeded", "failed", "cancelled"];
  const CANCELLABLE = ["validating", "queued", "running"];
  const STAGES = ["prepare", "quantize", "baseline", "init", "pairs", "train", "evaluate", "export"];
  // The report's rows, as qdpo_core.report.ROWS formats them (a test holds the two together).
  const ROWS = [
    ["token_flip_rate", "token-flip rate", "{:.1%}"],
    ["kl", "KL(FP‖model), nats/token", "{:.4f}"],
    ["perplexity", "perplexity of FP answers", "{:.3f}"],
    ["exact_match", "greedy exact match", "{:.1%}"],
    ["rouge_l", "greedy ROUGE-L vs FP", "{:.3f}"],
    ["cosine", "answer cosine vs FP", "{:.3f}"],
    ["judge_win_rate", "judge win-rate vs PTQ", "{:.1%}"],
  ];
  const HIGHER_IS_BETTER = new Set(["exact_match", "rouge_l", "cosine", "judge_win_rate"]);
  const TRAINING_CHARTS = [
    ["loss", "Loss", [["loss", "loss"], ["dpo_loss", "DPO loss"], ["kd_loss", "KD loss"], ["nll_loss", "NLL loss"]]],
    ["rewards", "Rewards", [["chosen_reward", "chosen"], ["rejected_reward", "rejected"]]],
    ["margin", "Reward margin", [["reward_margin", "margin"]]],
    ["accuracy", "Reward accuracy", [["reward_accuracy", "accuracy"]]],
    ["learning_rate", "Learning rate", [["learning_rate", "learning rate"]]],
  ];
  const COLORS = ["#1f6feb", "#d1242f", "#8250df", "#1a7f37", "#bf8700"];
  const STEP_INCREMENTS = [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 2500, 5000, 10000, 20000, 50000, 100000]; // whole steps only
  const REF = { fp: "#1a7f37", ptq: "#d1242f", line: "#1f6feb", selected: "#bf8700" };

  const state = { key: sessionStorage.getItem(KEY_STORAGE), dispose: null };
  const exposed = (window.qdpoDashboard = { charts: {}, ready: false }); // for tests and the curious: the charts drawn, whether the view loaded
  const $ = (id) => document.getElementById(id);
  const apiBase = new URL("../", window.location.href); // the dashboard lives at <api>/dashboard/

  // --- small helpers --------------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "text") node.textContent = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // Python's float formatting ("{:.1%}", "{:.4f}"): the exact binary value rounded half to even, so
  // the table shows what report.md shows.
  function pyFixed(x, digits, shift) {
    const negative = x < 0 || Object.is(x, -0);
    const [intPart, fracPart] = Math.abs(x).toFixed(60).split(".");
    const whole = (intPart + fracPart.slice(0, shift)).replace(/^0+(?=\d)/, "");
    const frac = fracPart.slice(shift);
    const digitsList = (whole + frac.slice(0, digits)).split("").map(Number);
    const rest = frac.slice(digits);
    const first = Number(rest[0] || 0);
    const tail = /[1-9]/.test(rest.slice(1));
    const last = digitsList[digitsList.length - 1] || 0;
    if (first > 5 || (first === 5 && (tail || last % 2 === 1))) {
      let i = digitsList.length - 1;
      for (; i >= 0; i--) {
        if (digitsList[i] === 9) digitsList[i] = 0;
        else { digitsList[i] += 1; break; }
      }
      if (i < 0) digitsList.unshift(1);
    }
    const text = digitsList.join("");
    const head = text.slice(0, text.length - digits) || "0";
    return (negative ? "-" : "") + head + (digits ? "." + text.slice(text.length - digits) : "");
  }

  function formatValue(value, pattern) {
    if (value === null || value === undefined) return "–";
    const [, digits, kind] = /\{:\.(\d+)(%|f)\}/.exec(pattern);
    if (kind === "%") return pyFixed(Math.abs(value) < 0.005 ? 0 : value, Number(digits), 2) + "%";
    return pyFixed(value, Number(digits), 0);
  }

  exposed.formatValue = formatValue;

  const percent = (value, digits = 0) => (value === null || value === undefined ? "–" : formatValue(value, `{:.${digits}%}`));
  const when = (seconds) => (seconds ? new Date(seconds * 1000).toLocaleString() : "–");

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "";
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
    return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
  }

  function quantizationLabel(q) {
    if (!q) return "–";
    if (q.method === "rtn") return `RTN ${q.bits}-bit, group ${q.group_size}`;
    if (q.method === "gguf") return q.type ? `GGUF ${q.type}` : "GGUF";
    return q.method;
  }

  function statusBadge(status) {
    return el("span", { class: `badge status-${status}`, text: status });
  }

  // --- the API ---------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, body) {
      const error = (body && body.error) || {};
      super(error.message || `HTTP ${status}`);
      this.status = status;
      this.code = error.code || "http_error";
      this.param = error.param || null;
    }
  }

  function authHeaders(extra) {
    return Object.assign({ Authorization: `Bearer ${state.key}` }, extra || {});
  }

  async function request(path, options) {
    const response = await fetch(new URL(path.replace(/^\//, ""), apiBase), Object.assign({ cache: "no-store" }, options, { headers: authHeaders((options || {}).headers) }));
    if (!response.ok) {
      let body = null;
      try { body = await response.json(); } catch (_) { /* not JSON */ }
      const error = new ApiError(response.status, body);
      if (response.status === 401) signOut(keyRefused(error));
      throw error;
    }
    return response;
  }

  const api = async (path, options) => (await request(path, options)).json();

  function keyRefused(error) {
    return `This API key was not accepted (${error.code}): ${error.message}`;
  }

  function showBanner(message) {
    const banner = $("banner");
    banner.textContent = message || "";
    banner.hidden = !message;
  }

  function reportError(error) {
    if (error instanceof ApiError && error.status === 401) return;
    showBanner(error instanceof ApiError ? `${error.code}: ${error.message}` : `The service could not be reached (${error.message}).`);
  }

  // --- sign in / out ---------------------------------------------------------------------------

  function signOut(message) {
    state.key = null;
    sessionStorage.removeItem(KEY_STORAGE);
    if (state.dispose) state.dispose();
    state.dispose = null;
    $("view").hidden = true;
    $("view").replaceChildren();
    $("sign-out").hidden = true;
    $("signed-in").textContent = "";
    showBanner("");
    $("login").hidden = false;
    const error = $("login-error");
    error.textContent = message || "";
    error.hidden = !message;
    $("api-key").focus();
  }

  async function signIn(event) {
    event.preventDefault();
    const key = $("api-key").value.trim();
    const error = $("login-error");
    error.hidden = true;
    const response = await fetch(new URL("v1/jobs?limit=1", apiBase), { headers: { Authorization: `Bearer ${key}` }, cache: "no-store" }).catch((e) => e);
    if (response instanceof Error) {
      error.textContent = `The service could not be reached (${response.message}).`;
      error.hidden = false;
      return;
    }
    if (!response.ok) {
      let body = null;
      try { body = await response.json(); } catch (_) { /* not JSON */ }
      error.textContent = keyRefused(new ApiError(response.status, body));
      error.hidden = false;
      $("api-key").select();
      return;
    }
    state.key = key;
    sessionStorage.setItem(KEY_STORAGE, key);
    $("api-key").value = "";
    route();
  }

  // --- charts (uPlot) --------------------------------------------------------------------------

  function chart(host, name, title, xLabel, xs, series, yFormat) {
    const caption = el("figcaption", { id: `chart-${name}-title`, text: title });
    const target = el("div", { class: "plot" });
    const table = dataTable(xLabel, xs, series, yFormat);
    const figure = el("figure", { class: "chart", "data-chart": name, "aria-labelledby": caption.id }, caption, target, el("details", {}, el("summary", { text: `${title}: the data` }), table));
    host.append(figure);
    const onePoint = xs.length === 1;
    const options = {
      width: Math.max(280, target.clientWidth || host.clientWidth || 400),
      height: 220,
      scales: { x: { time: false } },
      legend: { live: true },
      cursor: { drag: { x: true, y: false } },
      axes: [{ label: xLabel, incrs: STEP_INCREMENTS }, { size: 64, values: (u, ticks) => ticks.map((t) => yFormat(t)) }],
      series: [
        { label: xLabel },
        ...series.map((s) => ({
          label: s.label,
          stroke: s.color,
          width: s.width === undefined ? 2 : s.width,
          dash: s.dash,
          paths: s.pointsOnly ? () => null : undefined,
          spanGaps: true,
          points: { show: s.points !== false || onePoint, size: s.size || 6, fill: s.fill || s.color, stroke: s.color },
          value: (u, v) => (v === null || v === undefined ? "–" : yFormat(v)),
        })),
      ],
    };
    const plot = new uPlot(options, [xs, ...series.map((s) => s.values)], target);
    const resize = new ResizeObserver(() => plot.setSize({ width: Math.max(280, target.clientWidth), height: 220 }));
    resize.observe(target);
    exposed.charts[name] = plot;
    return () => { resize.disconnect(); plot.destroy(); delete exposed.charts[name]; };
  }

  function dataTable(xLabel, xs, series, yFormat) {
    const head = el("tr", {}, el("th", { scope: "col", text: xLabel }), series.map((s) => el("th", { scope: "col", text: s.label })));
    const rows = xs.map((x, i) => el("tr", {}, el("th", { scope: "row", text: String(x) }), series.map((s) => el("td", { text: s.values[i] === null ? "–" : yFormat(s.values[i]) }))));
    return el("table", { class: "data" }, el("thead", {}, head), el("tbody", {}, rows));
  }

  const number = (v) => (Math.abs(v) >= 1e4 || (v !== 0 && Math.abs(v) < 1e-3) ? v.toExponential(2) : String(Number(v.toPrecision(4))));

  // --- the jobs page ---------------------------------------------------------------------------

  function jobsView(params) {
    const status = STATUSES.includes(params.get("status")) ? params.get("status") : "";
    const select = el("select", { id: "status-filter", onchange: () => { window.location.hash = select.value ? `#/jobs?status=${select.value}` : "#/jobs"; } },
      el("option", { value: "", text: "all" }), STATUSES.map((s) => el("option", { value: s, text: s, selected: s === status })));
    const body = el("tbody");
    const more = el("button", { type: "button", hidden: true, text: "Show older jobs" });
    const updated = el("span", { class: "muted", "aria-live": "off" });
    const table = el("table", { class: "jobs", id: "jobs-table" },
      el("caption", { class: "sr-only", text: "Your jobs, newest first" }),
      el("thead", {}, el("tr", {}, ["Job", "Status", "Model", "Quantization", "Method", "Progress", "Created", "Gap closed (flip / KL)"].map((h) => el("th", { scope: "col", text: h })))),
      body);
    $("view").replaceChildren(el("h1", { text: "Jobs" }), el("div", { class: "toolbar" }, el("label", { for: "status-filter", text: "Status" }), select, updated), table, more);

    const reports = new Map(); // job id -> gap_closed (a finished job's report never changes)
    let shown = 20, timer = null, stopped = false, lastDrawn = null;

    async function gapClosed(job) {
      if (job.status !== "succeeded") return null;
      if (!reports.has(job.id)) reports.set(job.id, api(`/v1/jobs/${job.id}/report`).then((r) => r.gap_closed || {}).catch(() => null));
      return reports.get(job.id);
    }

    function progressCell(job) {
      const p = job.progress;
      if (!p || TERMINAL.includes(job.status)) return el("td", { text: TERMINAL.includes(job.status) ? "" : "–" });
      const parts = [p.stage ? `${p.stage} (${p.stage_index}/${p.stage_count})` : ""];
      if (p.step && p.total_steps) parts.push(`step ${p.step}/${p.total_steps}`);
      if (p.eta_seconds) parts.push(`ETA ${duration(p.eta_seconds)}`);
      const fraction = p.stage_index ? (p.stage_index - 1 + (p.total_steps ? (p.step || 0) / p.total_steps : 0)) / p.stage_count : 0;
      return el("td", {}, el("progress", { max: "1", value: String(fraction), "aria-label": `progress of ${job.id}` }), " ", parts.filter(Boolean).join(" · "));
    }

    async function refresh() {
      try {
        const page = await api(`/v1/jobs?limit=${shown}${status ? `&status=${status}` : ""}`);
        const closedOf = await Promise.all(page.data.map(gapClosed));
        const drawn = JSON.stringify([page, closedOf]);
        updated.textContent = `updated ${new Date().toLocaleTimeString()}`;
        if (stopped) return;
        if (drawn === lastDrawn) { showBanner(""); return; } // unchanged: keep the rows (and the keyboard focus on them)
        lastDrawn = drawn;
        const rows = page.data.map((job, i) => {
          const closed = closedOf[i];
          return el("tr", { "data-job": job.id },
            el("td", {}, el("a", { href: `#/jobs/${job.id}`, text: job.id }), job.suffix ? el("div", { class: "muted", text: job.suffix }) : null),
            el("td", {}, statusBadge(job.status)),
            el("td", { text: job.model }),
            el("td", { text: quantizationLabel(job.quantization) }),
            el("td", { text: job.method.type }),
            progressCell(job),
            el("td", { text: when(job.created_at) }),
            el("td", { class: "num", text: closed ? `${percent(closed.token_flip_rate)} / ${percent(closed.kl)}` : "" }));
        });
        body.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: "8", class: "muted", text: status ? `No ${status} jobs.` : "No jobs yet: create one with POST /v1/jobs or `qdpo jobs create`." }))]));
        more.hidden = !page.has_more || shown >= 100;
        showBanner("");
        exposed.ready = true;
      } catch (error) {
        reportError(error);
      }
    }

    async function loop() {
      await refresh();
      if (!stopped) timer = setTimeout(loop, 3000);
    }
    more.addEventListener("click", () => { shown = Math.min(100, shown + 20); refresh(); });
    loop();
    return () => { stopped = true; clearTimeout(timer); };
  }

  // --- one job's page --------------------------------------------------------------------------

  function jobView(jobId) {
    const controller = new AbortController();
    const disposers = [];
    let stopped = false, job = null, report = null, refreshTimer = null, pollTimer = null, lastDrawn = null;
    const stageTimes = {}; // stage -> {started, finished}
    const section = (id, title, ...content) => el("section", { id, "aria-labelledby": `${id}-title` }, el("h2", { id: `${id}-title`, text: title }), ...content);

    const heading = el("h1", {}, el("span", { id: "job-id", text: jobId }), " ", el("span", { id: "job-status" }));
    const facts = el("dl", { class: "facts", id: "job-facts" });
    const cancel = el("button", { type: "button", id: "cancel-job", class: "danger", hidden: true, text: "Cancel job", onclick: cancelJob });
    const downloads = el("span", { id: "downloads" });
    const errorBox = el("p", { class: "alert", id: "job-error", role: "alert", hidden: true });
    const timeline = el("ol", { class: "timeline", id: "timeline" });
    const stageProgress = el("p", { id: "stage-progress", class: "muted" });
    const training = el("div", { class: "charts", id: "training-charts" });
    const heldOut = el("div", { class: "charts", id: "heldout-charts" });
    const reportBox = el("div", { id: "report" }, el("p", { class: "muted", text: "The report is ready once the job succeeded." }));
    const samples = el("div", { id: "samples" });
    const showMetrics = el("input", { type: "checkbox", id: "show-metric-events" });
    const events = el("ol", { class: "events", id: "events", role: "log", "aria-live": "polite", "aria-relevant": "additions" });
    showMetrics.addEventListener("change", () => events.classList.toggle("with-metrics", showMetrics.checked));

    $("view").replaceChildren(
      el("nav", { class: "crumbs", "aria-label": "Breadcrumb" }, el("a", { href: "#/jobs", text: "Jobs" }), " / ", jobId),
      heading, facts, el("div", { class: "actions" }, cancel, downloads), errorBox,
      section("stages", "Stages", timeline, stageProgress),
      section("training", "Training, per optimizer step", training),
      section("heldout", "Held-out metrics per checkpoint", el("p", { class: "muted", text: "Step 0 is the initialised adapter before training; the dashed lines are full precision (FP) and the quantized model alone (PTQ-only); the ringed point is the checkpoint exported." }), heldOut),
      section("before-after", "Before / after", reportBox),
      section("samples-section", "Sample answers", samples),
      section("events-section", "Events", el("label", { class: "check" }, showMetrics, " show per-step metrics events"), events));

    function renderFacts() {
      const rows = [
        ["Model", job.model], ["Quantization", quantizationLabel(job.quantization)], ["Method", job.method.type],
        ["Created", when(job.created_at)], ["Started", when(job.started_at)], ["Finished", when(job.finished_at)],
        ["Attempts", String(job.attempts)], ["Fine-tuned model", job.fine_tuned_model || "–"],
      ];
      facts.replaceChildren(...rows.map(([k, v]) => el("div", {}, el("dt", { text: k }), el("dd", { text: v }))));
      $("job-status").replaceChildren(statusBadge(job.status));
      cancel.hidden = !CANCELLABLE.includes(job.status);
      cancel.disabled = false;
      const links = [];
      if (job.adapter) links.push(downloadButton("Download adapter", job.adapter.url, `${job.id}-adapter.tar.gz`, job.adapter.bytes));
      if (job.status === "succeeded" && job.quantization && job.quantization.method === "gguf") { // llama.cpp's files (a registered GGUF base is the user's own: 409 says so)
        links.push(downloadButton("Download GGUF adapter", `/v1/jobs/${job.id}/gguf/adapter`, `${job.id}-adapter.gguf`));
        links.push(downloadButton("Download GGUF model", `/v1/jobs/${job.id}/gguf/model`, `${job.id}-model.gguf`));
      }
      downloads.replaceChildren(...links);
      errorBox.hidden = !job.error;
      errorBox.textContent = job.error ? `${job.error.code}: ${job.error.message}` + (job.error.param ? ` (field: ${job.error.param})` : "") : "";
      const p = job.progress;
      stageProgress.textContent = p && !TERMINAL.includes(job.status) && p.stage
        ? `${p.stage}: stage ${p.stage_index} of ${p.stage_count}` + (p.step && p.total_steps ? `, step ${p.step}/${p.total_steps}` : "") + (p.eta_seconds ? `, about ${duration(p.eta_seconds)} left in this stage` : "")
        : "";
    }

    function downloadButton(label, url, filename, bytes) {
      const button = el("button", { type: "button", class: "download", text: label + (bytes ? ` (${(bytes / 1e6).toFixed(1)} MB)` : "") });
      button.addEventListener("click", async () => {
        button.disabled = true;
        const text = button.textContent;
        button.textContent = "Downloading…";
        try {
          const response = await request(url);
          const named = /filename="?([^";]+)"?/.exec(response.headers.get("content-disposition") || "");
          const blob = await response.blob();
          const link = el("a", { href: URL.createObjectURL(blob), download: named ? named[1] : filename });
          document.body.append(link);
          link.click();
          link.remove();
          setTimeout(() => URL.revokeObjectURL(link.href), 60000);
        } catch (error) {
          reportError(error);
        } finally {
          button.disabled = false;
          button.textContent = text;
        }
      });
      return button;
    }

    async function cancelJob() {
      if (!window.confirm(`Cancel ${jobId}? A running job stops at its next step.`)) return;
      cancel.disabled = true;
      try {
        job = await api(`/v1/jobs/${jobId}/cancel`, { method: "POST" });
        renderFacts();
      } catch (error) {
        reportError(error);
        cancel.disabled = false;
      }
    }

    function renderTimeline() {
      const current = job && !TERMINAL.includes(job.status) ? job.stage : null;
      timeline.replaceChildren(...STAGES.map((stage) => {
        const times = stageTimes[stage] || {};
        const state = times.finished ? "done" : stage === current || times.started ? (job && TERMINAL.includes(job.status) ? "stopped" : "running") : "pending";
        const took = times.finished && times.started ? duration(times.finished - times.started) : "";
        return el("li", { class: `stage-${state}`, "data-stage": stage, "aria-current": stage === current ? "step" : null },
          el("span", { class: "name", text: stage }), el("span", { class: "muted", text: state === "done" ? took : state }));
      }));
    }

    function renderTraining(metrics) {
      disposers.splice(0).forEach((d) => d());
      training.replaceChildren();
      heldOut.replaceChildren();
      const steps = metrics.map((m) => m.step);
      for (const [name, title, keys] of TRAINING_CHARTS) {
        const series = keys
          .filter(([key]) => metrics.some((m) => typeof m.values[key] === "number"))
          .filter(([key]) => key === "loss" || !metrics.every((m) => m.values[key] === m.values.loss)) // KD loss equal to the loss is the loss
          .map(([key, label], i) => ({ label, color: COLORS[i], values: metrics.map((m) => (typeof m.values[key] === "number" ? m.values[key] : null)) }));
        if (series.length) disposers.push(chart(training, name, title, "step", steps, series, name === "accuracy" ? (v) => percent(v) : number));
      }
      if (!steps.length) training.append(el("p", { class: "muted", text: "No training steps yet." }));
    }

    function renderHeldOut(checkpoints) {
      const init = report && report.init && report.init.metrics ? report.init : null;
      const points = checkpoints.map((c) => ({ step: c.step, metrics: c.metrics || {}, best: c.is_best }));
      if (init && !points.some((p) => p.step === 0)) points.unshift({ step: 0, metrics: init.metrics, best: false });
      points.sort((a, b) => a.step - b.step);
      const selected = report && report.selected_checkpoint !== undefined && report.selected_checkpoint !== null ? report.selected_checkpoint : (points.find((p) => p.best) || {}).step;
      const xs = points.map((p) => p.step);
      for (const [name, key, title, format] of [["flip", "token_flip_rate", "Held-out token-flip rate", (v) => percent(v, 1)], ["kl", "kl", "Held-out KL(FP‖model), nats/token", number]]) {
        if (!points.some((p) => typeof p.metrics[key] === "number")) continue;
        const values = points.map((p) => (typeof p.metrics[key] === "number" ? p.metrics[key] : null));
        const series = [{ label: init ? `checkpoints (step 0: ${init.init} init)` : "checkpoints", color: REF.line, values }];
        if (report && report.ptq && typeof report.ptq[key] === "number") series.push({ label: "PTQ-only", color: REF.ptq, dash: [6, 4], points: false, values: xs.map(() => report.ptq[key]) });
        if (report && report.fp && typeof report.fp[key] === "number") series.push({ label: "FP", color: REF.fp, dash: [6, 4], points: false, values: xs.map(() => report.fp[key]) });
        if (selected !== undefined && xs.includes(selected)) {
          series.push({ label: `selected (step ${selected})`, color: "#111", fill: REF.selected, size: 14, pointsOnly: true, width: 2, values: xs.map((x, i) => (x === selected ? values[i] : null)) });
        }
        disposers.push(chart(heldOut, name, title, "step", xs, series, format));
      }
      if (!points.length) heldOut.append(el("p", { class: "muted", text: "No checkpoint evaluated yet." }));
    }

    function renderReport() {
      if (!report) return;
      const init = report.init && report.init.kept && report.init.metrics ? report.init : null;
      const columns = ["FP", "PTQ-only", ...(init ? [`${init.init} init`] : []), "aligned", "gap closed"];
      const rows = ROWS.filter(([key]) => key in (report.aligned || {}) || key in (report.ptq || {})).map(([key, label, pattern]) => {
        const cells = [report.fp[key], report.ptq[key], ...(init ? [init.metrics[key]] : []), report.aligned[key]].map((v) => el("td", { class: "num", text: formatValue(v, pattern) }));
        cells.push(el("td", { class: "num", text: formatValue((report.gap_closed || {})[key], "{:.0%}") }));
        return el("tr", { "data-metric": key }, el("th", { scope: "row", text: `${label} ${HIGHER_IS_BETTER.has(key) ? "↑" : "↓"}` }), cells);
      });
      const table = el("table", { class: "report", id: "report-table" },
        el("caption", { text: `${report.method} on ${report.model} (${report.quantization_label}), ${report.eval_prompts} held-out prompts, checkpoint ${report.selected_checkpoint} exported` }),
        el("thead", {}, el("tr", {}, el("th", { scope: "col", text: "metric" }), columns.map((c) => el("th", { scope: "col", text: c })))),
        el("tbody", {}, rows));
      const parts = [table, el("p", { class: "verdict", id: "verdict", text: report.verdict || "" })];
      if (report.judge && report.judge.sentence) parts.push(el("p", { text: report.judge.sentence }));
      if (report.auto && report.auto.candidates) {
        parts.push(el("table", { class: "report", id: "auto-candidates" },
          el("caption", { text: `Method auto: ${report.auto.winner} won (held-out, teacher-forced)` }),
          el("thead", {}, el("tr", {}, ["candidate", "token-flip rate", "KL", "perplexity", "steps"].map((c) => el("th", { scope: "col", text: c })))),
          el("tbody", {}, report.auto.candidates.map((c) => el("tr", { class: c.name === report.auto.winner ? "winner" : null },
            el("th", { scope: "row", text: c.name + (c.name === report.auto.winner ? " (exported)" : "") }),
            el("td", { class: "num", text: formatValue(c.metrics.token_flip_rate, "{:.1%}") }),
            el("td", { class: "num", text: formatValue(c.metrics.kl, "{:.4f}") }),
            el("td", { class: "num", text: formatValue(c.metrics.perplexity, "{:.3f}") }),
            el("td", { class: "num", text: String(c.steps) }))))));
      }
      reportBox.replaceChildren(...parts);
      samples.replaceChildren(...(report.samples || []).map((s, i) => el("article", { class: "sample", "aria-label": `sample ${i + 1}` },
        el("p", { class: "prompt" }, el("strong", { text: "Prompt: " }), s.prompt),
        el("div", { class: "answers" }, [["FP", s.fp], ["PTQ-only", s.ptq], ["aligned", s.aligned]].map(([who, text]) =>
          el("figure", { class: "answer" }, el("figcaption", { text: who }), el("blockquote", { text: text || "" })))))));
      if (!(report.samples || []).length) samples.append(el("p", { class: "muted", text: "No samples in this report." }));
    }

    async function refresh() {
      try {
        job = await api(`/v1/jobs/${jobId}`);
        if (job.status === "succeeded" && !report) report = await api(`/v1/jobs/${jobId}/report`);
        const [metrics, checkpoints] = await Promise.all([api(`/v1/jobs/${jobId}/metrics`), api(`/v1/jobs/${jobId}/checkpoints`)]);
        if (stopped) return;
        renderFacts();
        renderTimeline();
        const drawn = JSON.stringify([metrics.data, checkpoints.data, Boolean(report)]);
        if (drawn !== lastDrawn) { // redraw the charts only when their data changed
          lastDrawn = drawn;
          renderTraining(metrics.data);
          renderHeldOut(checkpoints.data);
          renderReport();
        }
        showBanner("");
        exposed.ready = true;
      } catch (error) {
        if (error instanceof ApiError && error.status === 404) {
          $("view").replaceChildren(el("nav", { class: "crumbs" }, el("a", { href: "#/jobs", text: "Jobs" })), el("p", { class: "alert", role: "alert", id: "not-found", text: `${error.code}: ${error.message}` }));
          stopped = true;
          controller.abort();
          return;
        }
        reportError(error);
      }
    }

    function refreshSoon() {
      clearTimeout(refreshTimer);
      refreshTimer = setTimeout(refresh, 1000);
    }

    function addEvent(event) {
      if (event.type === "stage") {
        const times = (stageTimes[event.stage] = stageTimes[event.stage] || {});
        if (event.message === "started") times.started = event.created_at;
        if (event.message === "finished") times.finished = event.created_at;
        if (job) renderTimeline();
      }
      const time = new Date(event.created_at * 1000).toLocaleTimeString();
      events.append(el("li", { class: `event type-${event.type} level-${event.level}`, "data-id": event.id },
        el("span", { class: "muted", text: `${event.id} ${time}` }), " ", event.stage ? el("span", { class: "stage", text: `[${event.stage}]` }) : null, " ", event.message));
      if (events.childElementCount > 2000) events.firstElementChild.remove();
      if (["status", "checkpoint", "stage"].includes(event.type) || event.type === "metrics") refreshSoon();
    }

    async function stream() {
      // The events of the job as server-sent events (all of them, then live), with the key in a header.
      let last = null;
      while (!stopped) {
        try {
          const headers = { Accept: "text/event-stream" };
          if (last) headers["Last-Event-ID"] = last;
          const response = await request(`/v1/jobs/${jobId}/events?stream=true`, { headers, signal: controller.signal });
          const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
          let buffer = "", name = "message", data = [], id = null;
          for (;;) {
            const { value, done } = await reader.read();
            if (done) break;
            buffer += value;
            let newline;
            while ((newline = buffer.search(/\r?\n/)) >= 0) {
              const line = buffer.slice(0, newline);
              buffer = buffer.slice(newline + (buffer[newline] === "\r" ? 2 : 1));
              if (line === "") {
                if (data.length && name === "end") { refresh(); return; }
                if (data.length) { addEvent(JSON.parse(data.join("\n"))); last = id || last; }
                name = "message"; data = []; id = null;
              } else if (!line.startsWith(":")) {
                const colon = line.indexOf(":");
                const field = colon < 0 ? line : line.slice(0, colon);
                const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
                if (field === "event") name = text;
                else if (field === "data") data.push(text);
                else if (field === "id") id = text;
              }
            }
          }
        } catch (error) {
          if (stopped || (error instanceof ApiError && [401, 404].includes(error.status))) return;
        }
        await sleep(2000); // the connection dropped: resume after the last event seen
      }
    }

    async function poll() { // a fallback while the job runs, in case the stream is interrupted
      if (stopped) return;
      if (job && !TERMINAL.includes(job.status)) await refresh();
      pollTimer = setTimeout(poll, 5000);
    }

    refresh().then(() => { stream(); pollTimer = setTimeout(poll, 5000); });
    return () => {
      stopped = true;
      controller.abort();
      clearTimeout(refreshTimer);
      clearTimeout(pollTimer);
      disposers.splice(0).forEach((d) => d());
    };
  }

  // --- routing ---------------------------------------------------------------------------------

  function route() {
    if (state.dispose) state.dispose();
    state.dispose = null;
    exposed.ready = false;
    showBanner("");
    if (!state.key) { signOut(""); return; }
    $("login").hidden = true;
    $("view").hidden = false;
    $("sign-out").hidden = false;
    $("signed-in").textContent = `key ${state.key.slice(0, 12)}…`;
    const hash = window.location.hash.replace(/^#/, "") || "/jobs";
    const [path, query] = hash.split("?");
    const match = /^\/jobs\/([A-Za-z0-9_]{1,64})$/.exec(path);
    state.dispose = match ? jobView(match[1]) : jobsView(new URLSearchParams(query || ""));
    $("main").focus({ preventScroll: true });
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", signIn);
    $("sign-out").addEventListener("click", () => signOut(""));
    window.addEventListener("hashchange", route);
    route();
  });
})();
