"use strict";
// The vitalstore dashboard: plain JavaScript, no build step. It reads only the public API, with
// the key the user pasted, so the key's scopes and device prefix apply as for any client. The
// key stays in sessionStorage (this tab only): never in a URL, never in a cookie.

const KEY_STORAGE = "vitalstore.key";
const REFRESH_MS = 5000;          // fleet and tiles
const CHART_REFRESH_MS = 30000;   // charts: late readings show up at the next refresh
const STALE_AFTER_S = 120;        // a device silent for longer is marked stale
const REQUEST_TIMEOUT_MS = 15000;
const PAGE_SIZE = 50;
const MAX_POINTS = 3000;          // per chart: the bucket is chosen to stay under this
// ...and to read at most this many rollup rows: 30 days from 1-minute rows (43,200 a metric)
// took 160 ms a chart, from hourly rows (720) 30 ms (shared machine).
const MAX_ROWS = 12000;
const ROLLUP_LEVELS = [86400, 3600, 60];
const RAW_PAGES = 5;              // the 1-hour view follows at most this many 10,000-reading pages
const RANGES = { "1h": 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400 };
const BUCKETS = [[60, "1m"], [300, "5m"], [900, "15m"], [1800, "30m"], [3600, "1h"],
  [3 * 3600, "3h"], [6 * 3600, "6h"], [86400, "1d"]];
const METRICS = {   // label and unit of the metrics the fleet is known to send
  heartRateValue: ["Heart rate", "bpm"], pulseRate: ["Pulse", "bpm"], spo2: ["SpO₂", "%"],
  respiratoryRate: ["Respiratory rate", "/min"], temperature: ["Temperature", "°C"],
  skinTemperature: ["Skin temperature", "°C"], systolic: ["Systolic", "mmHg"],
  diastolic: ["Diastolic", "mmHg"], meanArterialPressure: ["Mean arterial pressure", "mmHg"],
  steps: ["Steps", ""],
};

// Test and benchmark hooks: the charts of the current view and when they were drawn.
// drawnMs: from opening the view to every chart drawn; drawnAt: the same moment, from navigation.
window.vitalstore = { charts: {}, drawnMs: null, drawnAt: null };

// ---------------------------------------------------------------------------------- helpers

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (value !== false && value != null) node.setAttribute(name, value === true ? "" : value);
  }
  // Text goes in as text nodes: device ids and metric names are data, never markup.
  node.append(...children.flat().filter((c) => c != null && c !== false));
  return node;
}

const label = (metric) => (METRICS[metric] || [metric])[0];
const unit = (metric) => (METRICS[metric] || [])[1] || "";
const seconds = (rfc3339) => Date.parse(rfc3339) / 1000;
const formatValue = (v) => String(Math.round(v * 100) / 100);

function ago(epochSeconds) {
  const s = Math.max(0, Math.round(Date.now() / 1000 - epochSeconds));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

// A "12 s ago" that keeps counting between refreshes; `stale` marks its row after the threshold.
function since(rfc3339, staleTarget) {
  return el("time", { datetime: rfc3339, title: new Date(rfc3339).toLocaleString(),
    "data-stale-target": staleTarget ? "" : null }, ago(seconds(rfc3339)));
}

function tickTimes() {
  for (const node of document.querySelectorAll("time[datetime]")) {
    const at = seconds(node.getAttribute("datetime"));
    node.textContent = ago(at);
    if (node.hasAttribute("data-stale-target")) {
      node.closest("tr, .device-head")?.classList.toggle("stale", Date.now() / 1000 - at > STALE_AFTER_S);
    }
  }
}
setInterval(tickTimes, 1000);

function showMessage(text, kind = "error") {
  const box = document.getElementById("message");
  box.textContent = text || "";
  box.className = kind;
  box.hidden = !text;
}

// ---------------------------------------------------------------------------------- the API

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

const getKey = () => sessionStorage.getItem(KEY_STORAGE);

async function api(path, params = {}, key = getKey()) {
  const url = new URL(path, location.origin);
  for (const [name, value] of Object.entries(params)) {
    for (const one of [].concat(value)) {
      if (one != null && one !== "") url.searchParams.append(name, one);
    }
  }
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), REQUEST_TIMEOUT_MS);
  let response;
  try {
    response = await fetch(url, { headers: { Authorization: `Bearer ${key}` },
      signal: controller.signal, cache: "no-store" });
  } catch (error) {
    throw new ApiError(0, error.name === "AbortError"
      ? "The service did not answer in time; retrying." : "Cannot reach the service; retrying.");
  } finally {
    clearTimeout(timer);
  }
  const body = await response.json().catch(() => ({}));
  if (response.ok) return body;
  throw new ApiError(response.status, explain(response.status, body.error || body.detail || ""));
}

