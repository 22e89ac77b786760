// weir's dashboard: one page over weir's own HTTP API. No build step, no
// framework; charts by uPlot (vendored). The API token, when weir has
// tokens, is kept in this browser tab's sessionStorage and sent with every
// call. The page never holds the whole fleet: the server pages and searches.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { token: sessionStorage.getItem("weir-token") || "", cursors: [null], page: 0, search: "" };

function esc(v) {
  return String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.token) h["Authorization"] = "Bearer " + state.token;
  return h;
}

function banner(text) {
  const b = $("#banner");
  b.hidden = !text;
  b.textContent = text || "";
}

async function api(path, options) {
  const res = await fetch(path, Object.assign({}, options || {}, { headers: headers((options || {}).headers) }));
  const type = res.headers.get("content-type") || "";
  const body = type.includes("json") ? await res.json() : await res.text();
  if (res.status === 401 || res.status === 403) {
    banner(res.status === 401 ? "weir asks for an API token: paste one above." : "This token may not do that: " + (body.error ? body.error.message : ""));
    throw new Error("unauthorized");
  }
  if (!res.ok) throw new Error(body.error ? body.error.message : res.statusText);
  banner("");
  return body;
}

function ago(iso) {
  if (!iso) return "";
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 90) return Math.round(s) + " s";
  if (s < 5400) return Math.round(s / 60) + " min";
  if (s < 172800) return Math.round(s / 3600) + " h";
  return Math.round(s / 86400) + " d";
}

function num(v, digits) {
  if (v === null || v === undefined) return "";
  return typeof v === "number" ? v.toLocaleString(undefined, { maximumFractionDigits: digits ?? 1 }) : esc(v);
}

function card(label, value, kind, digits) {
  return `<div class="card ${kind || ""}"><div class="n">${num(value, digits ?? 0)}</div><div class="l">${esc(label)}</div></div>`;
}

// ---- tabs ----------------------------------------------------------------

const timers = [];
function every(ms, f) {
  f();
  timers.push(setInterval(f, ms));
}

function show() {
  const hash = location.hash.slice(1) || "fleet";
  const [tab, arg] = hash.split("/");
  for (const s of document.querySelectorAll("section.tab")) s.hidden = s.id !== tab;
  for (const a of document.querySelectorAll("#tabs a[data-tab]")) a.classList.toggle("active", a.dataset.tab === tab || (tab === "terminal" && a.dataset.tab === "fleet"));
  while (timers.length) clearInterval(timers.pop());
  const run = { fleet: showFleet, terminal: () => showTerminal(decodeURIComponent(arg || "")), alerts: showAlerts, engine: showEngine,
    docs: () => showDocs(arg || "index.html"), sql: showPipelines }[tab];
  if (run) run();
}

// ---- fleet ---------------------------------------------------------------

async function loadFleet() {
  try {
    const f = await api("/api/v1/fleet");
    $("#fleet-cards").innerHTML =
      card("terminals", f.terminals) + card("online", f.online, "ok") + card("offline", f.offline, f.offline ? "bad" : "") +
      card("silent", f.silent, f.silent ? "bad" : "") + card("low battery", f.low_battery, f.low_battery ? "warn" : "") + card("merchants", f.merchants);
    $("#merchants tbody").innerHTML = f.by_merchant
      .map((m) => `<tr><td>${esc(m.merchant_id)}</td><td class="num">${num(m.terminals)}</td><td class="num">${num(m.offline)}</td><td class="num">${num(m.silent)}</td><td class="num">${num(m.low_battery)}</td></tr>`)
      .join("");
  } catch (e) { if (e.message !== "unauthorized") banner("Fleet: " + e.message); }
}

