// The live viewer's page (served by inversionview.viewer.server). Vanilla JS, no build step, nothing from the
// network: the server renders each reading's HTML with the same code as the reports (viewer/html.py, escaped
// templates), and the page still inserts that HTML only through safeFragment (an allow-list of elements and
// attributes), never as innerHTML. Everything else goes in as text.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, tok: null, position: null, current: null, pins: [], seq: 0, reads: 0, reading: null };

async function api(path, body, signal) {
  const opt = body === undefined ? { signal } :
    { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal };
  const r = await fetch(path, opt);
  if (!r.ok) {
    let msg = `${r.status} ${r.statusText}`;
    try { msg = (await r.json()).error || msg; } catch (e) { /* not JSON */ }
    throw new Error(msg);
  }
  return (r.headers.get("Content-Type") || "").startsWith("application/json") ? r.json() : r.text();
}

function say(text, isError) {
  $("msg").textContent = text || "";
  $("msg").className = isError ? "error" : "";
}

// A reading's HTML as DOM nodes, keeping only the elements and attributes the reading templates write (no
// scripts, no event handlers, no links, no styles beyond colours and widths): parsed inert, then rebuilt. Another
// element leaves only its text, and scripts, styles and embedded documents leave nothing.
const TAGS = new Set(["SECTION", "H2", "SPAN", "DIV", "UL", "LI", "P", "B", "BR", "TABLE", "TBODY", "TR", "TH", "TD",
  "DETAILS", "SUMMARY", "CODE"]);
const DROP = new Set(["SCRIPT", "STYLE", "TEMPLATE", "NOSCRIPT", "IFRAME", "OBJECT", "EMBED", "SVG", "MATH", "TEXTAREA"]);
const ATTRS = new Set(["class", "title", "colspan", "data-site", "data-position", "data-i", "data-distance",
  "data-share", "data-low", "data-high"]);
// colours, the distance bars' widths, and the chart's bars and intervals (percentages of their track)
const STYLE = /^(background:rgba\([\d.,]+\)|width:\d+px|width:[\d.]+%|left:[\d.]+%;width:[\d.]+%)$/;

function safeFragment(html) {
  const doc = new DOMParser().parseFromString(`<body>${html}</body>`, "text/html");  // inert: nothing loads or runs
  const clean = (node) => {
    for (const c of [...node.children]) {
      const tag = c.tagName.toUpperCase();
      if (DROP.has(tag)) { c.remove(); continue; }
      clean(c);
      if (!TAGS.has(tag)) { c.replaceWith(...c.childNodes); continue; }
      for (const a of [...c.attributes]) {
        if (!ATTRS.has(a.name) && !(a.name === "style" && STYLE.test(a.value))) c.removeAttribute(a.name);
      }
    }
  };
  clean(doc.body);
  const out = document.createDocumentFragment();
  out.append(...[...doc.body.childNodes].map((n) => document.adoptNode(n)));
  return out;
}

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  Object.entries(attrs || {}).forEach(([k, v]) => e.setAttribute(k, v));
  if (text !== undefined) e.textContent = text;
  return e;
}

// ------------------------------------------------------------------------------------------ setup
async function init() {
  const info = state.info = await api("/api/info");
  $("run").textContent = `${info.run} · ${info.task || "own data"} · ${info.mode} activations`;
  const sel = $("site");
  let best = null;
  for (const g of info.groups) {
    const og = el("optgroup", { label: g.label });
    for (const s of g.sites) {
      og.appendChild(el("option", { value: s.short, title: s.name }, s.short + (s.head ? "  (head)" : "")));
      if (s.head) best = s.short;  // default: the last head, the paper's favourite reading
    }
    sel.appendChild(og);
  }
  sel.value = best || info.groups[0].sites[0].short;
  $("epsilon").value = info.epsilon;
  $("metric").value = info.metric;
  $("samples").value = info.samples;
  $("samples").max = info.max_samples;
  $("samples").title = `at most ${info.max_samples}`;
  $("random").disabled = !info.random;
  $("auto").addEventListener("change", () => {
    $("temperature").disabled = $("noise").disabled = $("auto").checked;
  });
  $("text").addEventListener("input", () => { clearTimeout(state.timer); state.timer = setTimeout(tokenize, 150); });
  $("random").addEventListener("click", randomInput);
  $("controls").addEventListener("submit", (ev) => { ev.preventDefault(); read(); });
  $("pin").addEventListener("click", pin);
  $("clear").addEventListener("click", () => { state.pins = []; renderPins(); });
  $("download").addEventListener("click", download);
  $("epsilon").addEventListener("change", reEpsilon);
  if (info.stored) initStored();
  if (info.random) await randomInput();
}

