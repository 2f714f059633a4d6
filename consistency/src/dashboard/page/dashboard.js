// The dashboard page: draws the document of /api/dashboard (docs/dashboard.md) and asks for
// it again every 2 s. No library and no build step: the DOM is made with createElement and
// textContent (no string of the document goes through innerHTML), the lag chart is inline SVG.
// When a request fails the last picture stays, under a banner that says since when.
"use strict";

const REFRESH_MS = 2000;
const FETCH_TIMEOUT_MS = 5000;
const READS_VERSION = 1;
const SVG_NS = "http://www.w3.org/2000/svg";

// The colour of each state word: calm when protected, amber while it needs watching, red when
// the group is not replicating.
const STATE_TONE = {
  protected: "ok",
  lagging: "warn",
  regulating: "warn",
  degraded: "warn",
  resyncing: "warn",
  disconnected: "bad",
  paused: "bad",
  stopped: "bad",
  "failed-over": "bad",
};

// What the page knows between two requests.
const seen = { doc: null, answeredAt: null, failingSince: null };

// ---- Making elements ---------------------------------------------------------------------

// A field the daemon cannot know is null (docs/dashboard.md); a reader may not find it at all.
function known(v) {
  return v !== null && v !== undefined;
}

// `el("div", {class: "x", "data-group": name}, child, "text")`: attributes whose value is
// null, undefined or false are left out; strings become text nodes.
function el(tag, attrs, ...children) {
  return fill(document.createElement(tag), attrs, children);
}

function svg(tag, attrs, ...children) {
  return fill(document.createElementNS(SVG_NS, tag), attrs, children);
}

function fill(e, attrs, children) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (known(v) && v !== false) e.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (known(c) && c !== false) e.append(c);
  }
  return e;
}

// ---- Words for numbers -------------------------------------------------------------------

function size(bytes) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  if (i === 0) return `${v} B`;
  return `${v < 10 ? v.toFixed(1).replace(/\.0$/, "") : Math.round(v)} ${units[i]}`;
}

// A length of time in words: "2 h 14 min", "3 min 20 s", "45 s".
function duration(seconds) {
  if (seconds < 1) return "less than 1 s";
  const s = Math.round(seconds);
  const d = Math.floor(s / 86400);
  const h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = s % 60;
  if (d) return h ? `${d} d ${h} h` : `${d} d`;
  if (h) return m ? `${h} h ${m} min` : `${h} h`;
  if (m) return sec ? `${m} min ${sec} s` : `${m} min`;
  return `${sec} s`;
}

// A lag: milliseconds when small, seconds, then words.
function lagWords(seconds) {
  if (seconds === 0) return "0 s";
  if (seconds < 0.1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 10) return `${seconds.toFixed(1)} s`;
  if (seconds < 120) return `${Math.round(seconds)} s`;
  return duration(seconds);
}

const pad = (n) => String(n).padStart(2, "0");

