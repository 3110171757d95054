// conjure's web page: three tabs (data set, training, jobs) over the JSON API of docs/ui.md.
// Plain ES modules, no build step, no third-party code.

import { ds } from "./dataset.js";
import { jobs } from "./jobs.js";
import { setupTabs, showTab } from "./tabs.js";
import { training } from "./training.js";
import { attempt } from "./api.js";

function start() {
  // The token came in the address (`conjure ui` printed it); the server has set its cookie, so the address
  // bar can drop it and a copied link does not carry it.
  const params = new URLSearchParams(location.search);
  if (params.has("token")) {
    params.delete("token");
    const rest = params.toString();
    history.replaceState(null, "", `${location.pathname}${rest ? `?${rest}` : ""}${location.hash}`);
  }
  setupTabs();
  ds.setup();
  training.setup();
  jobs.setup();
  showTab(location.hash.slice(1) || "dataset");
  attempt(null, () => ds.init());
  attempt("tr-config-msg", () => training.init());
  jobs.refresh();
}

start();
