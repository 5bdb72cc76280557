// speedysvc web interface: keeps the server-rendered pages live from the JSON API.
"use strict";

const POLL_MS = 2000;
const WINDOW_S = 30 * 60;   // the charts show the last 30 minutes

async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST",
    headers: {"Content-Type": "application/json", "X-Speedysvc-Request": "1"},
    body: JSON.stringify(body),
  };
  const resp = await fetch(path, opts);
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(data.error || resp.statusText);
  return data;
}

function fmt(v, digits = 1) {
  if (v === null || v === undefined) return "–";
  return Number(v).toFixed(digits);
}
function fmtMs(v) { return v === null || v === undefined ? "–" : (v < 10 ? v.toFixed(2) : v.toFixed(0)) + " ms"; }
function fmtBytes(b) { return b ? (b / 1048576).toFixed(0) + " MiB" : "–"; }
function fmtAge(s) {
  if (!s) return "–";
  if (s < 120) return s.toFixed(0) + " s";
  if (s < 7200) return (s / 60).toFixed(0) + " min";
  return (s / 3600).toFixed(1) + " h";
}
function esc(v) {
  return String(v).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}
function setText(el, text) { if (el && el.textContent !== text) el.textContent = text; }
function live(ok) {
  const el = document.getElementById("conn");
  if (!el) return;
  el.textContent = ok ? "live" : "disconnected";
  el.className = "pill " + (ok ? "ok" : "down");
}

// ---- controls ----------------------------------------------------------------------------
function wireControls(onDone) {
  document.body.addEventListener("click", async (ev) => {
    const btn = ev.target.closest("button[data-action]");
    if (!btn) return;
    const holder = btn.closest("[data-service]");
    const name = holder.dataset.service, action = btn.dataset.action;
    const msg = document.getElementById("message");
    setText(msg, "");
    btn.disabled = true;
    try {
      if (action === "scale") {
        const n = parseInt(holder.querySelector(".scale-n").value, 10);
        await api(`/api/services/${encodeURIComponent(name)}/scale`, {workers: n});
      } else {
        await api(`/api/services/${encodeURIComponent(name)}/${action}`, {});
      }
    } catch (e) {
      setText(msg, `${name}: ${action} failed: ${e.message}`);
    } finally {
      btn.disabled = false;
      onDone();
    }
  });
}

// ---- logs (server-sent events) -----------------------------------------------------------
function followLog(pre, getFilter) {
  const name = pre.dataset.log;
  let source = null;
  function line(rec) {
    const d = new Date(rec.t * 1000);
    const span = document.createElement("span");
    span.className = rec.level;
    span.textContent = `${d.toLocaleTimeString()} [pid ${rec.pid}] ${rec.level} ${rec.logger}: ${rec.message}\n`;
    return span;
  }
  function append(rec) {
    const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.appendChild(line(rec));
    while (pre.childNodes.length > 2000) pre.removeChild(pre.firstChild);
    if (atEnd) pre.scrollTop = pre.scrollHeight;
  }
  let generation = 0;
  async function restart() {
    const mine = ++generation;
    if (source) { source.close(); source = null; }
    const f = getFilter();
    const q = new URLSearchParams();
    if (f.level) q.set("level", f.level);
    if (f.text) q.set("q", f.text);
    pre.textContent = "";
    try {
      const data = await api(`/api/services/${encodeURIComponent(name)}/logs?lines=300&${q}`);
      if (mine !== generation) return;   // a newer filter took over meanwhile
      data.records.forEach(append);
    } catch (e) { /* the stream below retries */ }
    if (mine !== generation) return;
    source = new EventSource(`/api/services/${encodeURIComponent(name)}/logs/stream?${q}`);
    source.onmessage = (ev) => append(JSON.parse(ev.data));
  }
  restart();
  return restart;
}

// ---- charts (SVG) ------------------------------------------------------------------------
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea"];

function drawChart(svg, points) {
  const keys = svg.dataset.series.split(","), scale = parseFloat(svg.dataset.scale || "1");
  const W = svg.clientWidth || 400, H = svg.clientHeight || 150, L = 40, B = 16, T = 6, R = 6;
  // the last 30 minutes, or less while there is less history (at least one minute)
  const now = Date.now() / 1000;
  const span = Math.min(WINDOW_S, Math.max(60, points.length ? now - points[0].t : 60));
  const t0 = now - span;
  const shown = points.filter((p) => p.t >= t0);
  let max = 0;
  for (const p of shown) for (const k of keys) if (p[k] !== null && p[k] !== undefined) max = Math.max(max, p[k] * scale);
  max = max > 0 ? max * 1.1 : 1;
  const x = (t) => L + (t - t0) / span * (W - L - R);
  const y = (v) => T + (1 - v / max) * (H - T - B);
  const parts = [`<line class="axis" x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}"/>`,
                 `<line class="axis" x1="${L}" y1="${T}" x2="${L}" y2="${H - B}"/>`,
                 `<text x="2" y="${T + 8}">${fmt(max, max < 10 ? 2 : 0)}</text>`,
                 `<text x="2" y="${H - B}">0</text>`,
                 `<text x="${L}" y="${H - 2}">-${fmtAge(span)}</text>`,
                 `<text x="${W - R - 20}" y="${H - 2}">now</text>`];
  keys.forEach((k, i) => {
    const pts = shown.filter((p) => p[k] !== null && p[k] !== undefined)
                     .map((p) => `${x(p.t).toFixed(1)},${y(p[k] * scale).toFixed(1)}`);
    parts.push(`<polyline stroke="${COLORS[i]}" points="${pts.join(" ")}"/>`);
    if (pts.length) {
      const last = pts[pts.length - 1].split(",");
      parts.push(`<circle cx="${last[0]}" cy="${last[1]}" r="2.5" fill="${COLORS[i]}"/>`);
      parts.push(`<text x="${W - R - 90}" y="${T + 10 + 11 * i}" fill="${COLORS[i]}">${esc(k)}</text>`);
    }
  });
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.innerHTML = parts.join("");
  svg.dataset.points = String(shown.length);
}

