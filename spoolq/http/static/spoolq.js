/* spoolq UI: ANSI log rendering, live log and queue events over SSE, confirmations.
 * Written for spoolq (MIT, same license as the project); no third-party code.
 * Log text only ever enters the page through textContent, never innerHTML, so a job that
 * prints markup shows it as text. */
"use strict";

/* A page that refreshes itself (a log that ended, a finished operation) must not do it once
 * the user, or a test, is already going elsewhere: a reload then would cancel that
 * navigation and bring the old page back. */
let leaving = false;
window.addEventListener("beforeunload", () => { leaving = true; });
function refresh() { if (!leaving) window.location.reload(); }

/* ---- ANSI SGR → DOM ------------------------------------------------------------------- */
const ANSI_256 = (() => {
  const base = ["#000000", "#cd3131", "#0dbc79", "#e5e510", "#2472c8", "#bc3fbc", "#11a8cd", "#e5e5e5",
                "#666666", "#f14c4c", "#23d18b", "#f5f543", "#3b8eea", "#d670d6", "#29b8db", "#ffffff"];
  const out = base.slice();
  const steps = [0, 95, 135, 175, 215, 255];
  for (let r = 0; r < 6; r++) for (let g = 0; g < 6; g++) for (let b = 0; b < 6; b++)
    out.push(`rgb(${steps[r]},${steps[g]},${steps[b]})`);
  for (let i = 0; i < 24; i++) { const v = 8 + i * 10; out.push(`rgb(${v},${v},${v})`); }
  return out;
})();

class AnsiRenderer {
  constructor(target) {
    this.target = target;
    this.pending = "";
    this.reset();
  }
  reset() { this.fg = null; this.bg = null; this.bold = false; this.dim = false; this.italic = false; this.underline = false; this.inverse = false; }
  sgr(params) {
    const p = params.length ? params : [0];
    for (let i = 0; i < p.length; i++) {
      const n = p[i];
      if (n === 0) this.reset();
      else if (n === 1) this.bold = true;
      else if (n === 2) this.dim = true;
      else if (n === 3) this.italic = true;
      else if (n === 4) this.underline = true;
      else if (n === 7) this.inverse = true;
      else if (n === 22) { this.bold = false; this.dim = false; }
      else if (n === 23) this.italic = false;
      else if (n === 24) this.underline = false;
      else if (n === 27) this.inverse = false;
      else if (n >= 30 && n <= 37) this.fg = ANSI_256[n - 30];
      else if (n >= 90 && n <= 97) this.fg = ANSI_256[n - 90 + 8];
      else if (n === 39) this.fg = null;
      else if (n >= 40 && n <= 47) this.bg = ANSI_256[n - 40];
      else if (n >= 100 && n <= 107) this.bg = ANSI_256[n - 100 + 8];
      else if (n === 49) this.bg = null;
      else if ((n === 38 || n === 48) && p[i + 1] === 5 && p[i + 2] !== undefined) {
        const c = ANSI_256[p[i + 2]] || null; if (n === 38) this.fg = c; else this.bg = c; i += 2;
      } else if ((n === 38 || n === 48) && p[i + 1] === 2 && p[i + 4] !== undefined) {
        const c = `rgb(${p[i + 2] & 255},${p[i + 3] & 255},${p[i + 4] & 255})`;
        if (n === 38) this.fg = c; else this.bg = c; i += 4;
      }
    }
  }
  emit(text) {
    if (!text) return;
    const styled = this.fg || this.bg || this.bold || this.dim || this.italic || this.underline || this.inverse;
    if (!styled) { this.target.appendChild(document.createTextNode(text)); return; }
    const span = document.createElement("span");
    span.className = "ansi";
    let fg = this.fg, bg = this.bg;
    if (this.inverse) { [fg, bg] = [bg || "#0d1117", fg || "#d1d5db"]; }
    if (fg) span.style.color = fg;
    if (bg) span.style.backgroundColor = bg;
    if (this.bold) span.style.fontWeight = "bold";
    if (this.dim) span.style.opacity = "0.7";
    if (this.italic) span.style.fontStyle = "italic";
    if (this.underline) span.style.textDecoration = "underline";
    span.textContent = text;
    this.target.appendChild(span);
  }
  write(chunk) {
    let s = this.pending + chunk;
    this.pending = "";
    const re = /\x1b\[([0-9;?]*)([@-~])|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]/g;
    let last = 0, m;
    while ((m = re.exec(s)) !== null) {
      this.emit(s.slice(last, m.index));
      if (m[2] === "m") this.sgr(m[1].split(";").filter(x => x !== "" && x !== "?").map(Number));
      last = re.lastIndex;
    }
    let rest = s.slice(last);
    const esc = rest.lastIndexOf("\x1b");
    if (esc !== -1 && rest.length - esc < 64) { this.pending = rest.slice(esc); rest = rest.slice(0, esc); }
    this.emit(rest);
  }
}

