// The training tab: a form generated from the config type's JSON schema, the same config as YAML (kept in
// sync both ways through the server, which alone knows the config rules), saved configs, launch.

import { $, api, attempt, debounce, el, plural, say, url } from "./api.js";
import { jobs } from "./jobs.js";
import { showTab } from "./tabs.js";

// A field's shape from its JSON schema (pydantic v2): `anyOf [X, null]` is a nullable X, `enum` a select,
// arrays of scalars one item per line, arrays of objects a list of sub-forms.
function resolveRef(schema, node) {
  let out = node;
  while (out && out.$ref) out = { ...schema.$defs[out.$ref.split("/").pop()], ...withoutKey(out, "$ref") };
  if (out && Array.isArray(out.allOf) && out.allOf.length === 1) out = { ...resolveRef(schema, out.allOf[0]), ...withoutKey(out, "allOf") };
  return out;
}

function withoutKey(object, key) {
  const rest = { ...object };
  delete rest[key];
  return rest;
}

function shape(schema, prop) {
  prop = resolveRef(schema, prop);
  let nullable = false;
  let inner = prop;
  if (Array.isArray(prop.anyOf)) {
    const options = prop.anyOf.map((o) => resolveRef(schema, o));
    const nonNull = options.filter((o) => o.type !== "null");
    nullable = nonNull.length < options.length;
    inner = nonNull.length === 1 ? { ...nonNull[0] } : { type: "json" };
  }
  let kind = inner.type || "json";
  if (prop.const !== undefined || inner.const !== undefined) kind = "const";
  else if (Array.isArray(inner.enum)) kind = "enum";
  else if (kind === "array") {
    const items = resolveRef(schema, inner.items || {});
    kind = items.type === "object" || items.properties ? "objects" : "list";
    inner = { ...inner, items };
  } else if (kind === "object" && !inner.properties) kind = "json";
  return { kind, nullable, inner, prop };
}

function getPath(object, path) {
  let node = object;
  for (const key of path) {
    if (node === null || typeof node !== "object" || !(key in node)) return undefined;
    node = node[key];
  }
  return node;
}

function setPath(object, path, value) {
  let node = object;
  for (const key of path.slice(0, -1)) {
    if (node[key] === null || typeof node[key] !== "object") node[key] = typeof key === "number" ? [] : {};
    node = node[key];
  }
  node[path[path.length - 1]] = value;
}

function deletePath(object, path) {
  const parent = getPath(object, path.slice(0, -1));
  if (parent && typeof parent === "object") delete parent[path[path.length - 1]];
  // a section left empty goes too, so the YAML stays as short as what the user set
  if (path.length === 2) {
    const section = object[path[0]];
    if (section && typeof section === "object" && !Array.isArray(section) && !Object.keys(section).length) delete object[path[0]];
  }
}

const pathId = (path) => `f-${path.join("-").replace(/[^A-Za-z0-9_-]/g, "_")}`;

