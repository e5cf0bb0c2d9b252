// The quicmesh dashboard: reads the gateway's admin API (the same listener that served this
// page) and draws what it says. No build step, no dependencies.
"use strict";

const REFRESH_MS = 2000;
const TAP_ROWS = 200;
const SVG = "http://www.w3.org/2000/svg";

let selected = null;
let lastGraph = null;
let tapReader = null;

function token() {
  return sessionStorage.getItem("quicmeshToken");
}

// GET from the admin API, asking for the bearer token once if it wants one.
async function call(path, init = {}) {
  const headers = Object.assign({}, init.headers || {});
  if (token()) headers["Authorization"] = "Bearer " + token();
  const resp = await fetch(path, Object.assign({}, init, { headers }));
  if (resp.status === 401) {
    const given = window.prompt("This admin API wants its bearer token (gateway.admin_token_file):");
    if (given) {
      sessionStorage.setItem("quicmeshToken", given.trim());
      return call(path, init);
    }
  }
  if (!resp.ok) throw new Error(path + " answered " + resp.status);
  return resp;
}

function el(tag, attrs = {}, text) {
  const e = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function pct(v) { return (v * 100).toFixed(v === 1 ? 0 : 1) + "%"; }
function ms(v) { return v === null || v === undefined ? "-" : v.toFixed(2) + " ms"; }
function successClass(e) {
  if (!e.rps) return "idle";
  return e.success >= 0.99 ? "ok" : e.success >= 0.95 ? "warn" : "bad";
}
const EDGE_COLOUR = { idle: "#9aa3b2", ok: "#2da44e", warn: "#d4a72c", bad: "#cf222e" };

function drawGraph(g) {
  const svg = document.getElementById("graph-svg");
  svg.replaceChildren();
  const defs = el("svg:defs");
  for (const [name, colour] of Object.entries(EDGE_COLOUR)) {
    const marker = el("svg:marker", { id: "arrow-" + name, viewBox: "0 0 10 10", refX: "10", refY: "5",
      markerWidth: "8", markerHeight: "8", orient: "auto-start-reverse" });
    marker.appendChild(el("svg:path", { d: "M 0 0 L 10 5 L 0 10 z", fill: colour }));
    defs.appendChild(marker);
  }
  svg.appendChild(defs);
  const services = g.services;
  const pos = {};
  const [cx, cy, r] = [400, 280, services.length > 1 ? 210 : 0];
  services.forEach((s, i) => {
    const a = (2 * Math.PI * i) / services.length - Math.PI / 2;
    pos[s.name] = [cx + r * Math.cos(a), cy + r * Math.sin(a)];
  });
  const R = 38;
  for (const e of g.edges) {
    const [a, b] = [pos[e.source], pos[e.target]];
    if (!a || !b || e.source === e.target) continue;
    const [dx, dy] = [b[0] - a[0], b[1] - a[1]];
    const len = Math.hypot(dx, dy) || 1;
    const [ux, uy] = [dx / len, dy / len];
    const cls = successClass(e);
    const group = el("svg:g", { class: "edge " + cls, "data-source": e.source, "data-target": e.target, "data-rps": e.rps });
    group.appendChild(el("svg:line", { x1: a[0] + ux * R, y1: a[1] + uy * R, x2: b[0] - ux * R, y2: b[1] - uy * R,
      stroke: EDGE_COLOUR[cls], "marker-end": "url(#arrow-" + cls + ")" }));
    const label = e.rps ? `${e.rps.toFixed(1)} rps · ${pct(e.success)} · p99 ${ms(e.p99_ms)}` : "idle";
    group.appendChild(el("svg:text", { x: (a[0] + b[0]) / 2 + uy * 10, y: (a[1] + b[1]) / 2 - ux * 10, "text-anchor": "middle" }, label));
    svg.appendChild(group);
  }
  for (const s of services) {
    const [x, y] = pos[s.name];
    const group = el("svg:g", { class: "service", "data-service": s.name, "data-health": s.health });
    group.appendChild(el("svg:circle", { cx: x, cy: y, r: R, class: s.health }));
    group.appendChild(el("svg:text", { x, y: y + 4 }, s.name));
    group.addEventListener("click", () => { selected = s.name; drawDetail(lastGraph); });
    svg.appendChild(group);
  }
  const body = document.querySelector("#edges tbody");
  body.replaceChildren(...g.edges.map((e) => {
    const tr = el("tr", { "data-source": e.source, "data-target": e.target });
    for (const v of [e.source, e.target, e.rps.toFixed(1), pct(e.success), ms(e.p50_ms), ms(e.p99_ms)]) tr.appendChild(el("td", {}, v));
    tr.children[3].className = successClass(e);
    return tr;
  }));
}

function list(title, items, render) {
  const frag = document.createDocumentFragment();
  frag.appendChild(el("h3", {}, title));
  if (!items.length) { frag.appendChild(el("p", { class: "hint" }, "none")); return frag; }
  const ul = el("ul");
  for (const i of items) ul.appendChild(el("li", {}, render(i)));
  frag.appendChild(ul);
  return frag;
}

function drawDetail(g) {
  const box = document.getElementById("detail");
  const s = g && g.services.find((x) => x.name === selected);
  if (!s) return;
  box.replaceChildren(el("h2", { "data-detail": s.name }, s.name + " (" + s.health + ")"));
  box.appendChild(list("Endpoints", s.endpoints, (e) => {
    const labels = Object.entries(e.labels || {}).map(([k, v]) => k + "=" + v).join(",");
    const state = e.revoked ? "revoked" : e.ejected ? "ejected" : e.healthy === false ? "unhealthy" : "healthy";
    return `${e.node} ${e.address} ${labels} — ${state}, ${e.in_flight} in flight`;
  }));
  box.appendChild(list("Routes", s.routes, (r) => `${r.name} (${r.at}, ${r.rules} rules${r.hostnames && r.hostnames.length ? ", " + r.hostnames.join(" ") : ""})`));
  box.appendChild(list("Authorization policies", s.policies, (p) => `${p.mode || "enforce"}: ${JSON.stringify(p.rules)}`));
  box.appendChild(list("Errors in the last minute", s.errors, (e) => `${e.reason}: ${e.count}`));
}

function expiry(secs) {
  if (!secs) return "-";
  const days = (secs * 1000 - Date.now()) / 86400000;
  return new Date(secs * 1000).toISOString().replace(".000", "") + ` (${days.toFixed(1)} d)`;
}

function drawNodes(g) {
  const body = document.querySelector("#node-table tbody");
  body.replaceChildren(...g.nodes.map((n) => {
    const tr = el("tr", { "data-node": n.name });
    const peers = (n.peers || []).map((p) => `${p.peer} (${p.direction}): ${p.rtt_ms} ms, ${p.cwnd} B, ${pct(p.loss)} lost`).join("\n");
    const snap = n.gateway ? "version " + n.acked_version : n.current ? "current" : n.acked_version ? "behind" : "none";
    const cells = [n.gateway ? n.name + " (edge)" : n.name, n.connected ? "yes" : "no", n.address || "-",
      n.gateway ? "-" : `${n.instances} (${n.unhealthy} unhealthy)`, snap, expiry(n.cert_expires),
      n.scraped ? peers || "-" : "admin API not reachable"];
    for (const c of cells) tr.appendChild(el("td", {}, c));
    tr.children[1].className = n.connected ? "ok" : "bad";
    tr.children[6].className = "peers";
    return tr;
  }));
}

async function refresh() {
  const status = document.getElementById("status");
  try {
    const g = await (await call("/dashboard/graph")).json();
    lastGraph = g;
    drawGraph(g);
    drawNodes(g);
    drawDetail(g);
    status.textContent = `snapshot ${g.version} · rates over ${g.window_s} s · ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    status.textContent = "cannot read the gateway: " + err.message;
  }
}

function tapRow(e) {
  const tr = el("tr", { "data-path": e.path, "data-status": e.status });
  const cells = [e.time.slice(11, 23), e.proxy, e.direction, e.method, e.authority, e.path,
    e.error ? `${e.status} ${e.error}` : String(e.status), e.duration_ms.toFixed(2) + " ms",
    e.src_service, e.dst_service, e.route, String(e.retries)];
  for (const c of cells) tr.appendChild(el("td", {}, c));
  tr.children[6].className = e.status >= 500 || e.error ? "bad" : e.status >= 400 ? "warn" : "ok";
  return tr;
}

async function startTap() {
  stopTap();
  const form = document.getElementById("tap-form");
  const params = new URLSearchParams();
  for (const name of ["service", "from", "route", "status"]) {
    const v = form.elements[name].value.trim();
    if (v) params.set(name, v);
  }
  const state = document.getElementById("tap-state");
  document.getElementById("tap-stop").disabled = false;
  try {
    const resp = await call("/tap?" + params.toString());
    const reader = resp.body.getReader();
    tapReader = reader;
    state.textContent = "watching";
    const decoder = new TextDecoder();
    const body = document.querySelector("#tap-table tbody");
    let buf = "";
    let kind = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        if (line.startsWith("event:")) kind = line.slice(6).trim();
        else if (line === "") kind = "";
        else if (line.startsWith("data:")) {
          const data = JSON.parse(line.slice(5));
          if (kind === "missed") state.textContent = `watching (${data.missed} left out by the rate limit)`;
          else {
            body.prepend(tapRow(data));
            while (body.children.length > TAP_ROWS) body.lastChild.remove();
          }
        }
      }
    }
    state.textContent = "stream ended";
  } catch (err) {
    if (tapReader) state.textContent = "tap failed: " + err.message;
  }
}

function stopTap() {
  if (tapReader) { const r = tapReader; tapReader = null; r.cancel(); }
  document.getElementById("tap-stop").disabled = true;
  document.getElementById("tap-state").textContent = "stopped";
}

function show(tab) {
  for (const b of document.querySelectorAll("nav button")) b.classList.toggle("active", b.dataset.tab === tab);
  for (const s of document.querySelectorAll(".tab")) s.classList.toggle("active", s.id === tab);
  if (tab === "tap" && !tapReader) startTap();
}

document.addEventListener("DOMContentLoaded", () => {
  for (const b of document.querySelectorAll("nav button")) b.addEventListener("click", () => { location.hash = b.dataset.tab; });
  window.addEventListener("hashchange", () => show(location.hash.slice(1) || "graph"));
  document.getElementById("tap-form").addEventListener("submit", (ev) => { ev.preventDefault(); startTap(); });
  document.getElementById("tap-stop").addEventListener("click", stopTap);
  show(location.hash.slice(1) || "graph");
  refresh();
  setInterval(refresh, REFRESH_MS);
});