/* ---- live log on the message page ----------------------------------------------------- */
function followLog(pre) {
  const ansi = new AnsiRenderer(pre);
  const follow = document.getElementById("log-follow");
  const dot = document.getElementById("live-dot");
  const info = document.getElementById("log-info");
  const stateEl = document.getElementById("msg-state");
  const statusEl = document.getElementById("msg-status");
  const initial = stateEl ? stateEl.dataset.state : "";
  let bytes = 0;
  const es = new EventSource(pre.dataset.stream);
  pre.dataset.streaming = "1";
  const scroll = () => { if (follow && follow.checked) pre.scrollTop = pre.scrollHeight; };
  es.addEventListener("log", ev => {
    const d = JSON.parse(ev.data);
    ansi.write(d.text);
    bytes = d.offset;
    if (info) info.textContent = `${bytes} bytes`;
    scroll();
  });
  es.addEventListener("state", ev => {
    const d = JSON.parse(ev.data);
    if (stateEl) {
      stateEl.dataset.state = d.state;
      stateEl.replaceChildren(Object.assign(document.createElement("span"),
        {className: `badge st-${d.state}`, textContent: d.state}));
    }
    if (statusEl) statusEl.textContent = d.status;
    if (dot) dot.hidden = d.state !== "run";
  });
  es.addEventListener("end", ev => {
    es.close();
    pre.dataset.streaming = "0";
    if (dot) dot.hidden = true;
    const d = JSON.parse(ev.data || "{}");
    if (info) info.textContent = `${bytes} bytes · ${d.status || "ended"}`;
    // The actions shown were for the state the page was loaded in: refresh them.
    if (d.state && d.state !== initial) setTimeout(refresh, 600);
  });
  es.addEventListener("error", () => { if (es.readyState === EventSource.CLOSED) pre.dataset.streaming = "0"; });
}

/* ---- RQ's tailview: a log or an attachment read with Range requests as it grows -------- */
function tailRange(pre) {
  const ansi = new AnsiRenderer(pre);
  const follow = document.getElementById("log-follow");
  const info = document.getElementById("log-info");
  const dec = new TextDecoder();
  let pos = 0;
  let idle = 0;  // state checks that found the message no longer running
  pre.dataset.streaming = "1";
  const scroll = () => { if (follow && follow.checked) pre.scrollTop = pre.scrollHeight; };
  const done = why => {
    pre.dataset.streaming = "0";
    ansi.write(dec.decode());
    if (info) info.textContent = `${pos} bytes · ${why}`;
  };
  const checkState = async () => {
    try {
      const r = await fetch(pre.dataset.stateUrl, {cache: "no-store"});
      const state = r.ok ? (await r.json())[0] : "";
      if (["prep", "que", "run"].includes(state)) idle = 0;
      else if (++idle >= 2) return done(state || "gone");
    } catch (e) { /* the server may be restarting: keep looking */ }
    setTimeout(next, 1000);
  };
  const next = async () => {
    let r;
    try {
      r = await fetch(pre.dataset.tail, {headers: {"Range": `bytes=${pos}-`, "Cache-Control": "no-cache"}});
    } catch (e) { return setTimeout(checkState, 1000); }
    if (r.status === 206 || (r.status === 200 && pos === 0)) {
      const buf = new Uint8Array(await r.arrayBuffer());
      ansi.write(dec.decode(buf, {stream: true}));
      const m = /bytes (\d+)-(\d+)/.exec(r.headers.get("Content-Range") || "");
      pos = m ? Number(m[2]) + 1 : pos + buf.length;
      if (info) info.textContent = `${pos} bytes`;
      scroll();
      return setTimeout(next, 100);
    }
    checkState();  // 416 at the end of the file, or not there yet: is the message still going?
  };
  next();
}

