// speedysvc web interface: keeps the server-rendered pages live from the JSON API
// (docs/http-api.md).  Charts are drawn by uPlot (static/vendor/uplot, shipped with the package).
"use strict";

const POLL_MS = 2000;
// the spans the charts can show: the last 30 minutes or 3 hours at the manager's 2 s points,
// longer at the store's 1-minute points (docs/http-api.md, history); the first is the default
const RANGES = [
  {key: "30m", label: "30 min", span: 30 * 60, resolution: 2},
  {key: "3h", label: "3 h", span: 3 * 3600, resolution: 2},
  {key: "24h", label: "24 h", span: 86400, resolution: 60},
  {key: "7d", label: "7 days", span: 7 * 86400, resolution: 60},
  {key: "30d", label: "30 days", span: 30 * 86400, resolution: 60},
];
const MINUTE_POLL_S = 30;      // how often 1-minute points are asked for (a new one comes each minute)
const MSG_MS = 12000;          // how long a control's message stays
const CONFIRM_MS = 5000;       // how long a button asks "Confirm stop?"

// ---- the API -------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}
class Unreachable extends Error {}

async function api(path, body) {
  // (X-Speedysvc-Client: the events of what this page asks say "by web")
  const opts = body === undefined ? {headers: {"X-Speedysvc-Client": "web"}} : {
    method: "POST",
    headers: {"Content-Type": "application/json", "X-Speedysvc-Request": "1", "X-Speedysvc-Client": "web"},
    body: JSON.stringify(body),
  };
  let resp;
  try {
    resp = await fetch(path, opts);
  } catch (e) {
    throw new Unreachable("the manager does not answer");
  }
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new ApiError(resp.status, data.error || resp.statusText);
  return data;
}

// ---- formatting ----------------------------------------------------------------------------
const DASH = "–";
function none(v) { return v === null || v === undefined || Number.isNaN(v); }
function fmt(v, digits = 1) { return none(v) ? DASH : Number(v).toFixed(digits); }
function fmtMs(v) {
  if (none(v)) return DASH;
  if (v === 0) return "0 ms";
  if (v < 0.01) return (v * 1000).toFixed(1) + " µs";
  return (v < 10 ? v.toPrecision(2) : v.toFixed(0)) + " ms";
}
// a latency, "≤" when it is the slowest call's (an upper bound) rather than an estimate
function bounded(v, bound) { return (bound && !none(v) ? "≤ " : "") + fmtMs(v); }
function fmtBytes(b) { return none(b) ? DASH : (b / 1048576).toFixed(0) + " MiB"; }
function fmtAge(s) {
  if (!s) return DASH;
  if (s < 120) return s.toFixed(0) + " s";
  if (s < 7200) return (s / 60).toFixed(0) + " min";
  return (s / 3600).toFixed(1) + " h";
}
function fmtNum(v) {   // a value of a chart's axis or legend
  if (none(v)) return DASH;
  const a = Math.abs(v);
  if (a >= 1e6) return (v / 1e6).toFixed(a >= 1e7 ? 0 : 1) + "M";
  if (a >= 1e4) return (v / 1e3).toFixed(a >= 1e5 ? 0 : 1) + "k";
  if (a >= 100 || a === 0) return v.toFixed(0);
  if (a >= 1) return v.toFixed(a >= 10 ? 1 : 2).replace(/\.?0+$/, "");
  return v.toPrecision(2).replace(/\.?0+$/, "");
}
function fmtDur(ms) {   // a duration given in ms, in the unit that reads best
  if (none(ms)) return DASH;
  if (ms >= 1000) return fmtNum(ms / 1000) + " s";
  if (ms >= 1 || ms === 0) return fmtNum(ms) + " ms";
  return fmtNum(ms * 1000) + " µs";
}
const isPow10 = (v) => v > 0 && Math.abs(Math.log10(v) - Math.round(Math.log10(v))) < 1e-9;
// times on a 24-hour clock everywhere (axes, legends, the log), with the date where a chart spans days
function clock(t) { return new Date(t * 1000).toLocaleTimeString([], {hour12: false}); }
function stamp(t, withDate, seconds) {
  const d = new Date(t * 1000);
  return withDate ? d.toLocaleString([], {month: "short", day: "numeric", hour: "2-digit", minute: "2-digit",
                                          ...(seconds ? {second: "2-digit"} : {}), hour12: false})
    : d.toLocaleTimeString([], {hour12: false});
}
function setText(el, text) { if (el && el.textContent !== text) el.textContent = text; }
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

// ---- the connection and the manager ------------------------------------------------------
let managerPid = null;       // the manager whose data the page shows
const newManagerHooks = [];
let lastContact = Date.now();

function connected(ok) {
  const pill = document.getElementById("conn"), banner = document.getElementById("banner");
  document.body.classList.toggle("unreachable", !ok);
  setText(pill, ok ? "live" : "manager unreachable");
  pill.className = "pill " + (ok ? "ok" : "down");
  if (ok) {
    lastContact = Date.now();
    banner.hidden = true;
  } else {
    banner.hidden = false;
    setText(banner, `The manager does not answer (last contact ${clock(lastContact / 1000)}): `
      + "what this page shows may be out of date; it reconnects by itself.");
  }
  document.querySelectorAll("[data-service] button[data-action], button[data-all]").forEach((b) => {
    if (!ok) b.disabled = true;
  });
}