async function loadTerminals() {
  const cursor = state.cursors[state.page];
  const q = new URLSearchParams({ limit: "50" });
  if (state.search) q.set("search", state.search);
  if (cursor) q.set("cursor", cursor);
  try {
    const page = await api("/api/v1/fleet/terminals?" + q);
    $("#terminals tbody").innerHTML = page.items.map((t) => `<tr data-terminal="${esc(t.terminal_id)}">
      <td><a href="#terminal/${encodeURIComponent(t.terminal_id)}">${esc(t.terminal_id)}</a></td><td>${esc(t.merchant_id)}</td>
      <td title="${esc(t.last_seen)}">${ago(t.last_seen)}</td><td class="num battery">${num(t.battery_pct)}${t.battery_pct == null ? "" : " %"}</td>
      <td>${esc(t.network)}</td><td class="num">${t.app_latency_ms == null ? "" : num(t.app_latency_ms, 0) + " ms"}</td><td>${esc(t.app_version)}</td>
      <td>${(t.alerts || []).map((r) => `<span class="badge rule">${esc(r)}</span>`).join("")}</td></tr>`).join("") ||
      `<tr><td colspan="8" class="muted">No terminals${state.search ? " match" : " yet"}.</td></tr>`;
    state.cursors[state.page + 1] = page.next_cursor;
    $("#next").disabled = !page.next_cursor;
    $("#prev").disabled = state.page === 0;
  } catch (e) { if (e.message !== "unauthorized") banner("Terminals: " + e.message); }
}

function showFleet() {
  every(5000, () => { loadFleet(); loadTerminals(); });
}

// ---- one terminal ----------------------------------------------------------

let chart = null;
async function showTerminal(id) {
  $("#terminal-title").textContent = "Terminal " + id;
  const key = encodeURIComponent(id);
  const load = async () => {
    try {
      const latest = (await api(`/api/v1/views/terminal_latest/rows?key=${key}`)).items[0] || {};
      $("#terminal-cards").innerHTML = card("battery %", latest.battery_pct, latest.battery_pct < 15 ? "warn" : "", 1) +
        card("reports", latest.reports) + `<div class="card"><div class="n">${esc(latest.network || "")}</div><div class="l">network</div></div>` +
        `<div class="card"><div class="n">${ago(latest.last_seen)}</div><div class="l">since last report</div></div>` +
        `<div class="card"><div class="n">${esc(latest.merchant_id || "")}</div><div class="l">merchant</div></div>`;
      const rows = (await api(`/api/v1/views/terminal_health_1m/rows?key=${key}&limit=1440`)).items;
      const x = rows.map((r) => Date.parse(r.window_start) / 1000);
      const data = [x, rows.map((r) => r.min_battery), rows.map((r) => r.p99_latency_ms)];
      const el = $("#terminal-chart");
      if (chart) chart.destroy();
      chart = null;
      if (!rows.length) {
        el.innerHTML = `<p class="muted">No minute has closed yet for this terminal.</p>`;
      } else {
      el.innerHTML = "";
      chart = new uPlot({ width: el.clientWidth || 800, height: 220, series: [{}, { label: "min battery %", stroke: "#2e8b57" }, { label: "p99 latency ms", stroke: "#c0392b", scale: "ms" }],
        axes: [{}, { label: "%" }, { side: 1, scale: "ms", label: "ms", grid: { show: false } }] }, data, el);
      }
      const sessions = (await api(`/api/v1/views/terminal_sessions/rows?key=${key}&limit=20`).catch(() => ({ items: [] }))).items;
      $("#terminal-sessions tbody").innerHTML = sessions.map((s) => `<tr><td>${esc(s.window_start)}</td><td class="num">${num(s.transactions)} transactions</td><td class="num">${num((s.amount_cents || 0) / 100, 2)}</td></tr>`).join("") || `<tr><td class="muted">None stored.</td></tr>`;
      const alerts = (await api(`/api/v1/alerts?key=${key}&limit=50`)).items;
      $("#terminal-alerts tbody").innerHTML = alerts.map((a) => `<tr><td><span class="badge sev-${esc(a.severity)}">${esc(a.severity)}</span>${esc(a.rule)}</td><td>${esc(a.state)}</td><td>${esc(a.opened_at)}</td><td>${esc(a.resolved_at || "")}</td></tr>`).join("") || `<tr><td class="muted">No alerts.</td></tr>`;
    } catch (e) { if (e.message !== "unauthorized") banner("Terminal: " + e.message); }
  };
  every(10000, load);
}

// ---- alerts ----------------------------------------------------------------

