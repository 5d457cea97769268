// The reid-gallery page: a client of the server's JSON API (/api/...), nothing else loaded.
"use strict";

const $ = (id) => document.getElementById(id);
let info = null;
let query = null; // {kind: "upload", file} or {kind: "id", id, camid}

function fmtTime(hit) {
  if (hit.timestamp_raw !== null && hit.timestamp_raw !== undefined) return hit.timestamp_raw;
  return hit.timestamp === null ? "–" : String(hit.timestamp);
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
    const span = document.createElement("div");
    span.className = "no-match";
    span.textContent = `No likely match: every hit scores below the threshold ${result.calibration.threshold.toFixed(3)}.`;
    $("status").appendChild(span);
  }
  for (const n of result.notes) {
    const span = document.createElement("div");
    span.className = "note";
    span.textContent = n;
    $("status").appendChild(span);
  }
  const grid = $("grid");
  grid.replaceChildren();
  for (const h of result.hits) {
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
    card.addEventListener("click", () => fromCrop(h));
    grid.appendChild(card);
  }
  timeline(result.hits);
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
  query = {kind: "id", id: h.id, camid: h.camid};
  showQuery(h.thumbnail, `crop #${h.id} · cam ${h.camid ?? "?"} · t ${fmtTime(h)}`);
  search();
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
  loadInfo().then(() => setStatus("Choose a query crop.")).catch((e) => setStatus(e.message, true));
}

init();