function noticeManager(pid) {
  // a manager with another pid answers: the one the page was loaded from restarted
  if (managerPid === null) { managerPid = pid; return; }
  if (pid === managerPid) return;
  managerPid = pid;
  document.body.dataset.managerPid = String(pid);
  setText(document.getElementById("manager-pid"), String(pid));
  const notice = document.getElementById("notice");
  notice.hidden = false;
  setText(notice, `A new manager (pid ${pid}) answers since ${clock(Date.now() / 1000)}; the page reloaded its data.`);
  newManagerHooks.forEach((f) => f());
}

// ---- controls ------------------------------------------------------------------------------
const VERB = {start: "start", stop: "stop", restart: "restart", scale: "scale"};

function humanError(action, e) {
  // The API says "<action> failed: <why>"; the operator reads "Could not <action>: <why>" once.
  if (e instanceof Unreachable) return `Could not ${VERB[action]}: the manager does not answer.`;
  let why = String(e.message || e).trim();
  while (/^(start|stop|restart|scale) failed:\s*/i.test(why)) why = why.replace(/^(start|stop|restart|scale) failed:\s*/i, "");
  return `Could not ${VERB[action]}: ${why}${/[.!?]$/.test(why) ? "" : "."}`;
}

// which buttons make sense in which state
const ENABLED = {
  start: (s) => ["stopped", "failed", "waiting"].includes(s),
  stop: (s) => ["running", "starting", "waiting"].includes(s),
  restart: (s) => s === "running" || s === "failed",
  scale: (s) => s === "running",
};

class Controls {
  constructor(holder) {
    this.holder = holder;
    this.name = holder.dataset.service;
    this.msg = holder.querySelector(".msg");
    this.input = holder.querySelector(".scale-n");
    this.busy = false;
    this.editedAt = 0;          // when the scale box was last typed in: it is the user's then
    this.msgTimer = null;
    this.confirmTimer = null;
    this.state = holder.dataset.state || "";
    this.input.addEventListener("input", () => { this.editedAt = Date.now(); });
    this.input.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter") { ev.preventDefault(); this.run("scale"); }
      if (ev.key === "Escape") { this.editedAt = 0; this.input.value = this.input.dataset.target || this.input.value; }
    });
    holder.querySelectorAll("button[data-action]").forEach((b) => b.addEventListener("click", () => {
      const action = b.dataset.action;
      if (action === "stop" && !b.classList.contains("confirm")) return this.askConfirm(b);
      this.run(action);
    }));
  }

  askConfirm(btn) {
    btn.classList.add("confirm");
    setText(btn, "Confirm stop");
    clearTimeout(this.confirmTimer);
    this.confirmTimer = setTimeout(() => this.unconfirm(), CONFIRM_MS);
  }
  unconfirm() {
    const b = this.holder.querySelector('button[data-action="stop"]');
    b.classList.remove("confirm");
    setText(b, "Stop");
  }

  say(text, ok = false) {
    clearTimeout(this.msgTimer);
    setText(this.msg, text);
    this.msg.classList.toggle("ok", ok);
    if (text) this.msgTimer = setTimeout(() => setText(this.msg, ""), MSG_MS);
  }

  editing() {
    return document.activeElement === this.input || Date.now() - this.editedAt < 10000;
  }

  update(s) {
    this.state = s.state;
    this.holder.dataset.state = s.state;
    this.input.min = s.min_workers;
    this.input.max = s.max_workers;
    this.input.dataset.target = String(s.target_workers);
    // the box follows the target (the autoscaler moves it) unless the user is typing in it
    if (!this.editing() && this.input.value !== String(s.target_workers)) this.input.value = String(s.target_workers);
    this.enable();
  }

  enable() {
    const unreachable = document.body.classList.contains("unreachable");
    this.holder.querySelectorAll("button[data-action]").forEach((b) => {
      b.disabled = this.busy || unreachable || !ENABLED[b.dataset.action](this.state);
    });
    this.input.disabled = this.busy || unreachable || !ENABLED.scale(this.state);
  }

  async run(action) {
    if (this.busy) return;
    this.unconfirm();
    clearTimeout(this.confirmTimer);
    const path = `/api/services/${encodeURIComponent(this.name)}/${action}`;
    let body = {};
    if (action === "scale") {
      const n = Number(this.input.value);
      const lo = Number(this.input.min), hi = Number(this.input.max);
      if (!Number.isInteger(n) || n < lo || n > hi) {
        this.say(`Could not scale: enter a whole number of workers from ${lo} to ${hi}.`);
        return;
      }
      body = {workers: n};
    }
    this.say("");
    this.busy = true;
    this.enable();
    try {
      await api(path, body);
      if (action === "scale") this.editedAt = 0;
      this.say(action === "scale" ? `Scaled to ${body.workers} workers.` : `${action[0].toUpperCase()}${action.slice(1)} done.`, true);
    } catch (e) {
      this.say(humanError(action, e));
    } finally {
      this.busy = false;
      this.enable();
      refreshNow();
    }
  }
}

