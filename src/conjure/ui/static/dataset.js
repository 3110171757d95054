// The data-set tab: open a folder, thumbnails, the large view with its caption, bulk edits, tags, upload,
// trash, the check and JSONL export (the /api/datasets endpoints of docs/ui.md); auto-captions: captioning.js.

import { $, api, attempt, debounce, el, plural, say, toast, url } from "./api.js";
import { setupCaptioning } from "./captioning.js";

export const ds = {
  folder: null,
  images: [],
  selected: new Set(),
  current: -1, // index into visible() of the image in the viewer
  dirty: false,

  visible() {
    const filter = $("ds-filter").value.trim().toLowerCase();
    if (!filter) return this.images;
    return this.images.filter((img) => (img.caption || "").toLowerCase().includes(filter)
      || img.name.toLowerCase().includes(filter));
  },

  async open(path) {
    say("ds-open-msg", "opening...");
    const opened = await api("POST", "/api/datasets/open", { path });
    this.folder = opened.path;
    this.selected.clear();
    $("ds-path").value = opened.path;
    localStorage.setItem("conjure.dataset", opened.path);
    say("ds-open-msg", "");
    $("ds-body").hidden = false;
    $("ds-check").replaceChildren();
    $("ds-jsonl-msg").textContent = "";
    await Promise.all([this.load(), this.loadTags(), this.loadRecent()]);
  },

  async loadRecent() {
    const data = await api("GET", "/api/datasets");
    $("ds-recent").replaceChildren(...data.datasets.map((d) => el("option", { value: d.path, label: plural(d.images, "image") })));
    return data.datasets;
  },

  async load() {
    const data = await api("GET", url("/api/datasets/images", { folder: this.folder }));
    this.images = data.images;
    const names = new Set(this.images.map((img) => img.name));
    for (const name of [...this.selected]) if (!names.has(name)) this.selected.delete(name);
    this.render();
  },

  thumb(img) {
    return url("/api/datasets/thumb", { folder: this.folder, name: img.name, size: 256 });
  },

  renderCounts(shown = this.visible()) {
    const total = this.images.length;
    $("ds-count").textContent = `${plural(total, "image")}${shown.length !== total ? `, ${shown.length} shown` : ""}`
      + (this.selected.size ? `, ${this.selected.size} selected` : "");
    $("ds-trash").disabled = this.selected.size === 0;
  },

  render() {
    const shown = this.visible();
    this.renderCounts(shown);
    const grid = $("ds-grid");
    grid.replaceChildren(...shown.map((img, index) => {
      const checked = this.selected.has(img.name);
      const box = el("input", {
        type: "checkbox", checked, "aria-label": `select ${img.name}`,
        onchange: (event) => {
          if (event.target.checked) this.selected.add(img.name);
          else this.selected.delete(img.name);
          event.target.closest("li").classList.toggle("selected", event.target.checked);
          this.renderCounts(); // not the whole grid: keyboard focus stays on the checkbox
        },
      });
      const caption = img.caption === null ? "no caption" : (img.caption || "empty caption");
      return el("li", { class: `tile${checked ? " selected" : ""}`, "data-name": img.name },
        el("button", { type: "button", class: "thumb", title: "open", onclick: () => this.view(index) },
          el("img", { src: this.thumb(img), alt: img.name, loading: "lazy", width: 160, height: 160 })),
        el("div", { class: "tile-meta" }, box,
          el("span", { class: "name", text: img.name, title: `${img.name} (${img.width}x${img.height})` })),
        el("p", { class: `caption${img.caption ? "" : " missing"}`, text: caption, title: img.caption || "" }));
    }));
  },

  // ---- the large view
  view(index) {
    const shown = this.visible();
    if (index < 0 || index >= shown.length) return;
    this.current = index;
    const img = shown[index];
    $("ds-viewer-title").textContent = img.name;
    $("ds-viewer-img").src = url("/api/datasets/image", { folder: this.folder, name: img.name });
    $("ds-viewer-img").alt = img.name;
    $("ds-viewer-size").textContent = `${img.width} x ${img.height} px${img.mask ? ", has a loss mask" : ""}`
      + ` (${index + 1} of ${shown.length})`;
    $("ds-caption").value = img.caption ?? "";
    this.dirty = false;
    say("ds-caption-state", img.caption === null ? "no caption file yet" : "saved");
    $("ds-prev").disabled = index === 0;
    $("ds-next").disabled = index === shown.length - 1;
    const dialog = $("ds-viewer");
    if (!dialog.open) dialog.showModal();
    $("ds-caption").focus();
  },

  async saveCaption() {
    const img = this.visible()[this.current];
    if (!img) return false;
    const caption = $("ds-caption").value;
    say("ds-caption-state", "saving...");
    try {
      const saved = await api("PUT", "/api/datasets/caption", { folder: this.folder, name: img.name, caption });
      img.caption = saved.caption;
      this.dirty = $("ds-caption").value !== saved.caption;
      say("ds-caption-state", this.dirty ? "unsaved changes" : "saved", this.dirty ? "" : "ok");
      this.render();
      this.loadTags();
      return true;
    } catch (exc) {
      say("ds-caption-state", exc.message, "error");
      return false;
    }
  },

  async step(delta) {
    // Moving on saves the caption being edited, as captioning tools do; closing asks instead.
    if (this.dirty && !(await this.saveCaption())) return;
    this.view(this.current + delta);
  },

  names(scope) {
    return scope === "all" ? null : [...this.selected];
  },

  async bulk(event) {
    event.preventDefault();
    const op = $("ds-bulk-op").value;
    const scope = document.querySelector("input[name=ds-bulk-scope]:checked").value;
    const names = this.names(scope);
    if (names && names.length === 0) return say("ds-bulk-msg", "select images first, or apply to all", "error");
    const body = { folder: this.folder, names, op, text: $("ds-bulk-text").value };
    if (op === "replace") {
      body.find = $("ds-bulk-find").value;
      if (!body.find) return say("ds-bulk-msg", "give the text to find", "error");
    } else if (!body.text) return say("ds-bulk-msg", "give the text to add", "error");
    await attempt("ds-bulk-msg", async () => {
      const result = await api("POST", "/api/datasets/bulk", body);
      say("ds-bulk-msg", `${plural(result.changed, "caption")} changed`, "ok");
      await Promise.all([this.load(), this.loadTags()]);
    });
  },

  async loadTags() {
    if (!this.folder) return;
    const data = await api("GET", url("/api/datasets/tags", { folder: this.folder, delimiter: $("ds-delimiter").value || "," }));
    const list = $("ds-tags");
    list.replaceChildren(...data.tags.map((t) => el("li", {},
      el("button", {
        type: "button", class: "link", title: "show the images whose caption has this tag",
        onclick: () => { $("ds-filter").value = t.tag; this.render(); },
      }, el("span", { class: "tag", text: t.tag }), el("span", { class: "count", text: String(t.count) })))));
    if (!data.tags.length) list.append(el("li", { class: "muted", text: "no captions yet" }));
  },

  async upload(files) {
    const images = [...files].filter((f) => f.type.startsWith("image/") || /\.(png|jpe?g|webp|bmp|gif|tiff?)$/i.test(f.name));
    if (!images.length) return toast("no image files to add");
    const form = new FormData();
    form.append("folder", this.folder);
    for (const file of images) form.append("files", file, file.name);
    toast(`uploading ${plural(images.length, "image")}...`);
    await attempt(null, async () => {
      const result = await api("POST", "/api/datasets/upload", form);
      const refused = (result.refused || []).map((r) => `${r.name}: ${r.reason}`);
      toast(`added ${plural(result.added.length, "image")}${refused.length ? `; refused ${refused.join("; ")}` : ""}`);
      await this.load();
    });
  },

  async trash() {
    const names = [...this.selected];
    if (!names.length) return;
    if (!confirm(`Move ${plural(names.length, "image")} (with captions and masks) to ${this.folder}/.trash?`)) return;
    await attempt(null, async () => {
      const result = await api("POST", "/api/datasets/trash", { folder: this.folder, names });
      this.selected.clear();
      toast(`moved ${plural(result.moved.length, "image")} to .trash`);
      await Promise.all([this.load(), this.loadTags()]);
    });
  },

  async check(event) {
    event.preventDefault();
    const box = $("ds-check");
    box.replaceChildren(el("p", { class: "muted", text: "checking (every image is decoded once)..." }));
    try {
      // An empty field sends no resolution (undefined is left out of the JSON): the server's default applies.
      const body = { folder: this.folder, resolution: Number($("ds-resolution").value) || undefined };
      const report = await api("POST", "/api/datasets/check", body);
      const c = report.counts;
      const prefix = this.folder.endsWith("/") ? this.folder : `${this.folder}/`;
      box.replaceChildren(
        el("p", { class: report.ok ? "ok" : "error", text: report.ok ? "ready to train" : "not ready: fix the errors" }),
        el("p", { class: "small", text: `${c.usable} of ${plural(c.images, "image")} usable; ${c.with_caption} with a caption, `
          + `${c.without_caption} without; ${plural(c.duplicates, "duplicate")}; ${plural(c.errors, "error")}, ${plural(c.warnings, "warning")}` }),
        el("ul", { class: "findings" }, report.problems.map((p) => el("li", { class: p.severity },
          el("span", { class: "sev", text: p.severity }),
          el("span", { class: "path", text: p.path.startsWith(prefix) ? p.path.slice(prefix.length) : p.path }),
          el("span", { text: p.message })))));
    } catch (exc) {
      box.replaceChildren(el("p", { class: "error", text: exc.message }));
    }
  },

  async jsonl(event) {
    event.preventDefault();
    await attempt("ds-jsonl-msg", async () => {
      const result = await api("POST", "/api/datasets/jsonl", { folder: this.folder, out: $("ds-jsonl-name").value });
      say("ds-jsonl-msg", `wrote ${result.path} (${plural(result.lines, "line")})`, "ok");
    });
  },

  setup() {
    $("ds-open").addEventListener("submit", (event) => {
      event.preventDefault();
      attempt("ds-open-msg", () => this.open($("ds-path").value.trim()));
    });
    $("ds-select-all").addEventListener("click", () => { for (const img of this.visible()) this.selected.add(img.name); this.render(); });
    $("ds-select-none").addEventListener("click", () => { this.selected.clear(); this.render(); });
    $("ds-filter").addEventListener("input", debounce(() => this.render(), 150));
    $("ds-upload").addEventListener("change", (event) => { this.upload(event.target.files); event.target.value = ""; });
    $("ds-trash").addEventListener("click", () => this.trash());
    $("ds-bulk").addEventListener("submit", (event) => this.bulk(event));
    $("ds-bulk-op").addEventListener("change", () => {
      const replace = $("ds-bulk-op").value === "replace";
      $("ds-bulk-find-row").hidden = !replace;
      $("ds-bulk-text-label").textContent = replace ? "Replace with" : "Text";
    });
    $("ds-tags-form").addEventListener("submit", (event) => { event.preventDefault(); attempt(null, () => this.loadTags()); });
    $("ds-check-form").addEventListener("submit", (event) => this.check(event));
    $("ds-jsonl-form").addEventListener("submit", (event) => this.jsonl(event));
    setupCaptioning(this);

    const grid = $("ds-grid");
    grid.addEventListener("dragover", (event) => { event.preventDefault(); grid.classList.add("drop"); });
    grid.addEventListener("dragleave", () => grid.classList.remove("drop"));
    grid.addEventListener("drop", (event) => {
      event.preventDefault();
      grid.classList.remove("drop");
      if (event.dataTransfer?.files?.length) this.upload(event.dataTransfer.files);
    });

    $("ds-caption").addEventListener("input", () => {
      this.dirty = true;
      say("ds-caption-state", "unsaved changes");
    });
    $("ds-caption").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); this.saveCaption(); }
    });
    $("ds-caption-save").addEventListener("click", () => this.saveCaption());
    $("ds-prev").addEventListener("click", () => this.step(-1));
    $("ds-next").addEventListener("click", () => this.step(1));
    const dialog = $("ds-viewer");
    const keepIfDirty = (event) => {
      if (this.dirty && !confirm("Discard the unsaved caption?")) event.preventDefault();
    };
    dialog.addEventListener("cancel", keepIfDirty);
    dialog.querySelector("button[value=close]").addEventListener("click", keepIfDirty);
    dialog.addEventListener("close", () => { this.dirty = false; $("ds-viewer-img").removeAttribute("src"); });
  },

  async init() {
    const known = await this.loadRecent();
    const last = localStorage.getItem("conjure.dataset");
    if (last && known.some((d) => d.path === last)) await attempt("ds-open-msg", () => this.open(last));
    // The check's defaults come from its settings' schema (conjure.data.check_settings), as the training form's do.
    const settings = await api("GET", "/api/datasets/check/schema");
    if (!$("ds-resolution").value) $("ds-resolution").value = settings.properties.resolution.default;
  },
};
