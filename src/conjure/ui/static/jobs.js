// The jobs tab: the queue with cancel/resume, and for the selected job its progress, chart, log, validation
// gallery (the suggested step marked: /api/jobs/{id}/score, conjure.runs.best) and export. Polls the server (once a second while something runs and the tab is shown).

import { $, api, attempt, el, plural, say, toast, url } from "./api.js";
import { drawLossChart, formatNumber } from "./chart.js";

const ACTIVE = new Set(["queued", "running"]);

function formatDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "";
  seconds = Math.max(0, Math.round(seconds));
  const h = Math.floor(seconds / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  const s = seconds % 60;
  if (h) return `${h} h ${String(m).padStart(2, "0")} min`;
  if (m) return `${m} min ${String(s).padStart(2, "0")} s`;
  return `${s} s`;
}

export const jobs = {
  list: [],
  selected: null,
  detail: null, // {id, next, points: Map(step -> {loss, lr}), heldOut: Map(step -> loss), score, checkpoints, ...}
  timer: null,
  busy: false,

  async refresh() {
    if (this.busy) return;
    this.busy = true;
    try {
      const data = await api("GET", "/api/jobs");
      this.list = data.jobs;
      this.renderList();
      if (this.selected === null && this.list.length) this.selected = this.list[0].id;
      if (this.selected !== null && !$("panel-jobs").hidden) await this.refreshDetail();
    } catch (exc) {
      toast(exc.message);
    } finally {
      this.busy = false;
    }
  },

  renderList() {
    const active = this.list.filter((j) => ACTIVE.has(j.status)).length;
    $("jobs-badge").hidden = active === 0;
    $("jobs-badge").textContent = String(active);
    $("jobs-empty").hidden = this.list.length > 0;
    $("jobs").replaceChildren(...this.list.map((job) => el("li", {
      class: `job-row${job.id === this.selected ? " current" : ""}`, "data-job": job.id,
    },
    el("button", {
      type: "button", class: "job-pick", "aria-current": job.id === this.selected ? "true" : null,
      onclick: () => { this.select(job.id); },
    },
    el("span", { class: "job-name", text: `#${job.id} ${job.run_name || job.type}${job.processes > 1 ? ` (${job.processes} processes)` : ""}` }),
    el("span", { class: `status ${job.status}`, text: job.status }),
    el("span", { class: "muted small", text: `${job.type} \u00b7 ${job.step}${job.max_steps ? ` / ${job.max_steps}` : ""} steps` })),
    el("span", { class: "job-actions" },
      ACTIVE.has(job.status) ? el("button", { type: "button", class: "small danger", text: "Cancel", "aria-label": `cancel job ${job.id}`, onclick: () => this.action(job.id, "cancel") }) : null,
      job.resumable && !ACTIVE.has(job.status) ? el("button", { type: "button", class: "small", text: "Resume", "aria-label": `resume job ${job.id}`, onclick: () => this.action(job.id, "resume") }) : null))));
  },

  select(id) {
    this.selected = id;
    this.detail = null;
    this.renderList();
    this.refreshDetail();
  },

  async action(id, verb) {
    if (verb === "cancel" && !confirm(`Cancel job #${id}? A running job saves a checkpoint first.`)) return;
    await attempt(null, async () => {
      const data = await api("POST", `/api/jobs/${id}/${verb}`);
      toast(`job #${id}: ${data.job.status}`);
      if (this.detail?.id === id) this.detail.finalFetched = false;
      await this.refresh();
    });
  },

  async refreshDetail() {
    const id = this.selected;
    if (id === null) return;
    if (!this.detail || this.detail.id !== id) {
      this.detail = { id, next: 0, points: new Map(), heldOut: new Map(), score: null, validations: 0, gallery: null, checkpoints: [], finalFetched: false, logAt: 0 };
      $("job-log").textContent = "";
      $("job-gallery").replaceChildren();
      $("exp-msg").textContent = "";
    }
    const detail = this.detail;
    const { job } = await api("GET", `/api/jobs/${id}`);
    if (this.detail !== detail) return;
    this.renderJob(job);
    const active = ACTIVE.has(job.status);
    if (!active && detail.finalFetched) return; // a finished job's files do not change: fetched once is enough
    const events = await api("GET", url(`/api/jobs/${id}/events`, { after: detail.next }));
    let newImages = !detail.gallery;
    let newCheckpoints = detail.checkpoints.length === 0;
    let newScores = !detail.score;
    for (const event of events.events) {
      if (event.event === "step") detail.points.set(event.step, { loss: event.loss, lr: event.lr });
      if (event.event === "validation_loss") detail.heldOut.set(event.step, event.loss);
      if (event.event === "validation_loss" || event.event === "image_scores") newScores = true;
      if (event.event === "validation") newImages = true;
      if (event.event === "checkpoint" || event.event === "checkpoint_removed") newCheckpoints = true;
    }
    detail.next = events.next;
    const byStep = (a, b) => a[0] - b[0];
    drawLossChart($("job-chart"), [...detail.points.entries()].sort(byStep), job.max_steps, [...detail.heldOut.entries()].sort(byStep));
    const [log, gallery, checkpoints, score] = await Promise.all([
      api("GET", url(`/api/jobs/${id}/log`, { tail: 200 })),
      newImages || !active ? api("GET", `/api/jobs/${id}/validation`) : null,
      newCheckpoints || !active ? api("GET", `/api/jobs/${id}/checkpoints`) : null,
      newScores || newCheckpoints || !active ? api("GET", `/api/jobs/${id}/score`) : null,
    ]);
    if (this.detail !== detail) return;
    this.renderLog(log.lines);
    if (score) detail.score = score;
    if (checkpoints) {
      detail.checkpoints = checkpoints.checkpoints;
      this.renderExportSteps();
    }
    if (gallery) detail.gallery = gallery;
    if (gallery || score) this.renderGallery();
    if (!active) detail.finalFetched = true;
  },

  renderJob(job) {
    $("job").hidden = false;
    $("job-title").textContent = `#${job.id} ${job.run_name || job.type}`;
    const status = $("job-status");
    status.textContent = job.status;
    status.className = `status ${job.status}`;
    $("job-cancel").hidden = !ACTIVE.has(job.status);
    $("job-resume").hidden = !(job.resumable && !ACTIVE.has(job.status));
    const error = $("job-error");
    error.hidden = !job.error;
    error.textContent = job.error || "";
    const progress = $("job-progress");
    progress.max = job.max_steps || 1;
    progress.value = job.max_steps ? Math.min(job.step, job.max_steps) : 0;
    $("job-steps").textContent = `step ${job.step} / ${job.max_steps ?? "?"}`;
    let eta = "";
    if (job.status === "running") eta = job.eta_seconds !== null && job.eta_seconds !== undefined ? `about ${formatDuration(job.eta_seconds)} left` : "starting...";
    else if (job.status === "completed") eta = job.started && job.ended ? `done in ${formatDuration((Date.parse(job.ended) - Date.parse(job.started)) / 1000)}` : "done";
    else if (job.status === "queued") eta = "waiting in the queue";
    $("job-eta").textContent = eta;
    $("job-loss").textContent = job.loss !== null && job.loss !== undefined ? `loss ${formatNumber(job.loss)}` : "";
    $("job").dataset.status = job.status;
  },

  renderLog(lines) {
    const pre = $("job-log");
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 8;
    // tqdm redraws its bar with carriage returns: show each line's last state, as a terminal would
    pre.textContent = lines.map((line) => line.split("\r").filter(Boolean).pop() || "").join("\n");
    if (atBottom) pre.scrollTop = pre.scrollHeight;
  },


  checkpointSteps() {
    return new Set(this.detail.checkpoints.map((c) => c.step));
  },

  renderGallery() {
    const { gallery } = this.detail;
    const box = $("job-gallery");
    if (!gallery || !gallery.steps.length) {
      box.replaceChildren(el("p", { class: "muted", text: "No validation images yet." }));
      return;
    }
    const saved = this.checkpointSteps();
    const suggestion = this.renderSuggestion();
    const marked = (step) => (suggestion && suggestion.step === step ? "suggested" : null);
    const figures = new Map((this.detail.score?.rows || []).map((r) => [r.step, r]));
    const scores = (step) => {
      const r = figures.get(step);
      if (!r) return null;
      const parts = [["held-out", r.val_loss], ["fidelity", r.fidelity], ["alignment", r.alignment]]
        .filter(([, v]) => Number.isFinite(v)).map(([name, v]) => `${name} ${formatNumber(v)}`);
      return parts.length ? el("span", { class: "step-scores" }, parts.map((text) => el("span", { text }))) : null;
    };
    const head = el("tr", {}, el("th", { scope: "col", text: "prompt" }), gallery.steps.map((s) => el("th", { scope: "col", class: marked(s.step), "data-step": s.step },
      marked(s.step) ? el("span", { class: "suggested-badge", text: "suggested", title: suggestion.reason }) : null,
      el("div", { text: `step ${s.step}` }),
      scores(s.step),
      el("button", {
        type: "button", class: "small use-step", text: "Use this step", disabled: !saved.has(s.step),
        title: saved.has(s.step) ? "export this step's files" : "no checkpoint was saved at this step",
        "data-step": s.step, onclick: () => this.useStep(s.step),
      }))));
    const rows = gallery.prompts.map((prompt, pi) => el("tr", {},
      el("th", { scope: "row", class: "prompt", text: prompt }),
      gallery.steps.map((s) => el("td", { class: marked(s.step) }, s.images.filter((img) => img.prompt_index === pi).map((img) =>
        el("a", { href: img.url, target: "_blank", rel: "noopener", title: `seed ${img.seed}` },
          el("img", { src: img.url, alt: `${prompt}, seed ${img.seed}, step ${s.step}`, loading: "lazy", class: "val-img" })))))));
    box.replaceChildren(el("table", { class: "gallery-table" }, el("thead", {}, head), el("tbody", {}, rows)));
  },

  // The suggested step and why, above the gallery (or why none); returns the suggestion (null before any answer).
  renderSuggestion() {
    const suggestion = this.detail.score?.suggestion || null;
    const note = $("job-suggestion");
    note.hidden = !suggestion;
    if (suggestion) {
      note.replaceChildren(el("strong", { text: suggestion.step === null ? "No step suggested: " : `Suggested step ${suggestion.step}: ` }),
        el("span", { text: suggestion.reason }), el("span", { class: "muted", text: ` (rule: ${suggestion.rule})` }));
    }
    return suggestion;
  },

  renderExportSteps() {
    const select = $("exp-step");
    const previous = select.value;
    const steps = this.detail.checkpoints.map((c) => c.step).sort((a, b) => a - b);
    select.replaceChildren(el("option", { value: "latest", text: "latest" }),
      ...steps.map((s) => el("option", { value: String(s), text: `step ${s}` })));
    if ([...select.options].some((o) => o.value === previous)) select.value = previous;
    if (this.detail.gallery) this.renderGallery();
  },

  useStep(step) {
    $("exp-step").value = String(step);
    $("job-export").scrollIntoView({ behavior: "smooth", block: "center" });
    $("exp-to").focus();
    say("exp-msg", `step ${step} chosen: pick a folder or an app and press Export`);
  },

  async exportStep(event) {
    event.preventDefault();
    const id = this.selected;
    const raw = $("exp-step").value;
    const body = { step: raw === "latest" ? "latest" : Number(raw), to: $("exp-to").value.trim() };
    if ($("exp-app").value) body.app = $("exp-app").value;
    if ($("exp-name").value.trim()) body.name = $("exp-name").value.trim();
    if ($("exp-force").checked) body.force = true;
    say("exp-msg", "exporting...");
    await attempt("exp-msg", async () => {
      const data = await api("POST", `/api/jobs/${id}/export`, body);
      const box = $("exp-msg");
      box.replaceChildren(el("span", { text: `exported ${plural(data.files.length, "file")}: ` }),
        ...data.files.map((f) => el("code", { class: "exported", text: f })),
        ...(data.usage || []).map((line) => el("span", { class: "usage", text: line })));
      box.className = "msg ok";
    });
  },

  // The same targets as `conjure export --to/--to-app`: a plain folder, or an app's own folder
  chooseTarget() {
    const app = $("exp-app").value;
    $("exp-to-label").textContent = app ? `${$("exp-app").selectedOptions[0].text} folder` : "Export to folder";
    $("exp-to").placeholder = app ? "/full/path/to/the/app" : "/full/path/to/your/app/embeddings";
  },

  setup() {
    $("exp-app").addEventListener("change", () => this.chooseTarget());
    $("job-cancel").addEventListener("click", () => this.action(this.selected, "cancel"));
    $("job-resume").addEventListener("click", () => this.action(this.selected, "resume"));
    $("job-export").addEventListener("submit", (event) => this.exportStep(event));
    // Poll: quickly while a job is active or the tab is open, slowly otherwise (the tab badge still updates).
    let ticks = 0;
    this.timer = setInterval(() => {
      ticks += 1;
      const watching = !$("panel-jobs").hidden;
      const active = this.list.some((j) => ACTIVE.has(j.status));
      if (document.visibilityState === "visible" && ((watching && (active || ticks % 5 === 0)) || ticks % 10 === 0)) this.refresh();
    }, 1000);
  },
};