const controls = new Map();   // service name -> Controls
function wireControls() {
  document.querySelectorAll("[data-service] .ctl").forEach((ctl) => {
    const holder = ctl.closest("[data-service]");
    const c = new Controls(holder);
    controls.set(c.name, c);
    c.enable();
  });
}

let allBusy = false;   // a Restart all / Stop all runs: its buttons wait for it
function wireAll(getStatus) {
  const msg = document.getElementById("all-msg");
  let timer = null, confirmTimer = null;
  function say(text, ok = false) {
    clearTimeout(timer);
    setText(msg, text);
    msg.classList.toggle("ok", ok);
    if (text) timer = setTimeout(() => setText(msg, ""), MSG_MS);
  }
  document.querySelectorAll("button[data-all]").forEach((b) => b.addEventListener("click", async () => {
    const action = b.dataset.all;
    if (action === "stop" && !b.classList.contains("confirm")) {
      b.classList.add("confirm");
      setText(b, "Confirm stop all");
      clearTimeout(confirmTimer);
      confirmTimer = setTimeout(() => { b.classList.remove("confirm"); setText(b, "Stop all"); }, CONFIRM_MS);
      return;
    }
    b.classList.remove("confirm");
    setText(b, action === "stop" ? "Stop all" : "Restart all");
    const status = getStatus();
    if (!status) return;
    // (restart all: the running services; a failed one is started on its own, knowingly)
    const names = status.services.filter((s) => action === "restart" ? s.state === "running" : ENABLED[action](s.state))
      .map((s) => s.name);
    if (!names.length) { say(`No service to ${action}.`); return; }
    allBusy = true;
    document.querySelectorAll("button[data-all]").forEach((x) => { x.disabled = true; });
    const failed = [];
    // one after the other: a rolling restart of each keeps the others serving
    for (const name of names) {
      say(`${action === "stop" ? "Stopping" : "Restarting"} ${name}…`, true);
      try { await api(`/api/services/${encodeURIComponent(name)}/${action}`, {}); }
      catch (e) { failed.push(`${name} (${humanError(action, e).replace(/^Could not \w+: /, "").replace(/\.$/, "")})`); }
      refreshNow();
    }
    allBusy = false;
    document.querySelectorAll("button[data-all]").forEach((x) => { x.disabled = false; });
    if (failed.length) say(`Could not ${action}: ${failed.join("; ")}.`);
    else say(`${action === "stop" ? "Stopped" : "Restarted"}: ${names.join(", ")}.`, true);
  }));
}

// ---- logs (server-sent events) -----------------------------------------------------------
const LOG_LINES = 300;

function followLog(pre, getFilter) {
  // The latest records that match, from the store (the whole retained log, older managers'
  // too) and from the manager's memory (the last second's, not in the store yet), then the
  // live stream; a record is shown once.
  const name = pre.dataset.log;
  let source = null, shown = new Set();
  const key = (rec) => `${rec.t}|${rec.seq}|${rec.pid}`;
  function line(rec) {
    const span = document.createElement("span");
    span.className = rec.level;
    span.textContent = `${clock(rec.t)} [pid ${rec.pid}] ${rec.level} ${rec.logger}: ${rec.message}\n`;
    return span;
  }
  function append(rec) {
    const k = key(rec);
    if (shown.has(k)) return;
    shown.add(k);
    const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.appendChild(line(rec));
    while (pre.childNodes.length > 2000) pre.removeChild(pre.firstChild);
    if (shown.size > 20000) shown = new Set([...shown].slice(-5000));
    if (atEnd) pre.scrollTop = pre.scrollHeight;
  }
  let generation = 0;
  async function restart() {
    const mine = ++generation;
    if (source) { source.close(); source = null; }
    const f = getFilter();
    const base = `/api/services/${encodeURIComponent(name)}/logs`;
    const live = new URLSearchParams(), search = new URLSearchParams({lines: String(LOG_LINES), grep: f.text || ""});
    if (f.level) { live.set("level", f.level); search.set("level", f.level); }
    if (f.text) live.set("q", f.text);
    pre.textContent = "";
    shown = new Set();
    // the stream first, held back until the records before it are shown
    const held = [];
    let holding = true;
    source = new EventSource(`${base}/stream?${live}`);
    const mySource = source;
    source.onmessage = (ev) => {
      if (mySource !== source) return;
      const rec = JSON.parse(ev.data);
      if (holding) held.push(rec); else append(rec);
    };
    let records = [];
    try {
      const [stored, recent] = await Promise.all([api(`${base}?${search}`), api(`${base}?${live}&lines=${LOG_LINES}`)]);
      records = stored.records.concat(recent.records);
    } catch (e) { /* the stream goes on */ }
    if (mine !== generation) return;   // a newer filter took over meanwhile
    records.sort((a, b) => a.t - b.t || a.seq - b.seq);
    records.slice(-LOG_LINES * 2).forEach(append);
    holding = false;
    held.forEach(append);
  }
  restart();
  newManagerHooks.push(restart);   // the new manager's lines, and those the store kept of the old one
  return restart;
}

