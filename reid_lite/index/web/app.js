// The reid-gallery page: a client of the server's JSON API (/api/...), nothing else loaded.
"use strict";

const $ = (id) => document.getElementById(id);
let info = null;
let query = null; // {kind: "upload", file} or {kind: "id", id, camid, tracklet}
const SVG = "http://www.w3.org/2000/svg";

function fmtTime(hit) {
  if (hit.timestamp_raw !== null && hit.timestamp_raw !== undefined) return hit.timestamp_raw;
  return hit.timestamp === null ? "–" : String(hit.timestamp);
}

// A time in seconds: a clock time for epoch seconds (a video ingested with an ISO --start), else seconds.
function fmtSeconds(t) {
  if (t > 1e8) return new Date(t * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
  return `${t.toFixed(2)} s`;
}

function fmtSpan(t) {
  return `${fmtSeconds(t.start)} · ${(t.end - t.start).toFixed(1)} s · ${t.crop_count} crops`;
}

function setStatus(text, isError) {
  const s = $("status");
  s.textContent = text;
  s.className = isError ? "error" : "";
}

async function api(url, options) {
  const r = await fetch(url, options);
  let body;
  try { body = await r.json(); } catch (e) { body = {error: `HTTP ${r.status}`}; }
  if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
  return body;
}

// "1 camera", "3 cameras": counts read as English (the CLI's reid_lite.utils.text.count).
function count(n, noun) {
  return `${n} ${n === 1 ? noun : noun + "s"}`;
}

async function loadInfo() {
  info = await api("/api/info");
  const cams = Object.keys(info.cameras).filter((c) => c !== "None").map(Number).sort((a, b) => a - b);
  const span = info.time_span ? `, time ${info.time_span[0]} .. ${info.time_span[1]}` : "";
  const cal = info.calibration
    ? `, match threshold ${info.calibration.threshold.toFixed(3)}`
    : ", not calibrated (no match threshold)";
  $("gallery-info").textContent =
    `${count(info.size, "crop")}, ${count(cams.length, "camera")}, generation ${info.generation}${span}${cal}`;
  const box = $("cameras");
  box.querySelectorAll("label").forEach((l) => l.remove());
  for (const c of cams) {
    const label = document.createElement("label");
    label.innerHTML = `<input type="checkbox" value="${c}" checked> ${c}`;
    box.appendChild(label);
  }
  const sel = $("query-camera");
  const cameraCount = info.sie_camera ? info.camera_num : Math.max(info.camera_num, cams.length ? cams.at(-1) + 1 : 0);
  for (let c = 0; c < cameraCount; c++) sel.add(new Option(`camera ${c}`, String(c)));
  $("add-row").hidden = !info.allow_add;
  $("tracklet-box").hidden = $("next-box").hidden = !info.tracklets;
  if (info.tracklets) await loadTracklets();
}

async function loadTracklets() {
  const body = await api("/api/tracklets?limit=300");
  const box = $("tracklets");
  box.replaceChildren();
  for (const t of body.tracklets) {
    const item = document.createElement("div");
    item.className = "tracklet";
    item.dataset.id = t.id;
    item.title = `tracklet #${t.id}: camera ${t.camid}, ${fmtSpan(t)}; click to search from it`;
    item.innerHTML = `<img src="${t.thumbnail}" alt=""><span></span>`;
    item.querySelector("span").textContent = `#${t.id} c${t.camid} ${fmtSeconds(t.start)}`;
    item.addEventListener("click", () => fromCrop({...t, tracklet: t}));
    box.appendChild(item);
  }
}

function params() {
  const p = new URLSearchParams();
  p.set("k", $("k").value || "20");
  const boxes = [...$("cameras").querySelectorAll("input[type=checkbox]")];
  const chosen = boxes.filter((b) => b.checked).map((b) => b.value);
  if (chosen.length < boxes.length) chosen.forEach((c) => p.append("cameras", c));
  if (boxes.length && !chosen.length) throw new Error("choose at least one camera");
  if ($("exclude-same").checked) p.set("exclude_same_camera", "true");
  if ($("time-from").value.trim()) p.set("time_from", $("time-from").value.trim());
  if ($("time-to").value.trim()) p.set("time_to", $("time-to").value.trim());
  return p;
}

async function search() {
  if (!query) return;
  let result;
  try {
    const p = params();
    setStatus("searching…");
    if (query.kind === "upload") {
      if ($("query-camera").value !== "") p.set("camera", $("query-camera").value);
      p.set("filename", query.file.name);
      result = await api(`/api/search?${p}`, {method: "POST", body: query.file});
    } else {
      result = await api(`/api/crops/${query.id}/search?${p}`);
    }
  } catch (e) {
    setStatus(e.message, true);
    return;
  }
  render(result);
}

function render(result) {
  const q = result.query;
  const who = q.id !== undefined ? `crop #${q.id} (${q.name})` : (q.filename || "upload");
  const likely = result.calibration ? `, ${result.hits.filter((h) => h.likely).length} likely` : "";
  setStatus(`${count(result.hits.length, "hit")}${likely} for ${who}, camera ${q.camera ?? q.camid ?? "?"}; ` +
            `generation ${result.generation}, ${(result.seconds * 1000).toFixed(0)} ms`);
  if (result.calibration && result.no_likely_match && result.hits.length) {
    addStatusLine("no-match",
                  `No likely match: every hit scores below the threshold ${result.calibration.threshold.toFixed(3)}.`);
  }
  for (const n of result.notes) addStatusLine("note", n);
  renderHits(result.hits);
  timeline(result.hits);
}

// One line under the status bar (a note of the server's, or the calibrated "no likely match").
function addStatusLine(className, text) {
  const line = document.createElement("div");
  line.className = className;
  line.textContent = text;
  $("status").appendChild(line);
}

function renderHits(hits) {
  const grid = $("grid");
  grid.replaceChildren();
  for (const h of hits) {
    const card = document.createElement("div");
    card.className = h.likely === false ? "hit unlikely" : "hit";
    card.dataset.id = h.id;
    card.dataset.camid = h.camid;
    card.title = `${h.name}: click to search from this crop`;
    const who = h.identity === null ? "" : ` · id ${h.identity}`;
    card.innerHTML = `<img src="${h.thumbnail}" alt=""><span class="score"></span><span class="meta"></span>` +
                     (h.likely === false ? `<span class="flag">unlikely</span>` : "");
    // Text from the gallery (a sidecar's timestamp, a file name) goes in as text, never as HTML.
    card.querySelector(".score").textContent = `#${h.rank} ${h.score.toFixed(3)}`;
    card.querySelector(".meta").textContent = `cam ${h.camid ?? "?"} · t ${fmtTime(h)}${who}`;
    if (h.tracklet) {
      const span = document.createElement("span");
      span.className = "span";
      span.textContent = `${(h.tracklet.end - h.tracklet.start).toFixed(1)} s, ${h.tracklet.crop_count} crops`;
      card.appendChild(span);
    }
    card.addEventListener("click", () => fromCrop(h));
    grid.appendChild(card);
  }
}

function timeline(hits) {
  const svg = $("timeline");
  const ns = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  const timed = hits.filter((h) => h.timestamp !== null && h.camid !== null);
  const cams = [...new Set(hits.map((h) => h.camid))].filter((c) => c !== null).sort((a, b) => a - b);
  const row = 26, left = 70, right = 16, width = svg.clientWidth || 800;
  svg.setAttribute("height", String(Math.max(1, cams.length) * row + 24));
  if (!timed.length) {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", "8"); t.setAttribute("y", "18");
    t.textContent = hits.length ? "the hits have no timestamps" : "no hits";
    svg.appendChild(t);
    return;
  }
  const t0 = Math.min(...timed.map((h) => h.timestamp)), t1 = Math.max(...timed.map((h) => h.timestamp));
  const x = (t) => left + (t1 === t0 ? 0.5 : (t - t0) / (t1 - t0)) * (width - left - right);
  cams.forEach((c, i) => {
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", "6"); label.setAttribute("y", String(i * row + 17));
    label.textContent = `camera ${c}`;
    const line = document.createElementNS(ns, "line");
    line.setAttribute("x1", String(left)); line.setAttribute("x2", String(width - right));
    line.setAttribute("y1", String(i * row + 13)); line.setAttribute("y2", String(i * row + 13));
    line.setAttribute("stroke", "#ccc");
    svg.append(label, line);
  });
  for (const h of timed) {
    const dot = document.createElementNS(ns, "circle");
    dot.setAttribute("cx", String(x(h.timestamp)));
    dot.setAttribute("cy", String(cams.indexOf(h.camid) * row + 13));
    dot.setAttribute("r", String(Math.max(3, 8 - h.rank / 3)));
    dot.setAttribute("opacity", String(Math.max(0.25, Math.min(1, h.score))));
    dot.dataset.id = h.id;
    if (h.likely === false) dot.classList.add("unlikely");
    const title = document.createElementNS(ns, "title");
    title.textContent = `#${h.rank} ${h.score.toFixed(3)} · cam ${h.camid} · t ${fmtTime(h)}`;
    dot.appendChild(title);
    dot.addEventListener("click", () => fromCrop(h));
    svg.appendChild(dot);
  }
  const axis = document.createElementNS(ns, "text");
  axis.setAttribute("x", String(left)); axis.setAttribute("y", String(cams.length * row + 16));
  axis.textContent = `${timed.find((h) => h.timestamp === t0).timestamp_raw ?? t0}  …  ` +
                     `${timed.find((h) => h.timestamp === t1).timestamp_raw ?? t1}`;
  svg.appendChild(axis);
}

function showQuery(src, text) {
  $("query-img").src = src;
  $("query-img").hidden = false;
  $("drop-text").hidden = true;
  $("query-info").textContent = text;
  $("search").disabled = false;
}

function fromCrop(h) {
  query = {kind: "id", id: h.id, camid: h.camid, tracklet: h.tracklet || null};
  const what = h.tracklet ? `tracklet #${h.id} · cam ${h.camid} · ${fmtSpan(h.tracklet)}`
                          : `crop #${h.id} · cam ${h.camid ?? "?"} · t ${fmtTime(h)}`;
  showQuery(h.thumbnail, what);
  $("next").disabled = !h.tracklet;
  document.querySelectorAll(".tracklet").forEach((e) => e.classList.toggle("chosen", e.dataset.id === String(h.id)));
  $("trajectory-box").hidden = true;
  search();
}

// "Where did this person appear next": the tracklet's hits that start within the window after it ends,
// on other cameras (its own too when asked), drawn in time order per camera.
async function whereNext(id) {
  const p = new URLSearchParams({k: $("k").value || "20", within: $("within").value.trim() || ".."});
  if ($("same-camera").checked) p.set("same_camera", "true");
  let result;
  try {
    setStatus("searching where next…");
    result = await api(`/api/tracklets/${id}/after?${p}`);
  } catch (e) {
    setStatus(e.message, true);
    return;
  }
  const q = result.query;
  query = {kind: "id", id: q.id, camid: q.camid, tracklet: q};
  showQuery(q.thumbnail, `tracklet #${q.id} · cam ${q.camid} · ${fmtSpan(q)}`);
  $("next").disabled = false;
  const where = result.same_camera ? "any camera" : "other cameras";
  setStatus(`${count(result.hits.length, "hit")} on ${where} within ${result.within} after tracklet #${q.id} ` +
            `(camera ${q.camid}), in time order; generation ${result.generation}, ` +
            `${(result.seconds * 1000).toFixed(0)} ms`);
  for (const n of result.notes) addStatusLine("note", n);
  renderHits(result.hits);
  timeline(result.hits);
  trajectory(q, result.hits, result.window);
}

function svgEl(name, attrs, text) {
  const e = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

function trajectory(q, hits, window) {
  const svg = $("trajectory");
  $("trajectory-box").hidden = false;
  $("trajectory-title").textContent = `Trajectory of tracklet #${q.id}: where next, per camera along time`;
  svg.replaceChildren();
  const items = [{...q, query: true}, ...hits.filter((h) => h.start !== null).map((h) => ({...h, query: false}))];
  const cams = [...new Set(items.map((i) => i.camid))].sort((a, b) => (a ?? -1) - (b ?? -1));
  const row = 92, top = 8, left = 80, right = 20, thumb = 34, width = svg.clientWidth || 900;
  let t0 = Math.min(...items.map((i) => i.start)), t1 = Math.max(...items.map((i) => i.end));
  const pad = Math.max(0.5, (t1 - t0) * 0.04);
  t0 -= pad; t1 += pad;
  const x = (t) => left + (t - t0) / (t1 - t0) * (width - left - right);
  // Items of one camera that would overlap (tracklets close in time) go to the next row of its lane.
  const rows = new Map(cams.map((c) => [c, []]));
  for (const it of [...items].sort((a, b) => a.start - b.start)) {
    const ends = rows.get(it.camid);
    const x0 = x(it.start), x1 = Math.max(x(it.end), x0 + thumb + 4) + 50;  // room for the label
    let r = ends.findIndex((e) => e <= x0);
    if (r < 0) { r = ends.length; ends.push(0); }
    ends[r] = x1;
    it.row = r;
  }
  const laneTop = new Map();
  let y = top;
  for (const c of cams) { laneTop.set(c, y); y += rows.get(c).length * row + 6; }
  svg.setAttribute("height", String(y + 26));
  const w0 = Math.max(t0, window[0] ?? t0), w1 = Math.min(t1, window[1] ?? t1);
  if (w1 > w0) svg.appendChild(svgEl("rect", {class: "window", x: x(w0), y: top, width: x(w1) - x(w0), height: y - top}));
  cams.forEach((c) => {
    const yl = laneTop.get(c) + rows.get(c).length * row + 2;
    svg.appendChild(svgEl("line", {class: "lane", x1: left, x2: width - right, y1: yl, y2: yl}));
    svg.appendChild(svgEl("text", {class: "lane-label", x: 4, y: laneTop.get(c) + 40}, `camera ${c}`));
  });
  const base = (it) => laneTop.get(it.camid) + it.row * row;
  const qbar = base(items[0]) + row - 12;
  for (const it of items) {
    const g = svgEl("g", {class: it.query ? "item query" : "item", "data-id": it.id});
    const x0 = x(it.start), x1 = Math.max(x(it.end), x0 + 4), yb = base(it) + row - 16;
    if (!it.query) g.appendChild(svgEl("path", {class: "arrow", d: `M${x(q.end)},${qbar + 5} L${x0},${yb + 5}`}));
    const cls = it.query ? "bar query" : (it.likely === false ? "bar unlikely" : "bar");
    g.appendChild(svgEl("rect", {class: cls, x: x0, y: yb, width: x1 - x0, height: 10, rx: 2}));
    g.appendChild(svgEl("image", {href: it.thumbnail, x: x0, y: base(it) + 14, height: 60, width: thumb,
                                  preserveAspectRatio: "xMinYMid meet"}));
    g.appendChild(svgEl("text", {x: x0, y: base(it) + 11},
                        it.query ? `#${it.id} (query)` : `#${it.rank} ${it.score.toFixed(2)}`));
    g.appendChild(svgEl("title", {}, `${it.query ? "query " : ""}tracklet #${it.id} · cam ${it.camid} · ` +
                        `${fmtSeconds(it.start)} .. ${fmtSeconds(it.end)}` + (it.query ? "" : ` · score ${it.score.toFixed(3)}`)));
    if (!it.query) g.addEventListener("click", () => fromCrop(it));
    svg.appendChild(g);
  }
  const ticks = 6;
  for (let i = 0; i <= ticks; i++) {
    const t = t0 + (t1 - t0) * i / ticks;
    svg.appendChild(svgEl("text", {class: "tick", x: x(t) - 20, y: y + 16}, fmtSeconds(t)));
  }
}

function fromFile(file) {
  if (!file) return;
  query = {kind: "upload", file};
  showQuery(URL.createObjectURL(file), file.name);
  search();
}

async function addCrop() {
  if (!query || query.kind !== "upload") { setStatus("choose a crop file to add", true); return; }
  const p = new URLSearchParams({filename: query.file.name});
  if ($("query-camera").value !== "") p.set("camera", $("query-camera").value);
  try {
    const r = await api(`/api/crops?${p}`, {method: "POST", body: query.file});
    setStatus(r.added ? `added as crop #${r.id} (generation ${r.generation})` : `already stored as crop #${r.id}`);
    await loadInfo();
  } catch (e) {
    setStatus(e.message, true);
  }
}

function init() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => fromFile(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    fromFile(e.dataTransfer.files[0]);
  });
  $("search").addEventListener("click", search);
  $("add").addEventListener("click", addCrop);
  $("cameras").addEventListener("change", search);
  for (const id of ["exclude-same", "query-camera", "k", "time-from", "time-to"]) $(id).addEventListener("change", search);
  $("next").addEventListener("click", () => query && query.tracklet && whereNext(query.id));
  // /?after=ID[&within=20s..10min][&same_camera=1][&k=10]: open on that tracklet's trajectory (links, screenshots)
  const url = new URLSearchParams(location.search);
  if (url.get("within")) $("within").value = url.get("within");
  if (url.get("k")) $("k").value = url.get("k");
  if (url.get("same_camera")) $("same-camera").checked = true;
  loadInfo().then(() => {
    setStatus(info.tracklets ? "Choose a query crop or a tracklet." : "Choose a query crop.");
    if (url.get("after")) whereNext(url.get("after"));
  }).catch((e) => setStatus(e.message, true));
}

init();