export const training = {
  schema: null,
  type: null,
  config: null,
  errors: [],
  // what basic.memory_preset filled (dotted name -> value): shown in its fields, kept out of this.config, so that
  // another preset chosen here applies its own; a field edited here is the user's (conjure.config.presets)
  preset: {},
  openSections: null,
  seq: 0, // drops answers to stale requests when edits overtake each other

  async init() {
    const data = await api("GET", "/api/methods");
    $("tr-method").replaceChildren(...data.methods.map((m) => el("option", {
      value: m.type, text: `${m.title} (${m.families.join(", ")})`,
    })));
    await this.loadSavedList();
    const draft = localStorage.getItem("conjure.draft");
    if (draft) {
      $("tr-yaml").value = draft;
      await this.fromYaml();
    }
  },

  async loadSchema(type) {
    if (this.type === type && this.schema) return;
    this.schema = await api("GET", url("/api/config/schema", { type }));
    this.type = type;
    this.openSections = null;
    if ([...$("tr-method").options].some((o) => o.value === type)) $("tr-method").value = type;
  },

  async newConfig() {
    const type = $("tr-method").value;
    const data = await api("POST", "/api/config/new", { type });
    await this.loadSchema(type);
    this.config = data.config;
    this.buildForm();
    await this.sync();
  },

  // ---- building the form
  buildForm() {
    const form = $("tr-form");
    if (!this.schema || !this.config) return;
    if (this.openSections === null) this.openSections = new Set(this.schema.required || []);
    const errorFields = new Set(this.errors.map((e) => (e.field || "").split(".")[0]));
    const parts = [];
    for (const [name, raw] of Object.entries(this.schema.properties)) {
      const field = shape(this.schema, raw);
      if (field.kind === "const") {
        parts.push(el("p", { class: "type-line" }, `${name}: `, el("code", { text: field.prop.const ?? field.inner.const })));
        continue;
      }
      if (field.kind !== "object") {
        parts.push(this.field([name], field, raw));
        continue;
      }
      const open = this.openSections.has(name) || errorFields.has(name);
      const details = el("details", { class: "section", open, "data-section": name },
        el("summary", {}, el("span", { class: "section-name", text: name }),
          el("span", { class: "muted small", text: field.inner.description || "" })),
        el("div", { class: "fields" }, Object.entries(field.inner.properties).map(([key, prop]) =>
          this.field([name, key], shape(this.schema, prop), prop, (field.inner.required || []).includes(key)))));
      details.addEventListener("toggle", () => {
        if (details.open) this.openSections.add(name);
        else this.openSections.delete(name);
      });
      parts.push(details);
    }
    parts.push(el("div", { id: "tr-other-errors", class: "errors", "aria-live": "polite" }));
    form.replaceChildren(...parts);
    this.showErrors();
  },

  field(path, field, raw, required = false) {
    const id = pathId(path);
    const { kind, nullable, inner, prop } = field;
    if (kind === "object") {  // a section inside a section (finetune.ema): its own fields in a fieldset
      return el("fieldset", { class: "object-item", "data-field": path.join(".") },
        el("legend", { text: String(path[path.length - 1]) }),
        el("p", { class: "help", text: inner.description || "" }),
        Object.entries(inner.properties).map(([key, sub]) =>
          this.field([...path, key], shape(this.schema, sub), sub, (inner.required || []).includes(key))));
    }
    // "set" means: differs from the default (a valid config comes back from the server with every default
    // filled in, so presence alone says nothing)
    const given = getPath(this.config, path);
    const filled = this.preset[path.join(".")];
    const value = given !== undefined ? given : (filled !== undefined ? filled : prop.default);
    const set = given !== undefined && JSON.stringify(given) !== JSON.stringify(prop.default);
    const helpId = `${id}-help`;
    const errId = `${id}-err`;
    const described = `${helpId} ${errId}`;
    const name = path[path.length - 1];
    const label = el("label", { for: id }, el("span", { text: String(name) }), required ? el("span", { class: "req", text: " *", title: "required" }) : null);
    let input;
    const common = { id, "data-path": path.join("."), "aria-describedby": described };

    if (kind === "boolean") {
      input = el("input", { ...common, type: "checkbox", checked: Boolean(value) });
    } else if (kind === "enum") {
      input = el("select", common,
        nullable ? el("option", { value: "", text: "(none)" }) : null,
        inner.enum.map((option) => el("option", { value: String(option), text: String(option) })));
      input.value = value === null || value === undefined ? "" : String(value);
    } else if (kind === "integer" || kind === "number") {
      input = el("input", {
        ...common, type: "number", step: kind === "integer" ? (inner.multipleOf || 1) : "any",
        min: inner.minimum ?? inner.exclusiveMinimum, max: inner.maximum ?? inner.exclusiveMaximum,
        placeholder: nullable ? "none" : "", inputmode: kind === "integer" ? "numeric" : "decimal",
      });
      input.value = value === null || value === undefined ? "" : String(value);
    } else if (kind === "list") {
      input = el("textarea", { ...common, rows: Math.min(6, Math.max(2, (value || []).length + 1)), placeholder: "one per line" });
      input.value = Array.isArray(value) ? value.join("\n") : "";
    } else if (kind === "objects") {
      return this.objectList(path, field, value || [], label, helpId, errId);
    } else if (kind === "json") {
      input = el("input", { ...common, type: "text", placeholder: nullable ? "none" : "" });
      input.value = value === null || value === undefined ? "" : (typeof value === "string" ? value : JSON.stringify(value));
    } else {
      input = el("input", {
        ...common, type: "text", placeholder: nullable ? "none" : (prop.example ?? prop.starter ?? ""), autocomplete: "off", spellcheck: false,
      });
      input.value = value === null || value === undefined ? "" : String(value);
    }
    input.addEventListener(kind === "boolean" || kind === "enum" ? "change" : "input", () => this.onInput(path, field, input));
    const reset = el("button", {
      type: "button", class: "reset", title: "back to the default", "aria-label": `reset ${path.join(".")} to its default`,
      hidden: !set || required, text: "\u21ba",
      onclick: () => { deletePath(this.config, path); this.buildForm(); this.syncSoon(); },
    });
    const help = [prop.description, prop.note, given === undefined && filled !== undefined ? "Set by basic.memory_preset." : ""].filter(Boolean).join(" ");
    const shown = typeof prop.default === "string" && prop.default ? prop.default : JSON.stringify(prop.default);
    const defaultText = prop.default !== undefined && prop.default !== null ? ` Default: ${shown}.` : "";
    return el("div", { class: `field kind-${kind}${set ? "" : " is-default"}`, "data-field": path.join("."), "data-required": required ? "1" : null },
      label, el("div", { class: "control" }, input, reset),
      el("p", { class: "help", id: helpId, text: `${help}${nullable ? " Empty: none." : ""}${defaultText}` }),
      el("p", { class: "field-error", id: errId }));
  },

  // An array of objects (data.sources): one small fieldset per item, with add and remove.
  objectList(path, field, items, label, helpId, errId) {
    const itemSchema = field.inner.items;
    const list = el("div", { class: "object-list" }, items.map((item, index) => el("fieldset", { class: "object-item" },
      el("legend", { text: `${path[path.length - 1]} ${index + 1}` }),
      Object.entries(itemSchema.properties || {}).map(([key, prop]) =>
        this.field([...path, index, key], shape(this.schema, prop), prop, (itemSchema.required || []).includes(key))),
      el("button", {
        type: "button", class: "danger small", text: "Remove",
        onclick: () => {
          const current = getPath(this.config, path) || [];
          current.splice(index, 1);
          if (!current.length) deletePath(this.config, path);
          this.buildForm();
          this.syncSoon();
        },
      }))));
    const add = el("button", {
      type: "button", text: `Add ${path[path.length - 1].replace(/s$/, "")}`,
      onclick: () => {
        const current = getPath(this.config, path) || [];
        current.push({});
        setPath(this.config, path, current);
        this.buildForm();
        this.syncSoon();
      },
    });
    return el("div", { class: "field kind-objects", "data-field": path.join(".") },
      el("div", { class: "label-like" }, label.firstChild),
      list, add,
      el("p", { class: "help", id: helpId, text: field.prop.description || "" }),
      el("p", { class: "field-error", id: errId }));
  },

  onInput(path, field, input) {
    const { kind, nullable } = field;
    let value;
    if (kind === "boolean") value = input.checked;
    else if (kind === "enum") value = input.value === "" && nullable ? null : input.value;
    else if (kind === "integer" || kind === "number") {
      // a half-typed number ("1e-") reads as "" with badInput: wait for the rest rather than clear the field
      if (input.validity.badInput) return;
      value = input.value === "" ? (nullable ? null : undefined) : Number(input.value);
    } else if (kind === "list") {
      const lines = input.value.split("\n").map((s) => s.trim()).filter(Boolean);
      const numeric = ["integer", "number"].includes(field.inner.items?.type);
      value = numeric ? lines.map((s) => (Number.isNaN(Number(s)) ? s : Number(s))) : lines;
    } else if (kind === "json") {
      if (input.value === "") value = nullable ? null : undefined;
      else {
        try { value = JSON.parse(input.value); } catch { value = input.value; }
      }
    } else value = input.value === "" && nullable ? null : input.value;

    if (value === undefined) deletePath(this.config, path);
    else setPath(this.config, path, value);
    const wrapper = input.closest(".field");
    const isDefault = value === undefined || JSON.stringify(value) === JSON.stringify(field.prop.default);
    wrapper.classList.toggle("is-default", isDefault);
    const reset = wrapper.querySelector(":scope > .control > .reset");
    if (reset && !wrapper.dataset.required) reset.hidden = isDefault;
    this.syncSoon();
  },

  // ---- form <-> YAML, validation
  async sync() {
    const seq = ++this.seq;
    const config = this.config;
    const [yaml, check] = await Promise.all([
      api("POST", "/api/config/to-yaml", { config }),
      api("POST", "/api/config/validate", { config }),
    ]);
    if (seq !== this.seq) return;
    $("tr-yaml").value = yaml.yaml;
    localStorage.setItem("conjure.draft", yaml.yaml);
    say("tr-yaml-msg", "");
    this.errors = check.errors || [];
    if (check.config && JSON.stringify(check.preset) !== JSON.stringify(this.preset)) {
      this.preset = check.preset; // another preset (or what it can apply to): its values into the fields
      const focused = document.activeElement?.id;
      this.buildForm();
      if (focused) $(focused)?.focus();
    } else this.showErrors();
  },

  syncSoon: null,

  async fromYaml() {
    const seq = ++this.seq;
    const text = $("tr-yaml").value;
    localStorage.setItem("conjure.draft", text);
    const data = await api("POST", "/api/config/from-yaml", { yaml: text });
    if (seq !== this.seq) return;
    if (!data.config) {
      this.errors = data.errors || [];
      say("tr-yaml-msg", "the YAML has errors; the form shows the last valid version", "error");
      this.showErrors();
      return;
    }
    say("tr-yaml-msg", "");
    this.config = data.config; // the resolved config when valid, else the mapping as written
    this.preset = data.preset || {};
    const type = data.config.type || this.type;
    if (type) await this.loadSchema(type);
    if (seq !== this.seq) return;
    this.errors = data.errors || [];
    this.buildForm();
  },

  fromYamlSoon: null,

  showErrors() {
    const form = $("tr-form");
    for (const node of form.querySelectorAll(".field-error")) node.textContent = "";
    for (const node of form.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
    for (const node of form.querySelectorAll(".field.invalid")) node.classList.remove("invalid");
    const other = [];
    const seen = new Set();
    for (const error of this.errors) {
      const key = `${error.field}\u0000${error.message}`;
      if (seen.has(key)) continue;
      seen.add(key);
      const wrapper = error.field ? form.querySelector(`.field[data-field="${CSS.escape(error.field)}"]`) : null;
      if (!wrapper) {
        other.push(error);
        continue;
      }
      wrapper.classList.add("invalid");
      const slot = wrapper.querySelector(":scope > .field-error");
      slot.textContent = slot.textContent ? `${slot.textContent}; ${error.message}` : error.message;
      wrapper.querySelector("[data-path]")?.setAttribute("aria-invalid", "true");
    }
    const box = $("tr-errors");
    const count = this.errors.length;
    box.replaceChildren(
      count ? el("p", { class: "error", text: `${plural(count, "problem")} to fix before launching` }) : (this.config ? el("p", { class: "ok", text: "config is valid" }) : ""),
      other.length ? el("ul", {}, other.map((e) => el("li", { text: e.field ? `${e.field}: ${e.message}` : e.message }))) : "");
  },

  // ---- saved configs, launch
  async loadSavedList() {
    const data = await api("GET", "/api/configs");
    const select = $("tr-saved");
    const previous = select.value;
    select.replaceChildren(el("option", { value: "", text: data.configs.length ? "(pick one)" : "(none)" }),
      ...data.configs.map((name) => el("option", { value: name, text: name })));
    if (data.configs.includes(previous)) select.value = previous;
  },

  async save() {
    const name = $("tr-name").value.trim();
    if (!/^[A-Za-z0-9_.-]+$/.test(name)) return say("tr-config-msg", "name: letters, digits, _ . - only", "error");
    await this.syncSoon.flush();
    await api("PUT", `/api/configs/${encodeURIComponent(name)}`, { yaml: $("tr-yaml").value });
    say("tr-config-msg", `saved as ${name}`, "ok");
    await this.loadSavedList();
    $("tr-saved").value = name;
  },

  async load() {
    const name = $("tr-saved").value;
    if (!name) return say("tr-config-msg", "pick a saved config", "error");
    const data = await api("GET", `/api/configs/${encodeURIComponent(name)}`);
    $("tr-yaml").value = data.yaml;
    $("tr-name").value = data.name;
    await this.fromYaml();
    say("tr-config-msg", `loaded ${data.name}`, "ok");
  },

  async launch() {
    say("tr-launch-msg", "");
    if (document.activeElement === $("tr-yaml")) await this.fromYamlSoon.flush();
    else if (this.config) await this.syncSoon.flush();
    if (!$("tr-yaml").value.trim()) return say("tr-launch-msg", "make or load a config first", "error");
    try {
      const processes = Number($("tr-processes").value) || 1;
      const data = await api("POST", "/api/jobs", { yaml: $("tr-yaml").value, processes });
      say("tr-launch-msg", `job #${data.job.id} queued`, "ok");
      jobs.selected = data.job.id;
      showTab("jobs");
    } catch (exc) {
      if (Array.isArray(exc.data?.errors)) {
        this.errors = exc.data.errors;
        this.showErrors();
      }
      say("tr-launch-msg", exc.message, "error");
    }
  },

  async estimate() {
    say("tr-launch-msg", "estimating (reads the model's configs, loads no weights)...");
    if (document.activeElement === $("tr-yaml")) await this.fromYamlSoon.flush();
    else if (this.config) await this.syncSoon.flush();
    if (!$("tr-yaml").value.trim()) return say("tr-launch-msg", "make or load a config first", "error");
    const out = $("tr-estimate-out");
    try {
      const data = await api("POST", "/api/config/estimate", { yaml: $("tr-yaml").value });
      out.textContent = data.text;
      out.hidden = false;
      say("tr-launch-msg", "");
    } catch (exc) {
      if (Array.isArray(exc.data?.errors)) {
        this.errors = exc.data.errors;
        this.showErrors();
      }
      out.hidden = true;
      say("tr-launch-msg", exc.message, "error");
    }
  },

  setup() {
    this.syncSoon = debounce(() => attempt("tr-yaml-msg", () => this.sync()), 300);
    this.fromYamlSoon = debounce(() => attempt("tr-yaml-msg", () => this.fromYaml()), 500);
    $("tr-new").addEventListener("click", () => attempt("tr-config-msg", () => this.newConfig()));
    $("tr-save").addEventListener("click", () => attempt("tr-config-msg", () => this.save()));
    $("tr-load").addEventListener("click", () => attempt("tr-config-msg", () => this.load()));
    $("tr-launch").addEventListener("click", () => this.launch());
    $("tr-estimate").addEventListener("click", () => this.estimate());
    $("tr-yaml").addEventListener("input", () => { say("tr-yaml-msg", "..."); this.fromYamlSoon(); });
    $("tr-form").addEventListener("submit", (event) => event.preventDefault());
  },
};