// ---- charts (uPlot) ------------------------------------------------------------------------
const C = {blue: "#2563eb", red: "#dc2626", green: "#16a34a", purple: "#9333ea", orange: "#ea580c",
           teal: "#0d9488", pink: "#db2777", brown: "#92400e", grey: "#475569"};
const PALETTE = [C.blue, C.orange, C.green, C.purple, C.red, C.teal, C.pink, C.brown, C.grey];
const MIB = 1 / 1048576;

// what the service page draws: each series a field of the history's points (docs/http-api.md);
// a series marked optional is drawn only once a point has it
const CHARTS = [
  {id: "calls", title: "Calls per second", unit: "/s", series: [
    {key: "calls_per_s", label: "calls/s", color: C.blue}]},
  {id: "errors", title: "Errors per second", unit: "/s", series: [
    {key: "errors_per_s", label: "exceptions/s", color: C.red},
    {key: "refused_per_s", label: "refused (stopped)/s", color: C.orange, optional: true},
    {key: "lost_per_s", label: "lost (stop, restart)/s", color: C.purple, optional: true}]},
  {id: "latency", title: "Service time and wait for a worker (log scale)", unit: "ms", log: true, series: [
    {key: "p50_ms", label: "median (p50)", color: C.blue},
    {key: "p99_ms", label: "p99", color: C.red},
    {key: "max_ms", label: "max", color: C.grey, optional: true},
    {key: "wait_p99_ms", label: "wait for a worker (p99)", color: C.orange, optional: true},
    {key: "wait_p50_ms", label: "wait for a worker (p50)", color: C.teal, optional: true}]},
  {id: "workers", title: "Workers, and calls waiting for one", unit: "", series: [
    {key: "workers", label: "workers", color: C.green},
    {key: "busy", label: "busy (share)", color: C.purple},
    {key: "pending", label: "calls waiting", color: C.orange}]},
  {id: "cpu", title: "CPU (cores)", unit: "cores", series: [{key: "cpu", label: "CPU (cores)", color: C.purple}]},
  {id: "rss", title: "Memory (RSS)", unit: "MiB", series: [{key: "rss", label: "RSS (MiB)", color: C.teal, scale: MIB}]},
  {id: "method_calls", title: "Calls per second, per method", unit: "/s", perMethod: "calls_per_s"},
  {id: "method_latency", title: "Latency per method, p99 (log scale)", unit: "ms", log: true, perMethod: "p99_ms"},
];

const EVENT_COLORS = {crash: C.red, failed: C.red, restart: C.orange, reload: C.orange, stop: C.grey,
                      start: C.green, scale: C.purple, autoscale: C.purple};

// the methods of a point: {"methods": {name: {...}}} or {"methods": [{"name": ...}, ...]}
function methodsOf(p) {
  const m = p.methods;
  if (!m) return {};
  if (Array.isArray(m)) return Object.fromEntries(m.map((x) => [x.name, x]));
  return m;
}

class Chart {
  constructor(spec, holder, events, range) {
    this.spec = spec;
    this.events = events;          // () => the events to mark
    this.range = range;            // () => the span shown (RANGES)
    this.fig = el("figure");
    this.fig.dataset.chart = spec.id;
    this.fig.appendChild(el("figcaption", "", spec.title));
    this.plotEl = el("div", "plot");
    this.fig.appendChild(this.plotEl);
    holder.appendChild(this.fig);
    this.plot = null;
    this.keys = "";
    this.bounds = [];
  }

  seriesFor(points) {
    const spec = this.spec;
    if (!spec.perMethod) {
      return spec.series.filter((s) => !s.optional || points.some((p) => !none(p[s.key])));
    }
    const names = new Set();
    // the methods that were called in the window (a service may have dozens that are not)
    for (const p of points) {
      for (const [n, m] of Object.entries(methodsOf(p))) if (m && m[spec.perMethod] > 0) names.add(n);
    }
    return [...names].sort().map((n, i) => ({method: n, key: spec.perMethod, label: n, color: PALETTE[i % PALETTE.length]}));
  }

  value(p, s) {
    let v = s.method !== undefined ? (methodsOf(p)[s.method] || {})[s.key] : p[s.key];
    if (none(v)) return null;
    v = v * (s.scale || 1);
    if (this.spec.log && v <= 0) return null;   // (no zero on a log scale: no point there)
    return v;
  }

