// The twin's dashboard: renders /api/state, then follows /events (server-sent events). No libraries.
"use strict";

const $ = (id) => document.getElementById(id);
const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
const badge = (state) => `<span class="state s-${esc(state)}">${esc(state)}</span>`;
const SVGNS = "http://www.w3.org/2000/svg";
let history = [];
let last = null;
const seen = {};   // agent -> state shown last, to flash rows that change

function dur(s) {
  if (s === null || s === undefined) return "–";
  s = Math.round(s);
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m " + (s % 60) + "s";
  if (s < 86400) return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m";
  return Math.floor(s / 86400) + "d " + Math.floor((s % 86400) / 3600) + "h";
}
const num = (v, d = 0) => (v === null || v === undefined) ? "–" : Number(v).toLocaleString(undefined, { maximumFractionDigits: d });
const mib = (v) => v >= 1024 ? (v / 1024).toFixed(1) + " GiB" : num(v) + " MiB";

function render(st) {
  last = st;
  document.title = `${st.mesh}: ${st.mesh_state}`;
  $("mesh").textContent = st.mesh;
  const ms = $("mesh-state");
  ms.textContent = st.mesh_state;
  ms.className = "badge s-" + (st.mesh_state === "failing" ? "dead" : st.mesh_state);
  const ready = st.agents.filter((a) => a.state === "ready" || a.state === "degraded").length;
  $("summary").textContent = `${ready}/${st.agents.length} agents up · twin up ${dur(st.twin_uptime_s)}`;
  renderAlerts(st.alerts);
  renderHosts(st);
  renderGraph(st);
  renderGpu(st.gpu);
  renderPipeline(st.pipeline, st.agents);
}

function renderAlerts(alerts) {
  const ul = $("alerts");
  if (!alerts.length) { ul.innerHTML = '<li class="none">none</li>'; return; }
  ul.innerHTML = alerts.map((a) => `<li class="${esc(a.severity)}" data-kind="${esc(a.kind)}"><time>${esc(new Date(a.at * 1000).toLocaleTimeString())}</time>${esc(a.message)}</li>`).join("");
}

function renderHosts(st) {
  const byName = Object.fromEntries(st.agents.map((a) => [a.agent, a]));
  let html = "";
  for (const h of st.hosts) {
    html += `<div class="host" data-host="${esc(h.host)}"><h3>${esc(h.host)} <small>${esc(h.address)}</small> ${badge(h.state)} <small>${h.ready}/${h.agents} up</small></h3>`;
    for (const g of st.groups.filter((g) => g.host === h.host && g.agents.length)) {
      html += `<div class="group"><h4>container ${esc(g.group)}${g.gpu ? " · GPU" : ""}</h4><div class="scroll"><table><thead><tr>
        <th>agent</th><th>state</th><th class="num">heartbeat</th><th class="num opt2">uptime</th><th class="num">restarts</th>
        <th class="num opt2">msg/s</th><th class="num">errors</th><th class="opt">kind</th><th class="opt">detail</th></tr></thead><tbody>`;
      for (const name of g.agents) {
        const a = byName[name];
        if (!a) continue;
        const changed = seen[name] !== undefined && seen[name] !== a.state;
        seen[name] = a.state;
        const detail = a.waiting_on.length ? "waits for " + a.waiting_on.join(", ") : a.detail;
        html += `<tr data-agent="${esc(name)}" data-state="${esc(a.state)}"${changed ? ' class="changed"' : ""}>
          <td>${esc(name)}${a.pool ? ` <small>(pool ${esc(a.pool)})</small>` : ""}${a.required ? "" : ' <small>(optional)</small>'}</td><td class="st">${badge(a.state)}</td>
          <td class="num">${a.heartbeat_age_s === null ? "–" : a.heartbeat_age_s.toFixed(1) + "s"}</td>
          <td class="num opt2">${dur(a.uptime_s)}</td><td class="num">${a.restarts}</td>
          <td class="num opt2">${num(a.msgs_per_s, 1)}</td>
          <td class="num">${num(a.errors)}${a.errors_per_s > 0 ? ` <small>(${num(a.errors_per_s, 2)}/s)</small>` : ""}</td>
          <td class="opt">${esc(a.kind)}</td><td class="detail opt">${esc(detail)}</td></tr>`;
      }
      html += "</tbody></table></div></div>";
    }
    html += "</div>";
  }
  $("hosts").innerHTML = html;
}

