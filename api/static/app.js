// The web page: check one image, follow a scan. Plain JavaScript, no build step.
// The API key stays in sessionStorage (this tab only); every call sends it as Bearer.
"use strict";

const $ = (id) => document.getElementById(id);
const LABELS = ["entailment", "contradiction", "neutral"];
const state = { file: null };

function apiKey() { return sessionStorage.getItem("ofa-api-key") || ""; }

async function api(path, options = {}) {
  const headers = Object.assign({ Authorization: `Bearer ${apiKey()}` }, options.headers || {});
  const response = await fetch(path, Object.assign({}, options, { headers }));
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json() : await response.text();
  if (!response.ok) {
    const problem = typeof body === "object" && body ? body : { title: response.statusText, detail: String(body) };
    const err = new Error(problem.detail || problem.title);
    err.problem = Object.assign({ status: response.status }, problem);
    throw err;
  }
  return { status: response.status, body };
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

function showProblem(target, err) {
  const p = err.problem || { title: "Error", detail: String(err.message || err) };
  target.replaceChildren(el("div", { class: "problem", role: "alert" },
    el("strong", {}, `${p.title || "Error"}${p.status ? ` (HTTP ${p.status})` : ""}`),
    el("p", { class: "problem-detail" }, p.detail || "")));
}

// --- the key -----------------------------------------------------------------------

function showKeyState() {
  $("key-state").textContent = apiKey() ? "Key set for this tab." : "No key yet.";
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem("ofa-api-key", $("api-key").value.trim());
  $("api-key").value = "";
  showKeyState();
});

// --- choosing an image -------------------------------------------------------------

function useFile(file) {
  state.file = file || null;
  const preview = $("preview");
  if (state.file) {
    preview.src = URL.createObjectURL(state.file);
    preview.alt = `Chosen image: ${state.file.name}`;
    preview.hidden = false;
    $("drop-help").textContent = state.file.name;
  } else {
    preview.hidden = true;
  }
}

$("image-file").addEventListener("change", (e) => useFile(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("click", () => $("image-file").click());
drop.addEventListener("keydown", (e) => {
  if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("image-file").click(); }
});
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) useFile(e.dataTransfer.files[0]);
});

// --- one check ---------------------------------------------------------------------

function verdictView(verdict, cached, seconds) {
  const bars = LABELS.map((label) => {
    const p = verdict.probabilities[label];
    return el("div", { class: "bar" },
      el("span", {}, label),
      el("span", { class: "track", role: "meter", "aria-label": `${label} probability`,
                   "aria-valuemin": "0", "aria-valuemax": "1", "aria-valuenow": p.toFixed(4) },
        Object.assign(el("span", { class: `fill ${label}` }), { style: `width:${(p * 100).toFixed(1)}%` })),
      el("span", {}, `${(p * 100).toFixed(1)}%`));
  });
  return el("div", { class: "verdict", "data-label": verdict.label },
    el("div", { class: "label" }, verdict.label),
    el("div", { class: "meta" }, `answer “${verdict.answer}” · ${cached ? "from the cache" : "computed"} · ${seconds.toFixed(2)} s`),
    ...bars);
}

async function pollJob(jobId, deadline) {
  for (;;) {
    const { body } = await api(`/v1/jobs/${jobId}`);
    if (body.status === "succeeded" || body.status === "failed") return body;
    if (Date.now() > deadline) throw new Error(`job ${jobId} is still ${body.status}`);
    await new Promise((r) => setTimeout(r, 300));
  }
}

$("check-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const out = $("result");
  const text = $("text").value;
  const premise = $("premise").value.trim();
  const url = $("image-url").value.trim();
  if (!state.file && !url) {
    showProblem(out, { problem: { title: "No image", detail: "choose or drop an image, or give its URL" } });
    return;
  }
  const button = $("check-button");
  button.disabled = true;
  out.replaceChildren(el("p", {}, "Checking…"));
  const started = performance.now();
  try {
    let response;
    if (url && !state.file) {
      const body = { text, image_url: url };
      if (premise) body.premise = premise;
      response = await api("/v1/jobs?wait=20", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    } else {
      const form = new FormData();
      form.append("image", state.file);
      form.append("text", text);
      if (premise) form.append("premise", premise);
      response = await api("/v1/jobs?wait=20", { method: "POST", body: form });
    }
    let job = response.body;
    if (response.status === 202) job = await pollJob(job.job_id, Date.now() + 120000);
    if (job.status === "failed") throw Object.assign(new Error(job.error), { problem: { title: "The job failed", detail: job.error } });
    const seconds = (performance.now() - started) / 1000;
    out.replaceChildren(verdictView(job.verdict, job.cached, seconds));
    remember({ text, label: job.verdict.label, cached: job.cached, seconds,
               image: state.file ? state.file.name : url });
  } catch (err) {
    showProblem(out, err);
  } finally {
    button.disabled = false;
  }
});

function remember(item) {
  const history = JSON.parse(sessionStorage.getItem("ofa-history") || "[]");
  history.unshift(item);
  sessionStorage.setItem("ofa-history", JSON.stringify(history.slice(0, 20)));
  showHistory();
}