const open = new Map();
function alertRow(a) {
  return `<tr data-alert="${esc(a.id)}" class="${a.acked ? "acked" : ""}"><td><span class="badge sev-${esc(a.severity)}">${esc(a.severity)}</span></td><td>${esc(a.rule)}</td>
    <td><a href="#terminal/${encodeURIComponent(a.key)}">${esc(a.key)}</a></td><td title="${esc(a.opened_at)}">${ago(a.opened_at)}</td>
    <td><code>${esc(JSON.stringify(a.fired_by))}</code></td>
    <td>${a.acked ? "acked" : `<button type="button" class="ack" data-id="${esc(a.id)}">Ack</button>`}</td></tr>`;
}
function drawOpen() {
  const rows = [...open.values()].sort((a, b) => (b.opened_at > a.opened_at ? 1 : -1));
  $("#open-alerts tbody").innerHTML = rows.map(alertRow).join("") || `<tr><td colspan="6" class="muted">Nothing is firing.</td></tr>`;
  $("#alert-count").textContent = rows.length ? String(rows.length) : "";
}
async function loadAlerts() {
  try {
    const firing = (await api("/api/v1/alerts?state=firing&limit=500")).items;
    open.clear();
    for (const a of firing) open.set(a.id, a);
    drawOpen();
    const resolved = (await api("/api/v1/alerts?state=resolved&limit=50")).items;
    $("#resolved-alerts tbody").innerHTML = resolved.map((a) => `<tr><td><span class="badge sev-${esc(a.severity)}">${esc(a.severity)}</span></td><td>${esc(a.rule)}</td><td>${esc(a.key)}</td><td>${esc(a.opened_at)}</td><td>${esc(a.resolved_at)}</td><td><code>${esc(JSON.stringify(a.cleared_by))}</code></td></tr>`).join("");
  } catch (e) { if (e.message !== "unauthorized") banner("Alerts: " + e.message); }
}

// Server-sent events over fetch (EventSource cannot send a token).
let streaming = false;
async function streamAlerts() {
  if (streaming) return;
  streaming = true;
  for (;;) {
    try {
      const res = await fetch("/api/v1/alerts/stream", { headers: headers() });
      if (!res.ok) throw new Error(res.statusText);
      $("#live").classList.remove("off");
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
          if (!data) continue;
          const change = JSON.parse(data);
          const a = change.alert;
          if (!a) { loadAlerts(); continue; }
          if (a.state === "firing") open.set(a.id, a); else open.delete(a.id);
          drawOpen();
        }
      }
    } catch (e) { /* reconnect below */ }
    $("#live").classList.add("off");
    await new Promise((r) => setTimeout(r, 2000));
  }
}

function showAlerts() {
  every(30000, loadAlerts);
}