function renderGraph(st) {
  const svg = $("graph");
  const byName = Object.fromEntries(st.agents.map((a) => [a.agent, a]));
  const colW = 150, rowH = 34, nodeW = 124, nodeH = 24, pad = 8;
  const pos = {};
  st.order.forEach((level, i) => level.forEach((name, j) => { pos[name] = { x: pad + i * colW, y: pad + j * rowH }; }));
  const rows = Math.max(1, ...st.order.map((l) => l.length));
  const width = pad * 2 + Math.max(1, st.order.length) * colW - (colW - nodeW);
  svg.setAttribute("viewBox", `0 0 ${width} ${pad * 2 + rows * rowH - (rowH - nodeH)}`);
  svg.style.maxWidth = width * 1.3 + "px";
  let out = "";
  for (const a of st.agents) {
    for (const d of a.needs || a.depends_on) {
      if (!pos[d] || !pos[a.agent]) continue;
      const s = pos[d], t = pos[a.agent];
      const x1 = s.x + nodeW, y1 = s.y + nodeH / 2, x2 = t.x, y2 = t.y + nodeH / 2, mx = (x1 + x2) / 2;
      const up = byName[d] && (byName[d].state === "ready" || byName[d].state === "degraded");
      out += `<path class="edge${up ? "" : " blocked"}" d="M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}"/>`;
    }
  }
  for (const [name, p] of Object.entries(pos)) {
    const state = byName[name] ? byName[name].state : "declared";
    const colour = getComputedStyle(document.documentElement).getPropertyValue("--" + state) || "#6e7681";
    out += `<g data-node="${esc(name)}"><rect x="${p.x}" y="${p.y}" width="${nodeW}" height="${nodeH}" rx="5" fill="${esc(colour.trim())}" fill-opacity="0.85"/>
      <text x="${p.x + 6}" y="${p.y + 16}">${esc(name.length > 18 ? name.slice(0, 17) + "…" : name)}</text><title>${esc(name)}: ${esc(state)}</title></g>`;
  }
  svg.innerHTML = out;
  $("order").innerHTML = st.order.map((level) => "<li>" + level.map((name) => {
    const a = byName[name];
    const wait = a && a.waiting_on.length ? ` <span class="wait">(waits for ${esc(a.waiting_on.join(", "))})</span>` : "";
    return `${esc(name)}${wait}`;
  }).join(", ") + "</li>").join("");
}

function renderGpu(gpu) {
  const box = $("gpu");
  if (!gpu || !gpu.agent) { box.innerHTML = '<p class="none">no VRAM optimizer reporting</p>'; return; }
  let html = gpu.gpus.length ? "" : '<p class="none">no GPU on this host (leases run on the CPU)</p>';
  for (const g of gpu.gpus) {
    const leased = Math.min(g.leased_mb, g.total_mb), other = Math.max(0, Math.min(g.used_mb, g.total_mb) - leased);
    html += `<div data-gpu="${g.index}">GPU ${g.index}: ${mib(g.used_mb)} used of ${mib(g.total_mb)}, ${mib(g.leased_mb)} leased
      <div class="bar"><span class="leased" style="width:${(100 * leased / g.total_mb).toFixed(1)}%"></span><span class="other" style="width:${(100 * other / g.total_mb).toFixed(1)}%"></span></div></div>`;
  }
  const leases = Object.entries(gpu.leases);
  html += leases.length ? "<table><thead><tr><th>lease holder</th><th class=\"num\">MiB</th></tr></thead><tbody>" +
    leases.map(([a, v]) => `<tr><td>${esc(a)}</td><td class="num">${num(v)}</td></tr>`).join("") + "</tbody></table>"
    : '<p class="none">no leases held</p>';
  if (gpu.waiting) html += `<p>${gpu.waiting} request(s) waiting for VRAM</p>`;
  box.innerHTML = html;
}

const FIGURES = [["frontier", "frontier"], ["fetched", "fetched"], ["failed", "failed"], ["stored", "stored"], ["extracted", "extracted"],
  ["scored", "scored"], ["duplicates", "duplicates"], ["exact_duplicates", "exact dups"], ["topics", "topics"],
  ["novelty_p50", "novelty p50"], ["cache_items", "hot cache"]];

function renderPipeline(p, agents) {
  const shown = FIGURES.filter(([k]) => p[k] !== undefined);
  // the topic models' hardware profiles (gauge "profile:NAME", one per agent): gpu, cpu or small
  const profiles = [...new Set((agents || []).flatMap((a) => Object.keys(a.gauges || {})
    .filter((k) => k.startsWith("profile:")).map((k) => k.slice(8))))];
  const profile = profiles.length ? `<div data-figure="profile"><dt>embedding profile</dt><dd>${esc(profiles.join(", "))}</dd></div>` : "";
  const behind = topicBacklog(agents);
  $("pipeline").innerHTML = shown.length || profile || behind ? shown.map(([k, label]) =>
    `<div data-figure="${k}"><dt>${label}</dt><dd>${k.startsWith("novelty") ? Number(p[k]).toFixed(3) : num(p[k])}</dd></div>`).join("") + profile + behind
    : '<p class="none">no pipeline agent reporting yet</p>';
}