  make(series) {
    const spec = this.spec, unit = spec.unit;
    const width = Math.max(280, this.plotEl.clientWidth || 400);
    const withUnit = (v) => none(v) ? DASH : unit === "ms" ? fmtDur(v) : fmtNum(v) + (unit ? (unit === "/s" ? "/s" : " " + unit) : "");
    // a log axis: lines and labels at the powers of ten only
    const pow10 = (u, splits) => splits.map((v) => isPow10(v) ? v : null);
    const opts = {
      width, height: 170,
      cursor: {drag: {x: false, y: false}},
      legend: {live: true},
      scales: {x: {time: true}, y: spec.log ? {distr: 3, log: 10} : {range: (u, lo, hi) => [0, hi > 0 ? hi * 1.1 : 1]}},
      axes: [
        // clock times, one row: hours and minutes, with seconds while ticks are under a minute
        // apart; the day and month where a tick is a day or more after the one before
        {stroke: "#4b5563", grid: {stroke: "#eef0f3"}, ticks: {stroke: "#d9dde3"}, space: 80,
         values: (u, ticks) => {
           const step = ticks.length > 1 ? ticks[1] - ticks[0] : 0;
           const opts = step >= 86400 ? {month: "short", day: "numeric"}
             : step < 60 ? {hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false}
             : {hour: "2-digit", minute: "2-digit", hour12: false};
           const labels = ticks.map((t) => step >= 86400 ? new Date(t * 1000).toLocaleDateString([], opts)
             : new Date(t * 1000).toLocaleTimeString([], opts));
           this.fig.dataset.xticks = labels.join("|");   // (the axis is drawn on a canvas)
           return labels;
         }},
        {stroke: "#4b5563", size: 64,
         grid: spec.log ? {stroke: "#eef0f3", filter: pow10} : {stroke: "#eef0f3"},
         ticks: spec.log ? {stroke: "#d9dde3", filter: pow10} : {stroke: "#d9dde3"},
         ...(spec.log ? {filter: pow10} : {}),
         // (a log scale leaves the ticks between powers of ten unlabelled: null)
         values: (u, ticks) => ticks.map((v) => v === null ? "" : unit === "ms" ? fmtDur(v)
           : fmtNum(v) + (unit === "MiB" ? " " + unit : ""))},
      ],
      series: [{label: "time", value: (u, t) => t === null ? DASH : stamp(t, this.range().span > 86400)}].concat(series.map((s) => ({
        label: s.label, stroke: s.color, width: 1.6, spanGaps: false, points: {size: 4},
        // "≤": the figure is the slowest call's, an upper bound, not an estimate (docs/http-api.md)
        value: (u, v, si, idx) => (idx !== null && this.bounds[si - 1] && this.bounds[si - 1][idx] ? "≤ " : "") + withUnit(v),
      }))),
      plugins: [this.markers()],
    };
    if (this.plot) this.plot.destroy();
    this.plotEl.textContent = "";
    this.plot = new uPlot(opts, [[]].concat(series.map(() => [])), this.plotEl);
    this.fig.dataset.scale = this.plot.scales.y.distr === 3 ? "log" : "linear";   // (as drawn)
    // each legend label in its series' colour
    this.plotEl.querySelectorAll(".u-legend .u-series").forEach((row, i) => {
      if (i === 0) return;
      const label = row.querySelector(".u-label");
      if (label) label.style.color = series[i - 1].color;
    });
  }

  markers() {
    const chart = this;
    return {hooks: {draw: [(u) => {
      const ctx = u.ctx, {left, top, width, height} = u.bbox;
      let shown = 0;
      ctx.save();
      ctx.font = `${Math.round(10 * devicePixelRatio)}px system-ui, sans-serif`;
      ctx.textBaseline = "top";
      let labelEnd = -Infinity;
      for (const ev of chart.events()) {
        const x = Math.round(u.valToPos(ev.t, "x", true));
        if (x < left || x > left + width) continue;
        shown++;
        const color = EVENT_COLORS[ev.kind] || C.grey;
        ctx.strokeStyle = color;
        ctx.fillStyle = color;
        ctx.lineWidth = devicePixelRatio;
        ctx.setLineDash([4 * devicePixelRatio, 3 * devicePixelRatio]);
        ctx.beginPath();
        ctx.moveTo(x, top);
        ctx.lineTo(x, top + height);
        ctx.stroke();
        if (x > labelEnd) {   // (a label only where it does not cover the one before)
          ctx.fillText(ev.kind, x + 3 * devicePixelRatio, top + 2 * devicePixelRatio);
          labelEnd = x + 3 * devicePixelRatio + ctx.measureText(ev.kind).width + 4 * devicePixelRatio;
        }
      }
      ctx.restore();
      chart.fig.dataset.markers = String(shown);
    }]}};
  }