document.addEventListener("click", async (ev) => {
  const b = ev.target.closest("button.ack");
  if (!b) return;
  b.disabled = true;
  try {
    const a = await api(`/api/v1/alerts/${b.dataset.id}/ack`, { method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" });
    const acked = a.alert || a;
    if (open.has(b.dataset.id)) open.set(b.dataset.id, Object.assign(open.get(b.dataset.id), { acked: true, acked_at: acked.acked_at }));
    drawOpen();
  } catch (e) { b.disabled = false; if (e.message !== "unauthorized") banner("Ack: " + e.message); }
});

// ---- engine ----------------------------------------------------------------

function parseMetrics(text) {
  const m = {};
  for (const line of text.split("\n")) {
    if (!line || line[0] === "#") continue;
    const sp = line.lastIndexOf(" ");
    const series = line.slice(0, sp);
    const name = series.split("{")[0];
    (m[name] = m[name] || []).push({ labels: series.slice(name.length), value: Number(line.slice(sp + 1)) });
  }
  return m;
}
const sum = (m, name) => (m[name] || []).reduce((s, x) => s + x.value, 0);
const history = { t: [], rate: [], last: null };
let rateChart = null;

async function sampleEngine() {
  try {
    const res = await fetch("/metrics", { headers: headers() });
    if (!res.ok) throw new Error(res.statusText);
    const m = parseMetrics(await res.text());
    const now = Date.now() / 1000;
    const events = sum(m, "weir_ingested_events_total");
    if (history.last) {
      history.t.push(now);
      history.rate.push(Math.max(0, (events - history.last.events) / (now - history.last.t)));
      if (history.t.length > 300) { history.t.shift(); history.rate.shift(); }
    }
    history.last = { t: now, events };
    const lag = Math.max(0, ...(m.weir_watermark_lag_seconds || [{ value: 0 }]).map((x) => x.value));
    $("#engine-cards").innerHTML =
      card("events/s", history.rate[history.rate.length - 1] || 0, "", 1) + card("MQTT messages received", sum(m, "weir_mqtt_messages_received_total")) +
      card("events logged", events) + card("late events", sum(m, "weir_late_events_total")) + card("dead letters", sum(m, "weir_rejected_events_total")) +
      `<div class="card"><div class="n">${num(lag, 1)} s</div><div class="l">watermark lag</div></div>` +
      `<div class="card"><div class="n">${num(sum(m, "weir_checkpoint_last_duration_seconds") * 1000, 0)} ms</div><div class="l">last checkpoint</div></div>` +
      `<div class="card"><div class="n">${num(sum(m, "weir_ingest_queue_depth"), 0)} / ${num(sum(m, "weir_ingest_queue_capacity"), 0)}</div><div class="l">ingest queue (backpressure)</div></div>` +
      card("clients connected", sum(m, "weir_mqtt_clients_connected"));
    const reasons = {};
    for (const x of m.weir_rejected_events_total || []) {
      const r = (x.labels.match(/reason="([^"]*)"/) || [])[1] || "?";
      reasons[r] = (reasons[r] || 0) + x.value;
    }
    $("#dead-reasons tbody").innerHTML = Object.entries(reasons).map(([r, n]) => `<tr><td>${esc(r)}</td><td class="num">${num(n, 0)}</td></tr>`).join("");
    const el = $("#rate-chart");
    if (!rateChart) {
      rateChart = new uPlot({ width: el.clientWidth || 700, height: 220, series: [{}, { label: "events/s", stroke: "#1659b8", fill: "rgba(22,89,184,.08)" }] }, [history.t, history.rate], el);
    } else {
      rateChart.setData([history.t, history.rate]);
    }
  } catch (e) { banner("Metrics: " + e.message); }
}

async function loadEngineOnce() {
  try {
    const svg = await api("/api/v1/lineage?format=svg");
    $("#graph").innerHTML = svg;
    for (const a of $("#graph").querySelectorAll("a")) a.setAttribute("href", "/docs/" + a.getAttribute("href"));
    await loadDeadLetters();
  } catch (e) { if (e.message !== "unauthorized") banner("Engine: " + e.message); }
}

async function loadDeadLetters() {
  try {
    const reason = $("#dead-reason").value;
    const dead = (await api("/api/v1/deadletter?limit=50" + (reason ? "&reason=" + encodeURIComponent(reason) : ""))).items;
    $("#dead-letters tbody").innerHTML = dead.map((d) => `<tr><td>${esc(d.received_at)}</td><td>${esc(d.stream)}</td><td>${esc(d.reason)}</td><td>${esc(d.detail)}</td><td><code>${esc(String(d.payload).slice(0, 200))}</code></td></tr>`).join("") || `<tr><td colspan="5" class="muted">None.</td></tr>`;
  } catch (e) { if (e.message !== "unauthorized") banner("Dead letters: " + e.message); }
}
$("#dead-reason").addEventListener("change", loadDeadLetters);

function showEngine() {
  rateChart = null;
  $("#rate-chart").innerHTML = "";
  loadEngineOnce();
  every(2000, sampleEngine);
}

// ---- docs ---------------------------------------------------------------------

// The /docs pages, fetched with the token (a link cannot send one) and shown
// here; their relative links stay inside this tab.
async function showDocs(page) {
  try {
    const html = await api("/docs/" + encodeURIComponent(page));
    const doc = new DOMParser().parseFromString(html, "text/html");
    const body = doc.body;
    for (const a of body.querySelectorAll("a[href]")) {
      const href = a.getAttribute("href");
      if (/^[a-z]+-[^/]*\.html$|^index\.html$/.test(href)) a.setAttribute("href", "#docs/" + href);
    }
    $("#docs-page").innerHTML = body.innerHTML;
  } catch (e) { if (e.message !== "unauthorized") banner("Docs: " + e.message); }
}

// ---- pipelines and preview -------------------------------------------------------

async function showPipelines() {
  try {
    const p = await api("/api/v1/pipelines");
    $("#pipelines-status").textContent = p.status === "ok" ? "ok" : "not applied: the files have errors";
    const r = p.last_reload;
    const list = (name, items) => items && items.length ? `<tr><td>${name}</td><td>${items.map(esc).join(", ")}</td></tr>` : "";
    const busy = p.reloading;
    $("#pipelines").innerHTML =
      (busy ? `<p><b>Reloading</b> (${esc(busy.trigger)}, since ${esc(busy.since)}): rebuilding ${busy.rebuilding.map(esc).join(", ")} from the log beside the running pipeline</p>` : "") +
      (p.errors.length ? `<table>${p.errors.map((e) => `<tr class="bad"><td><code>${esc(e.file)}:${esc(e.line)}</code></td><td>${esc(e.message)}</td></tr>`).join("")}</table>` : "") +
      (r ? `<p class="muted">Last ${r.applied ? "applied" : "refused"} reload: ${esc(r.trigger)} at ${esc(r.at)}${r.applied ? `, ingestion paused ${r.paused_ms} ms` : ""}${r.refused ? " — " + esc(r.refused) : ""}</p>
        <table>${list("new", r.new)}${list("changed", r.changed)}${list("rebuilt", r.rebuilt)}${list("removed", r.removed)}${list("kept", r.kept)}</table>` : "") +
      `<p class="muted">${p.files.map((f) => `<code>${esc(f.file)}</code>`).join(" ")}</p>`;
  } catch (e) { if (e.message !== "unauthorized") banner("Pipelines: " + e.message); }
}

$("#preview-run").addEventListener("click", async () => {
  $("#preview-status").textContent = "running…";
  $("#preview-result thead").innerHTML = "";
  $("#preview-result tbody").innerHTML = "";
  try {
    const res = await fetch("/api/v1/pipelines/preview", { method: "POST", headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({ sql: $("#preview-text").value, from: $("#preview-from").value }) });
    const r = await res.json();
    if (!res.ok) {
      $("#preview-status").textContent = r.errors ? r.errors.map((e) => `line ${e.line}: ${e.message}`).join("; ") : (r.error ? r.error.message : res.statusText);
      return;
    }
    $("#preview-result thead").innerHTML = "<tr>" + r.columns.map((c) => `<th>${esc(c)}</th>`).join("") + "</tr>";
    $("#preview-result tbody").innerHTML = r.rows.map((row) => "<tr>" + r.columns.map((c) => `<td>${esc(row[c])}</td>`).join("") + "</tr>").join("");
    $("#preview-status").textContent = `${r.rows.length} rows from ${r.events} events since ${r.from}${r.truncated ? " (truncated)" : ""}`;
  } catch (e) { $("#preview-status").textContent = e.message; }
});

// ---- SQL console -------------------------------------------------------------

$("#sql-run").addEventListener("click", async () => {
  $("#sql-status").textContent = "running…";
  const started = performance.now();
  try {
    const r = await api("/api/v1/query", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ sql: $("#sql-text").value }) });
    $("#sql-result thead").innerHTML = "<tr>" + r.columns.map((c) => `<th>${esc(c.name || c)}</th>`).join("") + "</tr>";
    const names = r.columns.map((c) => c.name || c);
    $("#sql-result tbody").innerHTML = r.rows.map((row) => "<tr>" + names.map((n) => `<td>${esc(typeof row[n] === "object" ? JSON.stringify(row[n]) : row[n])}</td>`).join("") + "</tr>").join("");
    $("#sql-status").textContent = `${r.rows.length} rows${r.truncated ? " (truncated)" : ""} in ${Math.round(performance.now() - started)} ms`;
  } catch (e) { $("#sql-status").textContent = e.message; }
});

// ---- start ------------------------------------------------------------------

$("#token").value = state.token;
$("#token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.token = $("#token").value.trim();
  sessionStorage.setItem("weir-token", state.token);
  show();
});
let typing = null;
$("#search").addEventListener("input", () => {
  clearTimeout(typing);
  typing = setTimeout(() => { state.search = $("#search").value.trim(); state.cursors = [null]; state.page = 0; loadTerminals(); }, 250);
});
$("#next").addEventListener("click", () => { state.page += 1; loadTerminals(); });
$("#prev").addEventListener("click", () => { state.page = Math.max(0, state.page - 1); loadTerminals(); });
window.addEventListener("hashchange", show);
show();
loadAlerts();
streamAlerts();