// Whether the topic model keeps up with the store (its gauges documents, backlog, backlog_oldest_s, scored_per_min):
// "scored N of M (backlog B, oldest Xs)", M being what it scored plus what waits; its speed beside it.
function topicBacklog(agents) {
  const g = (agents || []).filter((a) => a.kind === "topic_model" && a.gauges && a.gauges.backlog !== undefined).map((a) => a.gauges);
  if (!g.length) return "";
  const sum = (k) => g.reduce((t, x) => t + (x[k] || 0), 0);
  const scored = sum("documents"), backlog = sum("backlog");
  const oldest = Math.max(...g.map((x) => x.backlog_oldest_s || 0));
  const rates = g.filter((x) => x.scored_per_min !== undefined);
  const text = `scored ${num(scored)} of ${num(scored + backlog)} (backlog ${num(backlog)}${backlog > 0 ? ", oldest " + dur(oldest) : ""})`;
  const rate = rates.length ? ` <small data-rate>${num(sum("scored_per_min"))}/min</small>` : "";
  return `<div data-figure="topic-backlog" data-backlog="${backlog}" class="row"><dt>topic model</dt><dd>${esc(text)}${rate}</dd></div>`;
}

function line(points, w, h, xmin, xmax, ymax, cls) {
  if (points.length < 2) return "";
  const d = points.map(([t, v], i) => `${i ? "L" : "M"}${(((t - xmin) / (xmax - xmin || 1)) * w).toFixed(1)},${(h - (v / (ymax || 1)) * (h - 12) - 2).toFixed(1)}`).join(" ");
  return `<path class="${cls}" d="${d}" fill="none" stroke="currentColor" stroke-width="1.5"/>`;
}

function drawCharts() {
  const w = 400, h = 120;
  const pts = history.slice(-720);
  for (const id of ["chart-pages", "chart-novelty"]) $(id).setAttribute("viewBox", `0 0 ${w} ${h}`);
  if (pts.length < 2) {
    const msg = `<text class="axis" x="8" y="20">collecting (a point every few seconds)…</text>`;
    $("chart-pages").innerHTML = msg; $("chart-novelty").innerHTML = msg; return;
  }
  const x0 = pts[0].t, x1 = pts[pts.length - 1].t;
  const keys = ["fetched", "extracted", "scored", "duplicates"];
  const ymax = Math.max(1, ...pts.flatMap((p) => keys.map((k) => p[k] || 0)));
  let out = keys.map((k) => `<g class="${k}">${line(pts.filter((p) => p[k] !== undefined).map((p) => [p.t, p[k]]), w, h, x0, x1, ymax, k)}</g>`).join("");
  out += `<text class="axis" x="4" y="10">${num(ymax)}</text><text class="axis" x="${w - 4}" y="${h - 3}" text-anchor="end">${dur(x1 - x0)}</text>`;
  $("chart-pages").innerHTML = out;
  const nov = pts.filter((p) => p.novelty_p50 !== undefined);
  let nout = "";
  if (nov.length >= 2) {
    const X = (t) => (((t - x0) / (x1 - x0 || 1)) * w).toFixed(1), Y = (v) => (h - v * (h - 12) - 2).toFixed(1);
    const band = nov.map((p) => `${X(p.t)},${Y(p.novelty_p90)}`).concat(nov.slice().reverse().map((p) => `${X(p.t)},${Y(p.novelty_p10)}`));
    nout += `<polygon points="${band.join(" ")}" fill="#d2a8ff" fill-opacity="0.25"/>`;
    nout += `<g class="scored">${line(nov.map((p) => [p.t, p.novelty_p50]), w, h, x0, x1, 1, "p50")}</g>`;
    nout += `<text class="axis" x="4" y="10">1.0</text>`;
  } else nout = `<text class="axis" x="8" y="20">no scored documents yet</text>`;
  $("chart-novelty").innerHTML = nout;
}

function setLive(on) {
  const el = $("live");
  el.className = "live " + (on ? "on" : "off");
  el.textContent = on ? "live" : "reconnecting";
}

async function start() {
  try {
    const [st, hi] = await Promise.all([fetch("/api/state").then((r) => r.json()), fetch("/api/history").then((r) => r.json())]);
    history = hi;
    if (st.agents) render(st);
    drawCharts();
  } catch (e) { setLive(false); }
  const es = new EventSource("/events");
  es.onopen = () => setLive(true);
  es.onerror = () => setLive(false);
  es.addEventListener("state", (ev) => { setLive(true); render(JSON.parse(ev.data)); });
  es.addEventListener("history", (ev) => { history.push(JSON.parse(ev.data)); if (history.length > 2000) history.shift(); drawCharts(); });
}

start();