function explain(status, detail) {
  if (status === 401) {
    return `This key was refused (${detail || "invalid"}): it is unknown, mistyped or revoked.`;
  }
  if (status === 403) return `This key may not read (${detail}). Use a key with the read scope.`;
  if (status === 404) return `${detail[0].toUpperCase()}${detail.slice(1)} (or not one of this key's devices).`;
  if (status === 503) return "The service is busy or its database is unavailable; retrying.";
  return `The service answered ${status}: ${detail}`;
}

// A refused key ends the session; anything else keeps the last data on screen and says why.
function failed(error) {
  if (error.status === 401 || error.status === 403) {
    sessionStorage.removeItem(KEY_STORAGE);
    showSignIn(error.message);
  } else {
    showMessage(error.message);
  }
}

// ---------------------------------------------------------------------------------- views

let generation = 0;   // bumped by every view change: the old view's timers stop themselves
const stopTimers = () => { generation += 1; };

// Runs `task` now and again `ms` after each run ends: a slow service never piles up requests.
// `task(current)`: current() turns false once the view changed while the task was waiting.
function every(ms, task) {
  const mine = generation;
  const current = () => mine === generation;
  const run = async () => {
    if (mine !== generation) return;
    if (!document.hidden) {
      try {
        await task(current);
        if (mine === generation) showMessage("");
      } catch (error) {
        if (mine === generation) failed(error);
      }
    }
    if (mine === generation) setTimeout(run, ms);
  };
  run();
}

function newView(...children) {
  stopTimers();
  for (const chart of Object.values(window.vitalstore.charts)) chart.destroy();
  window.vitalstore.charts = {};
  window.vitalstore.drawnMs = window.vitalstore.drawnAt = null;
  showMessage("");
  document.getElementById("view").replaceChildren(...children);
}

function showSignIn(message) {
  document.getElementById("nav").hidden = true;
  const input = el("input", { id: "key", type: "password", autocomplete: "off", required: true,
    placeholder: "vs_...", size: 50 });
  const form = el("form", { id: "sign-in", onsubmit: async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    try {
      await api("/v1/devices", { limit: 1 }, key);
    } catch (error) {
      showMessage(error.message);
      return;
    }
    sessionStorage.setItem(KEY_STORAGE, key);
    route();
  } },
  el("h1", {}, "Sign in"),
  el("label", {}, "API key with the read scope ", input),
  el("button", { type: "submit" }, "Sign in"),
  el("p", { class: "hint" }, "The key is kept in this browser tab only and sent only to this service."));
  newView(form);
  showMessage(message);
  input.focus();
}

function route() {
  if (!getKey()) return showSignIn();
  document.getElementById("nav").hidden = false;
  const [path, query] = location.hash.slice(1).split("?");
  const params = new URLSearchParams(query || "");
  const device = path.match(/^\/device\/(.+)$/);
  if (device) return showDevice(decodeURIComponent(device[1]), params.get("range") || "24h");
  if (path === "/metric") return showFleetMetric(params);
  return showFleet(params.get("prefix") || "");
}