/* ---- live counts on the dashboard ----------------------------------------------------- */
function liveDashboard(table) {
  const es = new EventSource(table.dataset.liveEvents);
  es.addEventListener("queue", ev => {
    const q = JSON.parse(ev.data);
    const row = table.querySelector(`tr[data-queue="${CSS.escape(q.name)}"]`);
    if (!row) { refresh(); return; }
    for (const cell of row.querySelectorAll("[data-count]")) {
      const n = q.counts[cell.dataset.count] || 0;
      cell.textContent = String(n);
      const st = cell.dataset.count;
      cell.classList.remove("c-err", "c-ok", "c-busy", "c-zero");
      cell.classList.add(!n ? "c-zero" : st === "err" ? "c-err" : (st === "done" || st === "relayed") ? "c-ok" : st === "err_acked" ? "c-zero" : "c-busy");
    }
    const badge = row.querySelector("[data-status] .badge");
    if (badge) { badge.textContent = q.status; badge.className = `badge adm-${q.status.toLowerCase()}`; }
    const rate = row.querySelector("[data-rate]");
    if (rate) rate.textContent = q.done_per_min == null ? "–" : q.done_per_min.toFixed(1);
    for (const total of document.querySelectorAll("[data-total]")) {
      let sum = 0;
      for (const c of table.querySelectorAll(`td[data-count="${total.dataset.total}"]`)) sum += Number(c.textContent) || 0;
      total.textContent = String(sum);
    }
  });
  es.addEventListener("queue_deleted", refresh);
}

/* ---- live state counts in the queue page's tabs --------------------------------------- */
function liveTabs(nav) {
  const es = new EventSource(nav.dataset.liveQueue);
  es.addEventListener("queue", ev => {
    const q = JSON.parse(ev.data);
    for (const el of nav.querySelectorAll("[data-tab-count]")) {
      el.textContent = String(q.counts[el.dataset.tabCount] || 0);
    }
  });
}

/* ---- a bulk operation's progress: poll its JSON until it ends, then show the result ---- */
function liveOperation(card) {
  const tick = async () => {
    let op;
    try {
      const r = await fetch(card.dataset.operation, {headers: {"Accept": "application/json"}});
      if (!r.ok) return;
      op = await r.json();
    } catch (e) { setTimeout(tick, 2000); return; }
    for (const el of card.querySelectorAll("[data-op]")) {
      const v = op[el.dataset.op];
      el.textContent = v === null || v === undefined ? "…" : String(v);
    }
    const bar = card.querySelector("[data-op-progress]");
    if (bar) bar.value = op.scanned;
    if (op.status === "running") setTimeout(tick, 500);
    else refresh();  // the finished page offers what comes next
  };
  setTimeout(tick, 300);
}

document.addEventListener("click", ev => {
  const btn = ev.target.closest("[data-confirm]");
  if (btn && !window.confirm(btn.dataset.confirm)) ev.preventDefault();
});

document.addEventListener("DOMContentLoaded", () => {
  const pre = document.getElementById("log");
  if (pre && pre.dataset.stream) followLog(pre);
  const tail = document.getElementById("tail");
  if (tail && tail.dataset.tail) tailRange(tail);
  const table = document.querySelector("table[data-live-events]");
  if (table) liveDashboard(table);
  const tabs = document.querySelector("nav[data-live-queue]");
  if (tabs) liveTabs(tabs);
  const op = document.querySelector("[data-operation][data-status=running]");
  if (op) liveOperation(op);
});