function clock(t) {
  const d = new Date(t * 1000);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function day(t) {
  const d = new Date(t * 1000);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
}

// A time as the page shows it: the clock alone on the day of `now`, with the date otherwise.
function stamp(t, now) {
  return day(t) === day(now) ? clock(t) : `${day(t)} ${clock(t)}`;
}

function plural(n, one, many) {
  return `${n} ${n === 1 ? one : many}`;
}

// ---- The document ------------------------------------------------------------------------

// Throws unless `doc` is a document this page can draw (fields it does not know are ignored).
function check(doc) {
  const fail = (what) => {
    throw new Error(`the answer is not a dashboard document: ${what}`);
  };
  if (typeof doc !== "object" || doc === null) fail("not an object");
  if (doc.version !== READS_VERSION) fail(`version ${doc.version}, this page reads version ${READS_VERSION}`);
  if (typeof doc.daemon !== "string" || typeof doc.name !== "string") fail("no daemon or name");
  if (typeof doc.now !== "number") fail("no time");
  if (!Array.isArray(doc.groups)) fail("no groups");
  for (const g of doc.groups) {
    if (typeof g.name !== "string" || typeof g.state !== "string") fail("a group without name or state");
    if (!Array.isArray(g.lag_history) || !Array.isArray(g.resync) || !Array.isArray(g.volumes)) fail(`group ${g.name}: lists missing`);
    if (typeof g.journal !== "object" || g.journal === null) fail(`group ${g.name}: no journal`);
  }
}

// ---- The lag chart -----------------------------------------------------------------------

const CHART = { width: 640, height: 200, left: 48, right: 14, top: 24, bottom: 26 };

// A round step near `raw` (1, 2 or 5 times a power of ten).
function niceStep(raw) {
  const p = Math.pow(10, Math.floor(Math.log10(raw)));
  const f = raw / p;
  return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * p;
}

function secondsLabel(v, step) {
  if (v === 0) return "0 s";
  const decimals = step >= 1 ? 0 : Math.min(3, Math.ceil(-Math.log10(step)));
  return `${v.toFixed(decimals)} s`;
}

// The stretch of time the chart covers, up to `now`: from the first sample (the history starts
// empty with the daemon), at least a minute, at most the hour the daemon keeps.
function chartSpan(g, now) {
  const first = g.lag_history.length ? g.lag_history[0][0] : now;
  return Math.min(3600, Math.max(60, now - first));
}

// The chart of `g.lag_history` over `chartSpan`: seconds against time, with the RPO as a line.
function lagChart(g, now) {
  const { width, height, left, right, top, bottom } = CHART;
  const span = chartSpan(g, now);
  const t0 = now - span;
  // The daemon keeps an hour; a sample a little older than the daemon's clock says is left out.
  const history = g.lag_history.filter(([t]) => t >= t0);
  const chart = svg("svg", {
    class: "lag-chart",
    viewBox: `0 0 ${width} ${height}`,
    role: "img",
    "aria-label": `lag of ${g.name} over the last hour`,
    "data-points": history.length,
    "data-rpo": g.rpo_seconds,
  });
  const plot = { x0: left, x1: width - right, y0: height - bottom, y1: top };
  if (history.length === 0) {
    chart.append(
      svg("rect", { class: "plot-area", x: plot.x0, y: plot.y1, width: plot.x1 - plot.x0, height: plot.y0 - plot.y1 }),
      svg("text", { class: "chart-empty", x: (plot.x0 + plot.x1) / 2, y: (plot.y0 + plot.y1) / 2, "text-anchor": "middle" }, "collecting samples (one every 5 s)"),
    );
    return chart;
  }
  // Room above the highest lag or the RPO, and at least half a second.
  const ceiling = Math.max(1.2 * Math.max(...history.map(([, lag]) => lag), g.rpo_seconds || 0), 0.5);
  const step = niceStep(ceiling / 4);
  const yMax = Math.ceil(ceiling / step) * step;
  const x = (t) => plot.x0 + ((t - t0) / span) * (plot.x1 - plot.x0);
  const y = (v) => plot.y0 - (Math.min(v, yMax) / yMax) * (plot.y0 - plot.y1);

  chart.append(svg("rect", { class: "plot-area", x: plot.x0, y: plot.y1, width: plot.x1 - plot.x0, height: plot.y0 - plot.y1 }));
  for (let v = 0; v <= yMax + step / 2; v += step) {
    chart.append(
      svg("line", { class: "grid", x1: plot.x0, x2: plot.x1, y1: y(v), y2: y(v) }),
      svg("text", { class: "tick", x: plot.x0 - 6, y: y(v) + 4, "text-anchor": "end" }, secondsLabel(v, step)),
    );
  }
  const tStep = [10, 15, 30, 60, 120, 300, 600, 900, 1800].find((s) => span / s <= 6) || 3600;
  for (let t = Math.ceil(t0 / tStep) * tStep; t <= now; t += tStep) {
    chart.append(
      svg("line", { class: "grid grid-x", x1: x(t), x2: x(t), y1: plot.y0, y2: plot.y1 }),
      svg("text", { class: "tick", x: x(t), y: plot.y0 + 17, "text-anchor": "middle" }, tStep < 60 ? clock(t) : clock(t).slice(0, 5)),
    );
  }
  chart.append(svg("text", { class: "axis-title", x: 4, y: 12 }, "lag, seconds"));

  const points = history.map(([t, lag]) => `${x(t).toFixed(1)},${y(lag).toFixed(1)}`);
  const firstX = x(history[0][0]).toFixed(1);
  const lastX = x(history[history.length - 1][0]).toFixed(1);
  chart.append(
    svg("polygon", { class: "lag-area", points: `${firstX},${plot.y0} ${points.join(" ")} ${lastX},${plot.y0}` }),
    svg("polyline", { class: "lag-line", points: points.join(" "), "data-points": history.length }),
  );
  const [lastT, lastLag] = history[history.length - 1];
  chart.append(svg("circle", { class: "lag-last", cx: x(lastT), cy: y(lastLag), r: 3.5 }, svg("title", {}, `${clock(lastT)}: ${lagWords(lastLag)}`)));
  if (known(g.rpo_seconds)) {
    chart.append(
      svg("line", { class: "rpo-line", x1: plot.x0, x2: plot.x1, y1: y(g.rpo_seconds), y2: y(g.rpo_seconds) }),
      svg("text", { class: "rpo-label", x: plot.x1 - 4, y: y(g.rpo_seconds) - 5, "text-anchor": "end" }, `RPO ${lagWords(g.rpo_seconds)}`),
    );
  }
  return chart;
}

// ---- The protection window ---------------------------------------------------------------

// Where time `t` falls on the bar of the window `w`, in percent, kept on the bar.
function place(w, t) {
  const length = w.newest - w.oldest;
  if (length <= 0) return 100;
  return Math.min(100, Math.max(0, ((t - w.oldest) / length) * 100));
}

// A marker of `kind` at `t`; its label sits over it, turned inwards near the ends of the bar.
function marker(kind, w, t, label, title, data) {
  const at = place(w, t);
  const m = el("div", { class: `marker ${kind}-marker`, title, ...data });
  m.style.left = `${at}%`;
  if (label !== null) {
    const side = at > 85 ? "end" : at < 15 ? "start" : "middle";
    m.append(el("span", { class: `marker-label label-${side}` }, label));
  }
  return m;
}

function windowSection(g, doc) {
  const section = el("section", { class: "window" });
  const head = el("div", { class: "section-head window-head" }, el("h3", {}, "Protection window"));
  section.append(head);
  if (!known(g.window)) {
    const words =
      doc.daemon === "engine"
        ? "The protection window, its bookmarks and exports are kept at the recovery site: the target's dashboard shows them."
        : "Nothing recoverable yet: the target holds no record of this group.";
    section.append(el("p", { class: "window-none muted" }, words));
    return section;
  }
  const w = g.window;
  head.append(el("span", { class: "window-length", "data-seconds": w.newest - w.oldest }, duration(w.newest - w.oldest)));

  const bar = el("div", { class: "window-bar", "data-oldest": w.oldest, "data-newest": w.newest });
  for (const s of g.spans || []) {
    const open = !known(s.to);
    const from = place(w, s.from);
    const stretch = el("div", {
      class: `window-span${open ? " span-open" : ""}`,
      title: `not consistent ${stamp(s.from, doc.now)} – ${open ? "now (open)" : stamp(s.to, doc.now)}: ${s.reason}`,
      "data-from": s.from,
      "data-to": s.to,
    });
    stretch.style.left = `${from}%`;
    stretch.style.width = `${Math.max(0.4, place(w, open ? w.newest : s.to) - from)}%`;
    bar.append(stretch);
  }
  // A bookmark older than the window names a point no longer recoverable: it gets no marker.
  // Labels are left out where they would cover the previous one.
  const inside = (t) => t >= w.oldest && t <= w.newest;
  const bookmarks = g.bookmarks || [];
  let lastLabelled = -Infinity;
  for (const b of bookmarks.filter((b) => inside(b.time)).sort((a, b) => a.time - b.time)) {
    const at = place(w, b.time);
    const labelled = at - lastLabelled >= 12;
    if (labelled) lastLabelled = at;
    bar.append(
      marker("bookmark", w, b.time, labelled ? b.name : null, `bookmark ${b.name}: seq ${b.seq}, ${stamp(b.time, doc.now)}`, {
        "data-name": b.name,
        "data-seq": b.seq,
        "data-time": b.time,
      }),
    );
  }
  for (const e of g.exports || []) {
    const how = `${e.writable ? "writable" : "read-only"}, ${plural(e.clients, "client", "clients")}`;
    bar.append(
      marker("export", w, e.time, null, `export of seq ${e.seq} (${stamp(e.time, doc.now)}) at ${e.address}: ${how}`, {
        "data-seq": e.seq,
        "data-time": e.time,
      }),
    );
  }
  section.append(
    bar,
    el(
      "div",
      { class: "window-axis" },
      el("span", { class: "window-oldest" }, `oldest ${stamp(w.oldest, doc.now)}`),
      el("span", { class: "window-newest" }, `newest ${stamp(w.newest, doc.now)}`),
    ),
  );
  const spans = g.spans || [];
  const open = spans.filter((s) => !known(s.to)).length;
  const before = bookmarks.filter((b) => !inside(b.time)).length;
  section.append(
    el(
      "div",
      { class: "legend" },
      el("span", { class: "key key-window" }, "recoverable"),
      el("span", { class: "key key-span" }, `${plural(spans.length, "stretch", "stretches")} not consistent${open ? ` (${open} open)` : ""}`),
      el("span", { class: "key key-bookmark" }, `${plural(bookmarks.length, "bookmark", "bookmarks")}${before ? ` (${before} outside the window)` : ""}`),
      el("span", { class: "key key-export" }, plural((g.exports || []).length, "export", "exports")),
    ),
  );
  for (const e of g.exports || []) {
    section.append(
      el(
        "p",
        { class: "export-line" },
        `Export of seq ${e.seq} (${stamp(e.time, doc.now)}) at `,
        el("code", {}, e.address),
        `: ${e.writable ? "writable" : "read-only"}, ${plural(e.clients, "client", "clients")}`,
      ),
    );
  }
  return section;
}

// ---- The side panel: journal, resyncs, volumes -------------------------------------------

function meter(fraction, cls, attrs) {
  const m = el("div", { class: `meter ${cls}`, ...attrs });
  const bar = el("div", { class: "meter-fill" });
  bar.style.width = `${Math.min(100, Math.max(0, fraction * 100))}%`;
  m.append(bar);
  return m;
}

function journalSection(g) {
  const { bytes, limit } = g.journal;
  const section = el("section", { class: "journal" }, el("h3", {}, "Journal"));
  if (!known(limit)) {
    section.append(el("p", { class: "journal-words" }, `${size(bytes)} held, no limit`));
    return section;
  }
  const used = limit > 0 ? bytes / limit : 0;
  const tone = used >= 0.95 ? "bad" : used >= 0.8 ? "warn" : "ok";
  section.append(
    meter(used, `journal-meter tone-${tone}`, { "data-bytes": bytes, "data-limit": limit }),
    el("p", { class: "journal-words" }, `${size(bytes)} of ${size(limit)} (${Math.round(used * 100)} %)`),
  );
  return section;
}

function resyncSection(g) {
  if (g.resync.length === 0) return null;
  const section = el("section", { class: "resyncs" }, el("h3", {}, "Resync"));
  for (const r of g.resync) {
    const part = r.total > 0 ? r.done / r.total : 0;
    section.append(
      el(
        "div",
        { class: "resync", "data-volume": r.volume, "data-done": r.done, "data-total": r.total },
        el("div", { class: "resync-head" }, el("span", {}, r.volume), el("span", { class: "muted" }, `${r.done} / ${r.total} regions, ${Math.floor(part * 100)} %`)),
        meter(part, "resync-meter tone-warn", {}),
      ),
    );
  }
  return section;
}

function volumesSection(g) {
  const section = el("section", { class: "volumes" }, el("h3", {}, "Volumes"));
  if (g.volumes.length === 0) {
    section.append(el("p", { class: "muted" }, "no volume"));
    return section;
  }
  const body = el("tbody", {});
  for (const v of g.volumes) {
    body.append(el("tr", { "data-volume": `${v.vm}/${v.name}` }, el("td", {}, `${v.vm}/${v.name}`), el("td", { class: "num" }, size(v.size))));
  }
  section.append(el("table", { class: "volume-table" }, body));
  return section;
}

// ---- A group's card ----------------------------------------------------------------------

function lagNow(g) {
  const lag = g.lag_seconds;
  return el(
    "div",
    { class: "lag-now", "data-lag": lag },
    el("span", { class: "lag-value" }, known(lag) ? lagWords(lag) : "—"),
    el("span", { class: "lag-caption muted" }, known(lag) ? "lag now" : "lag not known here"),
  );
}

function card(g, doc) {
  const tone = STATE_TONE[g.state] || "warn";
  const title = el(
    "div",
    { class: "card-title" },
    el("h2", {}, g.name),
    g.mode ? el("span", { class: "mode" }, g.mode) : null,
    el("span", { class: `badge tone-${tone}`, "data-state": g.state }, g.state),
  );
  if (g.state === "failed-over" && doc.daemon === "target") {
    // Production runs here: the target no longer serves the group, so it has nothing to chart.
    return el(
      "article",
      { class: `group-card tone-${tone}`, "data-group": g.name, "data-state": g.state },
      el("header", { class: "card-head" }, title),
      el("p", { class: "state-words" }, g.state_words),
    );
  }
  const span = chartSpan(g, doc.now);
  const heading = g.lag_history.length === 0 || span >= 3600 ? "Lag over the last hour" : `Lag over the last ${duration(span)}`;
  const chart = el("section", { class: "lag" }, el("div", { class: "section-head" }, el("h3", {}, heading), lagNow(g)), lagChart(g, doc.now));
  const side = el("div", { class: "side" }, journalSection(g), resyncSection(g), volumesSection(g));
  return el(
    "article",
    { class: `group-card tone-${tone}`, "data-group": g.name, "data-state": g.state },
    el("header", { class: "card-head" }, title),
    el("p", { class: "state-words" }, g.state_words),
    windowSection(g, doc),
    el("div", { class: "card-body" }, chart, side),
  );
}

// ---- The page ----------------------------------------------------------------------------

function draw(doc) {
  const site = doc.daemon === "target" ? "recovery site" : doc.daemon === "engine" ? "source site" : "";
  document.title = `Hindsight — ${doc.daemon} ${doc.name}`;
  document
    .getElementById("daemon")
    .replaceChildren(el("span", { class: "daemon-kind", "data-daemon": doc.daemon }, doc.daemon), " ", el("span", { class: "daemon-name" }, doc.name), site ? el("span", { class: "muted" }, ` · ${site}`) : null);
  const counts = {};
  for (const g of doc.groups) counts[g.state] = (counts[g.state] || 0) + 1;
  const summary = Object.entries(counts).map(([state, n]) => el("span", { class: `count tone-${STATE_TONE[state] || "warn"}` }, `${n} ${state}`));
  document.getElementById("summary").replaceChildren(...summary);
  document.getElementById("updated").replaceChildren(el("span", { "data-now": doc.now, title: new Date(doc.now * 1000).toISOString() }, `updated ${stamp(doc.now, doc.now)}`));

  const main = el("main", { id: "groups" });
  if (doc.groups.length === 0) {
    main.append(el("p", { id: "no-groups", class: "notice" }, `This ${doc.daemon} has no group.`));
  }
  for (const g of doc.groups) main.append(card(g, doc));
  document.getElementById("groups").replaceWith(main);
}

function showError(message) {
  const who = seen.doc ? `the ${seen.doc.daemon} ${seen.doc.name}` : "the daemon";
  const since = seen.answeredAt || seen.failingSince;
  const banner = el("div", { id: "error-banner", role: "alert" }, `no answer from ${who} since ${stamp(since / 1000, Date.now() / 1000)}: ${message}`);
  const slot = document.getElementById("banner-slot");
  slot.replaceChildren(banner);
  document.body.classList.add("stale");
}

function clearError() {
  document.getElementById("banner-slot").replaceChildren();
  document.body.classList.remove("stale");
}

async function answer() {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), FETCH_TIMEOUT_MS);
  try {
    let r;
    try {
      r = await fetch("/api/dashboard", { cache: "no-store", signal: abort.signal });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new Error(`cannot connect (${e.message})`);
    }
    if (!r.ok) throw new Error(`HTTP ${r.status} ${r.statusText}`.trim());
    const text = await r.text();
    try {
      return JSON.parse(text);
    } catch (e) {
      throw new Error(`the answer is not JSON (${e.message})`);
    }
  } catch (e) {
    // The answer may stop half-way too.
    if (e.name === "AbortError") throw new Error(`no complete answer within ${FETCH_TIMEOUT_MS / 1000} s`);
    throw e;
  } finally {
    clearTimeout(timer);
  }
}

async function refresh() {
  try {
    const doc = await answer();
    check(doc);
    draw(doc);
    seen.doc = doc;
    seen.answeredAt = Date.now();
    seen.failingSince = null;
    clearError();
  } catch (e) {
    if (seen.failingSince === null) seen.failingSince = Date.now();
    showError(e.message || String(e));
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