// Fleet: devices by id (search by prefix, paged like the API) with their latest values.
function showFleet(prefix) {
  const rows = el("tbody");
  const search = el("input", { id: "prefix", type: "search", value: prefix,
    placeholder: "device id prefix, e.g. ward-3:", size: 30 });
  const previous = el("button", { type: "button", disabled: true }, "← Previous");
  const next = el("button", { type: "button", disabled: true }, "Next →");
  const cursors = [null];   // the cursor of each page seen so far; the last is the current page
  let nextCursor = null;

  async function refresh() {
    const page = await api("/v1/devices", { prefix: search.value, limit: PAGE_SIZE,
      cursor: cursors[cursors.length - 1] });
    const names = page.items.map((item) => item.device);
    const latest = names.length ? await api("/v1/latest", { device: names }) : { items: [] };
    const byDevice = new Map(latest.items.map((item) => [item.device, item]));
    rows.replaceChildren(...page.items.map((item) => fleetRow(item, byDevice.get(item.device))));
    if (!page.items.length) rows.append(el("tr", {}, el("td", { colspan: 3 }, "No devices.")));
    nextCursor = page.next_cursor;
    previous.disabled = cursors.length === 1;
    next.disabled = !nextCursor;
    tickTimes();
  }
  const restart = () => { stopTimers(); every(REFRESH_MS, refresh); };
  let typing;
  search.addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => {
      history.replaceState(null, "", search.value ? `#/?prefix=${encodeURIComponent(search.value)}` : "#/");
      cursors.length = 1;
      restart();
    }, 300);
  });
  previous.addEventListener("click", () => { cursors.pop(); restart(); });
  next.addEventListener("click", () => { cursors.push(nextCursor); restart(); });
  const view = el("section", { id: "fleet" },
    el("h1", {}, "Fleet"),
    el("label", {}, "Search ", search),
    el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "Device"), el("th", {}, "Last seen"),
      el("th", {}, "Latest values"))), rows),
    el("p", { class: "pager" }, previous, " ", next),
    el("p", { class: "hint" }, `Refreshed every ${REFRESH_MS / 1000} s; devices silent for more`
      + ` than ${STALE_AFTER_S / 60} min are marked stale.`));
  newView(view);
  every(REFRESH_MS, refresh);
}

function fleetRow(device, latest) {
  const metrics = Object.entries(latest ? latest.metrics : {});
  return el("tr", { "data-device": device.device },
    el("td", {}, el("a", { href: `#/device/${encodeURIComponent(device.device)}` }, device.device)),
    el("td", {}, since(device.last_seen, true), el("span", { class: "stale-badge" }, " stale")),
    el("td", { class: "values" }, metrics.map(([name, m]) => el("span", { class: "value",
      "data-metric": name, title: `${name} at ${new Date(m.timestamp).toLocaleString()}` },
    el("span", { class: "name" }, label(name)), ` ${formatValue(m.value)} ${unit(name)}`))));
}

// A device: a tile per metric with its latest value, and a chart per metric for the range.
function showDevice(device, range) {
  if (!(range in RANGES)) range = "24h";
  const started = performance.now();
  const tiles = el("div", { class: "tiles" });
  const charts = el("div", { class: "charts" });
  const head = el("p", { class: "device-head" });
  const rangeLinks = Object.keys(RANGES).map((name) => el("a", { class: name === range ? "active" : "",
    href: `#/device/${encodeURIComponent(device)}?range=${name}` }, name === "1h" ? "last hour" : name));
  newView(el("section", { id: "device" }, el("h1", {}, device), head, tiles,
    el("nav", { class: "ranges" }, "Range: ", rangeLinks), charts,
    el("p", { class: "hint" }, "Drag across a chart to zoom, double-click to zoom out. "
      + (range === "1h" ? "Raw readings." : "Average per bucket with the min–max band."))));
  let metrics = null;

  every(REFRESH_MS, async (current) => {
    const latest = await api(`/v1/devices/${encodeURIComponent(device)}/latest`);
    if (!current()) return;
    head.replaceChildren("Last seen ", since(latest.last_seen, true), el("span", { class: "stale-badge" }, " stale"));
    tiles.replaceChildren(...Object.entries(latest.metrics).map(([name, m]) => el("div",
      { class: "tile", "data-metric": name }, el("div", { class: "name" }, label(name)),
      el("div", { class: "reading" }, formatValue(m.value), el("small", {}, ` ${unit(name)}`)),
      since(m.timestamp))));
    if (metrics === null) {
      metrics = Object.keys(latest.metrics);
      // Charts load on their own schedule; the first drawing of all of them is the figure.
      const first = Promise.all(metrics.map((name) => chartLoop(device, name, range, charts)));
      first.then(() => {
        if (!current()) return;
        window.vitalstore.drawnAt = performance.now();
        window.vitalstore.drawnMs = window.vitalstore.drawnAt - started;
      });
    }
    tickTimes();
  });
}