// ------------------------------------------------------------------------------------------ the query input
function showTokens(t, keep) {
  state.tok = t;
  if (!(keep && state.position !== null && state.position < t.n_text)) {
    state.position = t.positions.length ? t.positions[t.positions.length - 1] : t.n_text - 1;
  }
  const box = $("tokens");
  box.textContent = "";
  t.tokens.forEach((tk, i) => {
    const cls = ["tok"];
    if (i >= t.n_text) cls.push("off");
    if (t.positions.includes(i)) cls.push("task");
    if (i === state.position) cls.push("sel");
    const s = el("span", { class: cls.join(" "), "data-i": i,
      title: i >= t.n_text ? `position ${i}: EOS, not a query position` : `position ${i}` }, tk);
    if (i < t.n_text) s.addEventListener("click", () => choose(i));
    box.appendChild(s);
  });
  const p = state.position;
  $("posinfo").textContent = `position ${p} ${JSON.stringify(t.tokens[p])}` +
    (t.positions.length ? " · underlined: the task's query positions" : "");
}

function choose(i) {
  state.position = i;
  showTokens(state.tok, true);
}

async function tokenize() {
  const text = $("text").value;
  if (!text) { state.tok = null; $("tokens").textContent = ""; $("posinfo").textContent = ""; return; }
  try {
    const t = await api("/api/tokens", { text });
    if (t.text !== $("text").value) return;  // typed on meanwhile
    showTokens(t, true);
    say("");
  } catch (e) {
    state.tok = null;
    $("tokens").textContent = "";
    $("posinfo").textContent = "";
    say(e.message, true);
  }
}

async function randomInput() {
  try {
    const t = await api("/api/random");
    $("text").value = t.text;
    showTokens(t, false);
    say("");
  } catch (e) { say(e.message, true); }
}