// ---- pages -------------------------------------------------------------------------------
function stateText(s) {
  // "waiting (for A, B)": not started until the services it depends on run
  return s.state + (s.waiting_for && s.waiting_for.length ? ` (for ${s.waiting_for.join(", ")})` : "")
    + (s.failure ? ` (${s.failure})` : "");
}

async function refreshIndex() {
  try {
    const status = await api("/api/status");
    live(true);
    const shown = [...document.querySelectorAll("tr[data-service]")].map((r) => r.dataset.service);
    if (shown.join("\n") !== status.services.map((s) => s.name).join("\n")) {
      location.reload();   // services were added or removed (a reload of service.ini)
      return;
    }
    for (const s of status.services) {
      const row = document.querySelector(`tr[data-service="${CSS.escape(s.name)}"]`);
      if (!row) continue;
      const pill = row.querySelector(".state .pill");
      setText(pill, stateText(s));
      pill.className = "pill " + s.state;
      setText(row.querySelector(".workers"), `${s.workers} / ${s.min_workers}–${s.max_workers}`);
      setText(row.querySelector(".rate"), fmt(s.calls_per_s));
      setText(row.querySelector(".p50"), fmtMs(s.p50_ms));
      setText(row.querySelector(".p99"), fmtMs(s.p99_ms));
      setText(row.querySelector(".errors"), String(s.errors));
      setText(row.querySelector(".cpu"), (s.cpu * 100).toFixed(0) + " %");
      setText(row.querySelector(".rss"), fmtBytes(s.rss));
      setText(row.querySelector(".uptime"), fmtAge(s.uptime));
      setText(row.querySelector(".tcp"), s.tcp || "–");
    }
  } catch (e) { live(false); }
}

async function refreshService(name) {
  try {
    const s = await api(`/api/services/${encodeURIComponent(name)}`);
    live(true);
    const pill = document.getElementById("state");
    setText(pill, stateText(s));
    pill.className = "pill " + s.state;
    setText(document.getElementById("restarts"), String(s.restarts));
    const t = s.tcp_server;
    setText(document.getElementById("tcp"), t ? `${s.tcp}, ${t.calls} calls, ${t.auth_failures} failed logins, `
      + `${t.protocol_errors} bad frames${t.tls ? ", TLS" : ""}` : "not bound");
    document.querySelector("#methods tbody").innerHTML = s.methods.map((m) =>
      `<tr><td>${esc(m.name)}</td><td>${m.calls}</td><td>${m.errors}</td><td>${fmt(m.mean_ms, 3)}</td>` +
      `<td>${fmt(m.p99_ms, 3)}</td><td>${fmt(m.max_ms, 3)}</td><td>${(m.share * 100).toFixed(1)} %</td></tr>`).join("");
    document.querySelector("#workers tbody").innerHTML = s.worker_list.map((w) =>
      `<tr data-pid="${w.pid}"><td>${w.pid}</td><td>${w.leaving ? "leaving" : (!w.serving ? "starting" : (w.busy ? "busy" : "idle"))}</td>` +
      `<td>${w.calls}</td><td>${w.errors}</td><td>${(w.cpu * 100).toFixed(0)} %</td><td>${fmtBytes(w.rss)}</td>` +
      `<td>${fmtAge(w.uptime)}</td></tr>`).join("");
    const hist = await api(`/api/services/${encodeURIComponent(name)}/history`);
    document.querySelectorAll("svg.chart").forEach((svg) => drawChart(svg, hist.points));
  } catch (e) { live(false); }
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  const pre = document.getElementById("log");
  if (page === "index") {
    wireControls(refreshIndex);
    refreshIndex();
    setInterval(refreshIndex, POLL_MS);
    followLog(pre, () => ({}));
  } else if (page === "service") {
    const name = document.body.dataset.service;
    wireControls(() => refreshService(name));
    refreshService(name);
    setInterval(() => refreshService(name), POLL_MS);
    const level = document.getElementById("level"), search = document.getElementById("search");
    const restart = followLog(pre, () => ({level: level.value, text: search.value}));
    let timer = null;
    level.addEventListener("change", restart);
    search.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(restart, 300); });
  }
});