function chartLoop(device, metric, range, container) {
  const box = el("figure", { class: "chart", "data-metric": metric });
  const caption = el("figcaption", {}, `${label(metric)}${unit(metric) ? ` (${unit(metric)})` : ""}`);
  box.append(caption);
  container.append(box);
  return new Promise((drawn) => {
    every(CHART_REFRESH_MS, async (current) => {
      const series = range === "1h"
        ? await rawSeries(device, metric) : await bucketSeries(device, metric, RANGES[range]);
      if (!current()) return;
      caption.textContent = `${label(metric)}${unit(metric) ? ` (${unit(metric)})` : ""} · ${series.note}`;
      draw(box, metric, series);
      performance.mark(`chart drawn: ${metric}`);   // in the browser's performance timeline
      drawn();
    });
  });
}

// The finest bucket that keeps the chart under MAX_POINTS and its query under MAX_ROWS rollup
// rows: a bucket is served from the coarsest rollup (1d, 1h, 1m) whose width divides it.
function bucketFor(rangeSeconds) {
  return BUCKETS.find(([width]) => {
    const level = ROLLUP_LEVELS.find((seconds) => width % seconds === 0);
    return rangeSeconds / width <= MAX_POINTS && rangeSeconds / level <= MAX_ROWS;
  }) || BUCKETS[BUCKETS.length - 1];
}

async function rawSeries(device, metric) {
  const from = Math.floor(Date.now() / 1000) - RANGES["1h"];
  const xs = [], ys = [];
  let cursor = null;
  for (let page = 0; page < RAW_PAGES; page += 1) {
    const answer = await api(`/v1/devices/${encodeURIComponent(device)}/readings`,
      { from, metrics: metric, limit: 10000, cursor });
    for (const item of answer.items) {
      if (metric in item.metrics) { xs.push(seconds(item.timestamp)); ys.push(item.metrics[metric]); }
    }
    cursor = answer.next_cursor;
    if (!cursor) break;
  }
  return { ...withGaps(xs, [ys], 1), note: `${xs.length} readings`, from };
}

async function bucketSeries(device, metric, rangeSeconds) {
  const [width, bucket] = bucketFor(rangeSeconds);
  // Bucket-aligned start: the API lists only whole buckets inside the range; no `to`, so the
  // bucket still filling up is included.
  const from = Math.floor((Date.now() / 1000 - rangeSeconds) / width) * width;
  const answer = await api(`/v1/devices/${encodeURIComponent(device)}/aggregates`,
    { from, bucket, metrics: metric });
  const items = answer.items.filter((item) => item.metric === metric);
  return { ...withGaps(items.map((i) => seconds(i.start)),
    [items.map((i) => i.avg), items.map((i) => i.min), items.map((i) => i.max)], width),
  note: `${bucket} buckets`, band: true, from };
}

// Where no data came for longer than three times the series' usual step, a null goes in:
// uPlot then draws a gap instead of a line across the silence.
function withGaps(xs, columns, step) {
  const deltas = xs.slice(1).map((x, i) => x - xs[i]).sort((a, b) => a - b);
  const usual = Math.max(step, deltas.length ? deltas[Math.floor(deltas.length / 2)] : step);
  const x = [], ys = columns.map(() => []);
  xs.forEach((at, i) => {
    if (i > 0 && at - xs[i - 1] > 3 * usual) {
      x.push((at + xs[i - 1]) / 2);
      ys.forEach((column) => column.push(null));
    }
    x.push(at);
    ys.forEach((column, c) => column.push(columns[c][i]));
  });
  return { data: [x, ...ys] };
}

const COLOR = "#1565c0";
const chartWidth = (box) => Math.max(300, box.clientWidth - 20);   // inside the figure's padding
const BAND = "rgba(21, 101, 192, 0.15)";