// ------------------------------------------------------------------------------------------ reading
function number(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

async function read() {
  const text = $("text").value;
  if (!text) { say("type an input first", true); return; }
  if (!state.tok || state.tok.text !== text) {  // typed since the last tokenization: the position is chosen on it
    clearTimeout(state.timer);
    await tokenize();
    if (!state.tok) return;  // the message says why
  }
  const body = { text, site: $("site").value, position: state.position, epsilon: number("epsilon"),
    metric: $("metric").value, samples: number("samples") ?? state.info.samples };
  if (!$("auto").checked) {
    body.temperature = number("temperature");
    if (body.temperature === null) { say("type a temperature, or tick Auto mix", true); return; }  // null means Auto
    body.noise = number("noise") ?? 0;
  }
  const seq = ++state.seq;
  const t0 = performance.now();
  if (state.reading) state.reading.abort();  // the server drops the earlier query if it is still waiting
  const ctl = state.reading = new AbortController();
  body.ticket = `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
  document.body.classList.add("busy");
  $("status").textContent = "reading…";
  say("");
  const poll = setInterval(() => showQueue(body.ticket, seq), 500);
  try {
    const r = await api("/api/query", body, ctl.signal);
    if (seq !== state.seq) return;  // a later query was started
    show(r);
    const ms = performance.now() - t0;
    state.reads += 1;
    document.body.dataset.reads = state.reads;
    document.body.dataset.lastMs = ms.toFixed(0);
    $("status").textContent = `read in ${(ms / 1000).toFixed(2)} s (model ${r.seconds.toFixed(2)} s)`;
  } catch (e) {
    if (seq === state.seq) { say(e.message, true); $("status").textContent = ""; }
  } finally {
    clearInterval(poll);
    if (seq === state.seq) { document.body.classList.remove("busy"); state.reading = null; }
  }
}

// Where the query waits: other readings run first, one at a time.
async function showQueue(ticket, seq) {
  try {
    const q = await api(`/api/queue?ticket=${encodeURIComponent(ticket)}`);
    if (seq !== state.seq || !state.reading || q.position === null) return;
    const ahead = q.position - 1 + (q.running ? 1 : 0);  // waiting before it, and the one being read
    $("status").textContent = q.position === 0 ? "reading…" :
      `queued: ${ahead} reading${ahead === 1 ? "" : "s"} ahead of this one`;
    document.body.dataset.queued = q.position;
  } catch (e) { /* the reading itself reports errors */ }
}

function show(r) {
  state.current = r;
  $("current").replaceChildren(safeFragment(r.html));
  $("pin").disabled = state.pins.includes(r);
  $("download").disabled = false;
}

// The current reading at the new epsilon, without sampling again (pinned readings keep theirs).
async function reEpsilon() {
  const eps = number("epsilon");
  if (!state.current || eps === null || eps === state.current.reading.epsilon) return;
  try {
    show(await api("/api/epsilon", { reading: state.current.reading, epsilon: eps }));
    say("");
  } catch (e) { say(e.message, true); }
}

// ------------------------------------------------------------------------------------------ compare and report
function pin() {
  if (!state.current || state.pins.includes(state.current)) return;
  state.pins.push(state.current);
  renderPins();
}

function renderPins() {
  const box = $("pins");
  box.textContent = "";
  state.pins.forEach((r, k) => {
    const d = el("div", { class: "pin" });
    d.appendChild(safeFragment(r.html));
    const x = el("button", { type: "button", class: "unpin", title: "unpin" }, "×");
    x.addEventListener("click", () => { state.pins.splice(k, 1); renderPins(); });
    d.appendChild(x);
    box.appendChild(d);
  });
  $("npins").textContent = state.pins.length ? `(${state.pins.length}, side by side)` : "(none)";
  $("clear").disabled = !state.pins.length;
  $("pin").disabled = !state.current || state.pins.includes(state.current);
  $("download").disabled = !state.pins.length && !state.current;
}

async function download() {
  const chosen = state.pins.length ? state.pins : (state.current ? [state.current] : []);
  if (!chosen.length) { say("read or pin a reading first", true); return; }
  try {
    const html = await api("/api/report", { readings: chosen.map((r) => r.reading) });
    const url = URL.createObjectURL(new Blob([html], { type: "text/html" }));
    const a = el("a", { href: url, download: "inversionview-report.html" });
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
    say(`report of ${chosen.length} reading${chosen.length > 1 ? "s" : ""} downloaded`);
  } catch (e) { say(e.message, true); }
}

// ------------------------------------------------------------------------------------------ stored readings
async function initStored() {
  $("storedbox").hidden = false;
  $("storedform").addEventListener("submit", (ev) => { ev.preventDefault(); searchStored(); });
  await searchStored(true);
}

async function searchStored(fillSites) {
  const q = new URLSearchParams();
  for (const [k, id] of [["site", "ssite"], ["position", "sposition"], ["text", "stext"]]) {
    if ($(id).value.trim()) q.set(k, $(id).value.trim());
  }
  try {
    const r = await api("/api/stored?" + q.toString());
    if (fillSites) r.sites.forEach((s) => $("ssite").appendChild(el("option", { value: s }, s)));
    const t = $("stored");
    t.textContent = "";
    const head = el("tr");
    ["id", "site", "position", "text", "inside epsilon", "samples"].forEach((h) => head.appendChild(el("th", {}, h)));
    t.appendChild(head);
    for (const row of r.readings) {
      const tr = el("tr", { "data-id": row.id, title: "load this reading into the view" });
      [row.id, row.site_short, row.position, row.text, `${(100 * row.fraction_inside).toFixed(1)}%`, row.n_samples]
        .forEach((v) => tr.appendChild(el("td", {}, String(v))));
      tr.addEventListener("click", () => openStored(row.id));
      t.appendChild(tr);
    }
    $("scount").textContent = r.more ? `the first ${r.readings.length} readings: filter to see others` :
      `${r.readings.length} reading${r.readings.length === 1 ? "" : "s"}`;
  } catch (e) { say(e.message, true); }
}

async function openStored(id) {
  try {
    const r = await api(`/api/stored/${encodeURIComponent(id)}`);
    show(r);
    $("status").textContent = `stored reading ${id}`;
    say("");
    // the controls show the stored query, so that Read reads it again with other settings
    $("text").value = r.reading.text;
    $("site").value = r.reading.site_short;
    $("epsilon").value = r.reading.epsilon;
    state.position = r.reading.position;
    await tokenize();
  } catch (e) { say(e.message, true); }
}

init().catch((e) => say(e.message, true));