  update(points, interval, now) {
    const series = this.seriesFor(points);
    const keys = series.map((s) => s.label).join("\n");
    if (!series.length || !points.length) {
      if (this.plot) { this.plot.destroy(); this.plot = null; }
      this.keys = "";
      if (!this.plotEl.querySelector(".empty")) {
        this.plotEl.textContent = "";
        this.plotEl.appendChild(el("div", "empty", this.spec.perMethod ? "No per-method figures yet." : "No data yet."));
      }
      this.fig.dataset.points = "0";
      this.fig.classList.toggle("none", !!this.spec.perMethod);   // (a manager without per-method points)
      return;
    }
    this.fig.classList.remove("none");
    if (!this.plot || keys !== this.keys) { this.make(series); this.keys = keys; }
    // where two points are further apart than an interval and a half, there was no data: a
    // null point between them makes a gap instead of a line across
    const xs = [], cols = series.map(() => []), bounds = series.map(() => []);
    let prev = null, gaps = 0;
    for (const p of points) {
      if (prev !== null && p.t - prev > interval * 1.6) {
        gaps++;
        xs.push(prev + interval);
        cols.forEach((c) => c.push(null));
        bounds.forEach((b) => b.push(false));
      }
      xs.push(p.t);
      series.forEach((s, i) => {
        cols[i].push(this.value(p, s));
        const where = s.method !== undefined ? (methodsOf(p)[s.method] || {}) : p;
        bounds[i].push(s.key.endsWith("_ms") && where[s.key.replace(/_ms$/, "_bound")] === true);
      });
      prev = p.t;
    }
    // nothing recorded lately: a gap up to now (a minute's point comes once the minute ended and
    // the store merged it, up to 30 s later, and is asked for every 30 s: more slack there)
    if (prev !== null && now - prev > interval * (interval >= 60 ? 3.6 : 2.6)) {
      xs.push(prev + interval);
      cols.forEach((c) => c.push(null));
      bounds.forEach((b) => b.push(false));
    }
    this.bounds = bounds;
    this.fig.dataset.gaps = String(gaps);
    this.fig.dataset.points = String(points.length);
    this.fig.dataset.first = String(points[0].t);
    this.plot.setData([xs].concat(cols), false);
    // from the first point, or the first event before it (a start is marked at its moment)
    const firstEvent = this.events().length ? this.events()[0].t : Infinity;
    const t0 = Math.max(Math.min(xs[0], firstEvent), now - this.range().span);
    this.plot.setScale("x", {min: Math.min(t0, now - 60), max: now});
    // out of the hover, the legend gives the latest values
    // (the last row: "–" after a gap, never an older figure that would pass for the current one)
    if (this.plot.cursor.left < 0 || this.plot.cursor.idx === null) this.plot.setLegend({idx: xs.length - 1});
  }

  resize() {
    if (this.plot) this.plot.setSize({width: Math.max(280, this.plotEl.clientWidth), height: 170});
  }
}

class Charts {
  constructor(name, holder) {
    this.name = name;
    this.points = [];
    this.interval = 2.0;
    this.events = [];
    this.eventsMissing = false;    // a manager without the events endpoint
    this.fetched = 0;              // when points were last asked for
    this.range = RANGES[0];
    try {
      this.range = RANGES.find((r) => r.key === localStorage.getItem("speedysvc.range")) || RANGES[0];
    } catch (e) { /* (storage refused: the default) */ }
    this.note = document.getElementById("range-note");
    this.charts = CHARTS.map((spec) => new Chart(spec, holder, () => this.events, () => this.range));
    this.wireRanges(document.getElementById("ranges"));
    let timer = null;
    window.addEventListener("resize", () => {
      clearTimeout(timer);
      timer = setTimeout(() => this.charts.forEach((c) => c.resize()), 150);
    });
  }

  reset() { this.points = []; this.events = []; this.eventsMissing = false; this.fetched = 0; }

  wireRanges(bar) {
    if (!bar) return;
    for (const r of RANGES) {
      const b = el("button", "", r.label);
      b.type = "button";
      b.dataset.range = r.key;
      b.title = r.resolution === 2 ? "a point every 2 s" : "a point per minute (from the store)";
      b.setAttribute("aria-pressed", String(r === this.range));
      b.addEventListener("click", () => {
        if (r === this.range) return;
        this.range = r;
        try { localStorage.setItem("speedysvc.range", r.key); } catch (e) { /* (not kept) */ }
        bar.querySelectorAll("button").forEach((x) => x.setAttribute("aria-pressed", String(x === b)));
        this.reset();
        this.charts.forEach((c) => c.update([], this.interval, Date.now() / 1000));
        refreshNow();
      });
      bar.appendChild(b);
    }
  }

  async refresh() {
    const base = `/api/services/${encodeURIComponent(this.name)}`;
    const now = Date.now() / 1000, range = this.range;
    document.getElementById("charts").dataset.range = range.key;
    // only the points after the last one the page has (1-minute points: every MINUTE_POLL_S)
    if (range.resolution === 2 || !this.fetched || now - this.fetched >= MINUTE_POLL_S) {
      const since = this.points.length ? this.points[this.points.length - 1].t : now - range.span;
      let hist;
      try {
        hist = await api(`${base}/history?since=${since.toFixed(3)}&resolution=${range.resolution}`);
      } catch (e) {   // (no store: the history beyond the last hour is not kept)
        if (!(e instanceof ApiError) || range !== this.range) throw e;
        setText(this.note, e.message);
        this.note.hidden = false;
        hist = {points: [], interval: range.resolution};
      }
      if (range !== this.range) return;   // (another span was chosen meanwhile)
      if (hist.points.length || range.resolution === 2) this.note.hidden = true;
      this.fetched = now;
      this.interval = hist.interval || range.resolution;
      for (const p of hist.points) {
        if (!this.points.length || p.t > this.points[this.points.length - 1].t) this.points.push(p);
      }
    }
    const cut = now - range.span - 60;
    let drop = 0;
    while (drop < this.points.length && this.points[drop].t < cut) drop++;
    if (drop) this.points.splice(0, drop);
    if (!this.eventsMissing) {
      const evSince = this.events.length ? this.events[this.events.length - 1].t : now - range.span;
      try {
        const data = await api(`/api/events?since=${evSince.toFixed(3)}&service=${encodeURIComponent(this.name)}`);
        for (const ev of data.events) {
          if (!this.events.length || ev.t > this.events[this.events.length - 1].t) this.events.push(ev);
        }
        while (this.events.length && this.events[0].t < cut) this.events.shift();
      } catch (e) {
        if (e instanceof ApiError && e.status === 404) this.eventsMissing = true;
        else throw e;
      }
    }
    this.charts.forEach((c) => c.update(this.points, this.interval, now));
  }
}

