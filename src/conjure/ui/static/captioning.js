// The data-set tab's auto-captioning: "Caption missing" (every image without a caption) and "Caption selected"
// start `conjure caption` in the server's background (POST /api/datasets/caption); the progress is polled from
// GET /api/datasets/caption and the grid reloads as captions land, to be edited as any caption.

import { $, api, attempt, plural, say } from "./api.js";

const POLL_MS = 700;

export function setupCaptioning(ds) {
  const progress = $("ds-autocap-progress");
  let written = -1;

  async function poll() {
    const run = await api("GET", "/api/datasets/caption");
    if (run.state === "idle") return;
    const running = run.state === "loading" || run.state === "captioning";
    progress.hidden = !running;
    progress.max = Math.max(run.total, 1);
    if (run.state === "loading") progress.removeAttribute("value"); // indeterminate while the model loads
    else progress.value = run.done;
    $("ds-autocap-missing").disabled = $("ds-autocap-selected").disabled = running;
    if (run.folder === ds.folder && run.written.length !== written) {
      written = run.written.length;
      await ds.load();
    }
    const skipped = run.skipped.map((s) => `${s.name}: ${s.reason}`).join("; ");
    if (run.state === "loading") say("ds-autocap-msg", "loading the model (the first time downloads it)...");
    else if (running) say("ds-autocap-msg", `captioned ${run.done} of ${plural(run.total, "image")}`);
    else if (run.state === "failed") say("ds-autocap-msg", run.error, "error");
    else {
      say("ds-autocap-msg", `${plural(run.written.length, "caption")} written, ${run.kept} kept`
        + `${skipped ? `; skipped ${skipped}` : ""}`, skipped ? "" : "ok");
      ds.loadTags();
    }
    if (running) setTimeout(() => attempt("ds-autocap-msg", poll), POLL_MS);
  }

  async function start(names) {
    if (names && names.length === 0) return say("ds-autocap-msg", "select images first", "error");
    const body = {
      folder: ds.folder, names, style: $("ds-autocap-style").value, prefix: $("ds-autocap-prefix").value.trim(),
      overwrite: names !== null && $("ds-autocap-overwrite").checked,
    };
    const model = $("ds-autocap-model").value.trim();
    if (model) body.model = model;
    await attempt("ds-autocap-msg", async () => {
      await api("POST", "/api/datasets/caption", body);
      written = -1;
      await poll();
    });
  }

  $("ds-autocap-missing").addEventListener("click", () => start(null));
  $("ds-autocap-selected").addEventListener("click", () => start([...ds.selected]));
  // The default model comes from the settings' schema (conjure.data.caption_settings), as the check's do.
  attempt("ds-autocap-msg", async () => {
    const settings = await api("GET", "/api/datasets/caption/schema");
    $("ds-autocap-model").placeholder = settings.properties.model.default;
    await poll(); // a run started before this page was opened
  });
}