function draw(box, metric, series, extra = {}) {
  const charts = window.vitalstore.charts;
  const existing = charts[metric];
  // The whole range chosen is shown, up to now, even where the data starts later.
  const showRange = (chart) => chart.setScale("x", { min: series.from, max: Date.now() / 1000 });
  if (existing) {
    // A refresh keeps the user's zoom.
    existing.setData(series.data, !existing.zoomed);
    if (!existing.zoomed) showRange(existing);
    return;
  }
  const lines = series.band
    ? [{ label: "average", stroke: COLOR, width: 1.5 },
      { label: "min", stroke: BAND, width: 1 }, { label: "max", stroke: BAND, width: 1 }]
    : [{ label: label(metric), stroke: COLOR, width: 1.5 }];
  const chart = new uPlot({
    width: chartWidth(box), height: 220,
    scales: { x: { time: true } },
    series: [{}, ...lines, ...(extra.series || [])],
    bands: series.band ? [{ series: [3, 2], fill: BAND }] : [],
    axes: [{}, { label: unit(metric) }, ...(extra.axes || [])],
    cursor: { drag: { x: true, y: false } },
    hooks: { setSelect: [(u) => { if (u.select.width > 0) u.zoomed = true; }] },
  }, series.data, box);
  chart.over.addEventListener("dblclick", () => { chart.zoomed = false; showRange(chart); });
  showRange(chart);
  charts[metric] = chart;
}

window.addEventListener("resize", () => {
  for (const chart of Object.values(window.vitalstore.charts)) {
    chart.setSize({ width: chartWidth(chart.root.parentNode), height: 220 });
  }
});

// One metric across the fleet (or a ward: a prefix): average per bucket and devices reporting.
function showFleetMetric(params) {
  const metric = el("input", { id: "metric", value: params.get("metric") || "heartRateValue",
    list: "known-metrics", size: 20 });
  const prefix = el("input", { id: "metric-prefix", value: params.get("prefix") || "",
    placeholder: "all devices", size: 20 });
  const range = el("select", { id: "metric-range" },
    Object.keys(RANGES).map((name) => el("option", { value: name,
      selected: name === (params.get("range") || "24h") }, name === "1h" ? "last hour" : name)));
  const form = el("form", { class: "metric-form", onsubmit: (event) => {
    event.preventDefault();
    const query = new URLSearchParams({ metric: metric.value, prefix: prefix.value, range: range.value });
    location.hash = `#/metric?${query}`;
  } },
  el("label", {}, "Metric ", metric), el("label", {}, " Devices starting with ", prefix),
  el("label", {}, " Range ", range), el("button", { type: "submit" }, "Show"),
  el("datalist", { id: "known-metrics" }, Object.keys(METRICS).map((name) => el("option", { value: name }))));
  const box = el("figure", { class: "chart", "data-metric": metric.value });
  const caption = el("figcaption", {});
  box.append(caption);
  newView(el("section", { id: "fleet-metric" }, el("h1", {}, "One metric across the fleet"), form, box,
    el("p", { class: "hint" }, "Average per bucket with the min–max band (left axis) and how many"
      + " devices reported in each bucket (right axis, grey).")));
  const started = performance.now();
  every(CHART_REFRESH_MS, async (current) => {
    const seconds_ = RANGES[range.value] || RANGES["24h"];
    const [width, bucket] = bucketFor(seconds_);
    const from = Math.floor((Date.now() / 1000 - seconds_) / width) * width;
    const answer = await api("/v1/aggregates", { metric: metric.value, bucket, from, prefix: prefix.value });
    if (!current()) return;
    const items = answer.items;
    const series = withGaps(items.map((i) => seconds(i.start)), [items.map((i) => i.avg),
      items.map((i) => i.min), items.map((i) => i.max), items.map((i) => i.devices)], width);
    caption.textContent = `${label(metric.value)}${unit(metric.value) ? ` (${unit(metric.value)})` : ""}`
      + ` · ${bucket} buckets · ${prefix.value ? `devices starting with ${prefix.value}` : "all devices"}`;
    draw(box, metric.value, { ...series, band: true, from }, {
      series: [{ label: "devices", stroke: "#888", width: 1, scale: "devices", paths: uPlot.paths.stepped({ align: 1 }) }],
      axes: [{ scale: "devices", side: 1, label: "devices", grid: { show: false } }],
    });
    if (window.vitalstore.drawnMs === null) window.vitalstore.drawnMs = performance.now() - started;
  });
}

document.getElementById("sign-out").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_STORAGE);
  showSignIn();
  showMessage("Signed out.", "info");
});
window.addEventListener("hashchange", route);
route();