// ---- the last errors per method ------------------------------------------------------------
function renderErrors(section, methods) {
  // in place: a method's block is rebuilt only when it has a new error, so what is open stays open
  const empty = section.querySelector(".empty");
  if (empty) empty.hidden = methods.length > 0;
  const seen = new Set();
  let before = empty ? empty.nextSibling : section.firstChild;
  for (const m of methods) {
    seen.add(m.method);
    let block = [...section.querySelectorAll("details[data-method]")].find((d) => d.dataset.method === m.method);
    const newest = m.errors.length ? m.errors[0] : null;
    const key = `${m.logged}:${m.left_out}:${newest ? newest.t : ""}`;
    if (!block) {
      block = el("details");
      block.dataset.method = m.method;
    }
    if (block.dataset.key !== key) {
      block.dataset.key = key;
      const open = block.open;
      block.textContent = "";
      const summary = el("summary");
      summary.appendChild(el("code", "", `${m.method}()`));
      summary.appendChild(document.createTextNode(" · "));
      if (newest) {
        summary.appendChild(el("span", "type", newest.type));
        summary.appendChild(document.createTextNode(`: ${newest.message.split("\n")[0]} · last at ${clock(newest.t)}`));
      }
      const count = ` · ${m.logged} logged` + (m.left_out ? `, ${m.left_out} more not logged (rate limit)` : "");
      summary.appendChild(el("span", "muted small", count));
      block.appendChild(summary);
      for (const e of m.errors) {
        const one = el("div", "one");
        one.appendChild(el("div", "small", `${stamp(e.t, true, true)} · worker pid ${e.pid} · ${e.type}: ${e.message}`));
        one.appendChild(el("pre", "tb", e.traceback || "(no traceback)"));
        block.appendChild(one);
      }
      block.open = open;
    }
    if (block !== before) section.insertBefore(block, before);
    before = block.nextSibling;
  }
  section.querySelectorAll("details[data-method]").forEach((d) => { if (!seen.has(d.dataset.method)) d.remove(); });
}

// ---- tables updated in place -----------------------------------------------------------------
function keyedRows(tbody, items, key, cells, numeric) {
  // one row per item, found by its key; only the cells whose text changed are written, so that
  // a selection in the table survives a refresh
  const rows = new Map([...tbody.rows].map((r) => [r.dataset.key, r]));
  let before = tbody.firstChild;
  const seen = new Set();
  for (const item of items) {
    const k = String(item[key]);
    seen.add(k);
    const texts = cells(item);
    let row = rows.get(k);
    if (!row) {
      row = el("tr");
      row.dataset.key = k;
      texts.forEach((t, i) => row.appendChild(el("td", numeric(i) ? "num" : "")));
    }
    texts.forEach((t, i) => setText(row.cells[i], t));
    if (row !== before) tbody.insertBefore(row, before);
    before = row.nextSibling;
  }
  rows.forEach((r, k) => { if (!seen.has(k)) r.remove(); });
}

// ---- pages -------------------------------------------------------------------------------
function stateText(s) {
  // "waiting (for A, B)": not started until the services it depends on run
  return s.state + (s.waiting_for && s.waiting_for.length ? ` (for ${s.waiting_for.join(", ")})` : "");
}
function setPill(pill, s) {
  setText(pill, stateText(s));
  const cls = "pill " + s.state;
  if (pill.className !== cls) pill.className = cls;
}
function markUnknown() {
  // the manager does not answer: no row claims a state it cannot know
  document.querySelectorAll("tr[data-service] .state .pill, #state").forEach((p) => {
    setText(p, "unknown");
    p.className = "pill unknown";
  });
}

let refreshNow = () => {};
let lastStatus = null;

// the manager's status, with the connection's state and the manager's pid noted (null: no answer)
async function fetchStatus() {
  let status;
  try {
    status = await api("/api/status");
  } catch (e) {
    connected(false);
    markUnknown();
    return null;
  }
  connected(true);
  noticeManager(status.manager.pid);
  return status;
}

