// The three tabs (ARIA tabs: arrow keys move between them; the address's #hash keeps the one shown).

import { $ } from "./api.js";
import { jobs } from "./jobs.js";

const TABS = ["dataset", "training", "jobs"];

export function showTab(name, { focus = false } = {}) {
  if (!TABS.includes(name)) name = "dataset";
  for (const tab of TABS) {
    const button = $(`tab-${tab}`);
    const active = tab === name;
    button.setAttribute("aria-selected", String(active));
    button.tabIndex = active ? 0 : -1;
    $(`panel-${tab}`).hidden = !active;
    if (active && focus) button.focus();
  }
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  if (name === "jobs") jobs.refresh();
}

export function setupTabs() {
  for (const tab of TABS) $(`tab-${tab}`).addEventListener("click", () => showTab(tab));
  document.querySelector("[role=tablist]").addEventListener("keydown", (event) => {
    const current = TABS.findIndex((t) => $(`tab-${t}`).getAttribute("aria-selected") === "true");
    const moves = { ArrowRight: 1, ArrowLeft: -1 };
    if (event.key in moves) {
      event.preventDefault();
      showTab(TABS[(current + moves[event.key] + TABS.length) % TABS.length], { focus: true });
    }
  });
  window.addEventListener("hashchange", () => showTab(location.hash.slice(1)));
}