function showHistory() {
  const history = JSON.parse(sessionStorage.getItem("ofa-history") || "[]");
  $("history").replaceChildren(...history.map((h) => el("li", {},
    el("strong", {}, h.label), ` — “${h.text}” (${h.image}; ${h.cached ? "cached" : "computed"}, ${h.seconds.toFixed(2)} s)`)));
}

// --- scans -------------------------------------------------------------------------

function scanView(s) {
  const finished = s.done + s.failed;
  const eta = s.eta_s === null || s.eta_s === undefined ? "–" : `${Math.round(s.eta_s)} s`;
  return el("div", { class: "scan-progress", "data-status": s.status },
    el("p", {}, `Scan ${s.scan_id.slice(0, 8)}: ${s.status}`),
    Object.assign(el("progress", { "aria-label": "rows finished" }), { max: Math.max(1, s.total), value: finished }),
    el("p", { class: "meta" },
      `${finished} of ${s.total} rows · done ${s.done} · cached ${s.cached} · failed ${s.failed} · ${s.rate_rows_per_s.toFixed(1)} rows/s · ETA ${eta}`),
    ...changesView(s));
}

// A catalogue scan's change counts since the catalogue's previous succeeded scan.
function changesView(s) {
  if (!s.catalogue) return [];
  if (!s.changes) {
    const why = ["succeeded", "cancelled", "failed"].includes(s.status)
      ? "no earlier succeeded scan to compare with" : "counted when the scan succeeds";
    return [el("p", { class: "meta changes" }, `Catalogue ${s.catalogue}: ${why}.`)];
  }
  const c = s.changes;
  return [el("p", { class: "changes", "data-baseline": s.baseline_scan },
    `Catalogue ${s.catalogue}, since scan ${s.baseline_scan.slice(0, 8)}: ` +
    `${c.label_changed} labels changed · ${c.newly_failed} newly failed · ${c.recovered} recovered · ` +
    `${c.added} added · ${c.removed} removed` + (c.unmatched ? ` · ${c.unmatched} rows without a comparable id` : ""))];
}

async function download(scanId, format, what = "results") {
  const response = await fetch(`/v1/scans/${scanId}/${what}?format=${format}`,
    { headers: { Authorization: `Bearer ${apiKey()}` } });
  if (!response.ok) {
    const problem = await response.json().catch(() => ({ title: response.statusText }));
    showProblem($("scan"), { problem: Object.assign({ status: response.status }, problem) });
    return;
  }
  const blob = await response.blob();
  const name = what === "results" ? `scan-${scanId}.${format}` : `scan-${scanId}-${what}.${format}`;
  const link = el("a", { href: URL.createObjectURL(blob), download: name });
  document.body.append(link);
  link.click();
  link.remove();
}

async function showReport(scanId, target) {
  const { body: report } = await api(`/v1/scans/${scanId}/report`);
  if (!report.labelled) {
    target.append(el("p", { class: "meta" }, "No row carries a gold label: no report."));
    return;
  }
  const { body: page } = await api(`/v1/scans/${scanId}/report?format=html`);
  const frame = el("iframe", { title: "Scan report", sandbox: "" });
  frame.srcdoc = page;
  target.append(el("div", { class: "report" },
    el("h3", {}, `Report: accuracy ${(report.accuracy * 100).toFixed(1)}% over ${report.labelled} labelled rows`),
    frame));
}

$("scan-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const out = $("scan");
  const button = $("scan-button");
  const file = $("manifest").files[0];
  const manifestUrl = $("manifest-url").value.trim();
  const catalogue = $("catalogue").value.trim();
  if (!file === !manifestUrl) {
    showProblem(out, new Error("Choose a manifest file, or give its object URL (one of them)."));
    return;
  }
  button.disabled = true;
  try {
    let request;
    if (manifestUrl) {
      const body = { manifest_url: manifestUrl };
      if (catalogue) body.catalogue = catalogue;
      request = { method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" } };
    } else {
      const form = new FormData();
      form.append("manifest", file);
      if (catalogue) form.append("catalogue", catalogue);
      request = { method: "POST", body: form };
    }
    const { body: accepted } = await api("/v1/scans", request);
    let summary;
    for (;;) {
      summary = (await api(`/v1/scans/${accepted.scan_id}`)).body;
      out.replaceChildren(scanView(summary));
      if (["succeeded", "cancelled", "failed"].includes(summary.status) && summary.pending === 0) break;
      await new Promise((r) => setTimeout(r, 500));
    }
    const jsonl = el("button", { type: "button" }, "Download results (JSONL)");
    const csv = el("button", { type: "button" }, "Download results (CSV)");
    jsonl.addEventListener("click", () => download(summary.scan_id, "jsonl"));
    csv.addEventListener("click", () => download(summary.scan_id, "csv"));
    out.append(el("p", {}, jsonl, " ", csv));
    if (summary.changes) {
      const changes = el("button", { type: "button", id: "changes-button" }, "Download the changes (CSV)");
      changes.addEventListener("click", () => download(summary.scan_id, "csv", "changes"));
      out.append(el("p", {}, changes));
    }
    await showReport(summary.scan_id, out);
  } catch (err) {
    showProblem(out, err);
  } finally {
    button.disabled = false;
  }
});

showKeyState();
showHistory();