async function refreshIndex() {
  const status = await fetchStatus();
  if (!status) return;
  lastStatus = status;
  const shown = [...document.querySelectorAll("tr[data-service]")].map((r) => r.dataset.service);
  if (shown.join("\n") !== status.services.map((s) => s.name).join("\n")) {
    location.reload();   // services were added or removed (a reload of service.ini)
    return;
  }
  for (const s of status.services) {
    const row = document.querySelector(`tr[data-service="${CSS.escape(s.name)}"]`);
    if (!row) continue;
    setPill(row.querySelector(".state .pill"), s);
    const reason = row.querySelector(".state .reason");
    setText(reason, s.failure || "");
    if (reason.title !== (s.failure || "")) reason.title = s.failure || "";
    setText(row.querySelector("td.workers"), `${s.workers} / ${s.min_workers}–${s.max_workers}`);
    setText(row.querySelector("td.rate"), fmt(s.calls_per_s));
    setText(row.querySelector("td.p50"), bounded(s.p50_ms, s.p50_bound));
    setText(row.querySelector("td.p99"), bounded(s.p99_ms, s.p99_bound));
    setText(row.querySelector("td.wait"), bounded(s.wait_p99_ms, s.wait_p99_bound));
    setText(row.querySelector("td.errors"), String(s.errors)
      + (s.refused || s.lost ? ` · ${s.refused || 0} refused · ${s.lost || 0} lost` : ""));
    setText(row.querySelector("td.cpu"), none(s.cpu) ? DASH : (s.cpu * 100).toFixed(0) + " %");
    setText(row.querySelector("td.rss"), s.rss ? fmtBytes(s.rss) : DASH);
    setText(row.querySelector("td.uptime"), fmtAge(s.uptime));
    setText(row.querySelector("td.tcp"), s.tcp || DASH);
    const c = controls.get(s.name);
    if (c) c.update(s);
  }
  document.querySelectorAll("button[data-all]").forEach((b) => { b.disabled = allBusy; });
}

function workerState(w) { return w.leaving ? "leaving" : (!w.serving ? "starting" : (w.busy ? "busy" : "idle")); }

async function refreshService(name, charts) {
  const status = await fetchStatus();
  if (!status) return;
  const s = status.services.find((x) => x.name === name);
  if (!s) {
    const banner = document.getElementById("banner");
    banner.hidden = false;
    setText(banner, `The manager no longer runs a service named ${name} (service.ini changed).`);
    return;
  }
  setPill(document.getElementById("state"), s);
  const reason = document.getElementById("reason");
  reason.hidden = !s.failure;
  setText(reason, s.failure || "");
  const c = controls.get(name);
  if (c) c.update(s);
  setText(document.getElementById("restarts"), String(s.restarts));
  const t = s.tcp_server;
  setText(document.getElementById("tcp"), t ? `${s.tcp}, ${t.calls} calls, ${t.auth_failures} failed logins, `
    + `${t.protocol_errors} bad frames${t.tls ? ", TLS" : ""}` : "not bound");
  const ms = (v, bound) => (bound && !none(v) ? "≤ " : "") + fmt(v, 3);
  keyedRows(document.querySelector("#methods tbody"), s.methods, "name", (m) => [
    m.name, fmt((m.recent || {}).calls_per_s), String(m.calls), String(m.errors), fmt(m.mean_ms, 3),
    ms(m.p99_ms, m.p99_bound), fmt(m.max_ms, 3), ms(m.wait_p99_ms, m.wait_p99_bound),
    none(m.share) ? DASH : (m.share * 100).toFixed(1) + " %"], (i) => i > 0);
  keyedRows(document.querySelector("#workers tbody"), s.worker_list, "pid", (w) => [
    String(w.pid), workerState(w), String(w.calls), String(w.errors), (w.cpu * 100).toFixed(0) + " %",
    fmtBytes(w.rss), fmtAge(w.uptime)], (i) => i > 1);
  try {
    const errs = await api(`/api/services/${encodeURIComponent(name)}/errors`);
    renderErrors(document.getElementById("errors"), errs.methods);
    await charts.refresh();
  } catch (e) {
    if (e instanceof Unreachable) { connected(false); markUnknown(); }
  }
}

function poll(fn) {
  // one refresh at a time, every POLL_MS, and at once after an action
  let running = false, again = false, timer = null;
  async function tick() {
    clearTimeout(timer);
    if (running) { again = true; return; }
    running = true;
    try { await fn(); } finally {
      running = false;
      timer = setTimeout(tick, again ? 0 : POLL_MS);
      again = false;
    }
  }
  refreshNow = tick;
  tick();
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  const pre = document.getElementById("log");
  managerPid = Number(document.body.dataset.managerPid) || null;
  wireControls();
  if (page === "index") {
    wireAll(() => lastStatus);
    followLog(pre, () => ({}));
    poll(refreshIndex);
  } else if (page === "service") {
    const name = document.body.dataset.service;
    const charts = new Charts(name, document.getElementById("charts"));
    newManagerHooks.push(() => {
      charts.reset();
      renderErrors(document.getElementById("errors"), []);
    });
    poll(() => refreshService(name, charts));
    const level = document.getElementById("level"), search = document.getElementById("search");
    const restart = followLog(pre, () => ({level: level.value, text: search.value}));
    let timer = null;
    level.addEventListener("change", restart);
    search.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(restart, 300); });
  }
});
