"""The master's status page: one static HTML document that renders ``status.json`` (``docs/protocol.md`` §8).

No external assets: the styles and the script are inline, so the page works on a
machine without internet access and the endpoint's Content-Security-Policy can
forbid every other origin. The script fetches ``status.json`` (relative, so the page
also works behind a path prefix) every second and rebuilds the tables with
``textContent`` only: kick reasons carry peer-supplied text, which must never be
parsed as HTML.

Hooks for tests and scripts: ``<body data-updates=N>`` counts successful refreshes,
``data-error`` holds the last failure (empty when the last refresh worked), and every
peer row carries ``data-peer`` and ``data-state``.
"""

from __future__ import annotations

REFRESH_MS = 1000

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>pccl master status</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; margin: 0 0 .3em; }
h2 { font-size: 1.05em; margin: 1.4em 0 .4em; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: .2em .6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.none { color: #888; font-style: italic; }
#banner { padding: .3em .6em; margin: .5em 0; }
#banner.ok { background: #e8f5e9; }
#banner.error { background: #fde0dc; }
tr[data-state="pending"] td { color: #8a6d00; }
tr[data-state="joining"] td { color: #00578a; }
</style>
</head>
<body data-updates="0" data-error="">
<h1>pccl master <span id="master"></span></h1>
<div id="banner">loading&hellip;</div>
<div id="summary"></div>
<h2>Peers</h2>
<table id="peers"><thead><tr><th>id</th><th>address</th><th>group</th><th>state</th>
<th>last heartbeat</th><th>waiting in</th><th>collective tags in flight</th></tr></thead><tbody></tbody></table>
<h2>Groups and rings</h2>
<table id="groups"><thead><tr><th>group</th><th>ring</th><th>epoch</th><th>links</th>
<th>shared-state revision</th><th>holders</th><th>sync</th></tr></thead><tbody></tbody></table>
<h2>Membership round</h2>
<div id="round"></div>
<h2>Collectives in flight</h2>
<table id="collectives"><thead><tr><th>group</th><th>tag</th><th>kind</th><th>op</th><th>state</th>
<th>participants</th><th>waiting for</th></tr></thead><tbody></tbody></table>
<h2>Bandwidth (row sends to column)</h2>
<table id="bandwidth"><thead></thead><tbody></tbody></table>
<h2>Recent kicks</h2>
<table id="kicks"><thead><tr><th>peer</th><th>group</th><th>when</th><th>error</th><th>reason</th></tr></thead>
<tbody></tbody></table>
<h2>Recent departures</h2>
<table id="departures"><thead><tr><th>peer</th><th>group</th><th>when</th><th>reason</th></tr></thead>
<tbody></tbody></table>
<script>
"use strict";
const REFRESH_MS = %(refresh_ms)d;
const ids = (xs) => (xs && xs.length ? xs.join(" ") : "-");
const ago = (s) => s.toFixed(1) + " s ago";

function rate(v) {
  if (v === null || v === undefined) return "-";
  if (v <= 0) return "failed";
  for (const [unit, scale] of [["GB/s", 1e9], ["MB/s", 1e6], ["kB/s", 1e3]]) {
    if (v >= scale) return (v / scale).toPrecision(3) + " " + unit;
  }
  return v.toPrecision(3) + " B/s";
}

function fill(id, rows, attrs) {
  const body = document.querySelector("#" + id + " tbody");
  const cols = document.querySelectorAll("#" + id + " thead th").length || 1;
  const out = [];
  rows.forEach((cells, i) => {
    const tr = document.createElement("tr");
    const extra = attrs ? attrs[i] : {};
    for (const k in extra) tr.dataset[k] = extra[k];
    for (const c of cells) {
      const td = document.createElement("td");
      td.textContent = String(c === null || c === undefined ? "-" : c);
      if (typeof c === "number") td.className = "num";
      tr.appendChild(td);
    }
    out.push(tr);
  });
  if (!out.length) {
    const tr = document.createElement("tr");
    const td = document.createElement("td");
    td.colSpan = cols;
    td.className = "none";
    td.textContent = "none";
    tr.appendChild(td);
    out.push(tr);
  }
  body.replaceChildren(...out);
}

function bandwidth(bw) {
  const head = document.querySelector("#bandwidth thead");
  const hr = document.createElement("tr");
  for (const h of ["from \\\\ to"].concat(bw.peers)) {
    const th = document.createElement("th");
    th.textContent = String(h);
    hr.appendChild(th);
  }
  head.replaceChildren(hr);
  fill("bandwidth", bw.peers.map((src, i) =>
    [src].concat(bw.bytes_per_s[i].map((v, j) => (bw.peers[j] === src ? "." : rate(v))))));
}

function render(s) {
  document.getElementById("master").textContent = s.master || "";
  const w = s.world;
  const pending = s.peers.filter((p) => p.state === "pending").length;
  document.getElementById("summary").textContent =
    w.global_world_size + " accepted peers in " + w.num_peer_groups + " groups, " + pending +
    " pending; heartbeat timeout " + s.heartbeat_timeout + " s";
  fill("peers", s.peers.map((p) => [p.id, p.address, p.group, p.state, ago(p.heartbeat_age),
    p.waiting_in || "-", ids(p.in_flight)]),
    s.peers.map((p) => ({peer: p.id, state: p.state})));
  fill("groups", s.groups.map((g) => [g.id, g.ring.join(" \\u2192 ") || "-", g.epoch,
    g.links_ready ? "ready" : "linking", g.revision === null ? "-" : g.revision, ids(g.revision_holders),
    g.sync ? "#" + g.sync.sync_id + " " + g.sync.phase + ", waiting for " + ids(g.sync.waiting_for) : "-"]),
    s.groups.map((g) => ({group: g.id})));
  const r = s.round;
  document.getElementById("round").textContent = r === null ? "none" :
    r.kind + " (" + r.phase + "): voters " + ids(r.voters) + ", joiners " + ids(r.joiners) +
    ", waiting for " + ids(r.waiting_for);
  fill("collectives", s.collectives.map((c) => [c.group, c.tag, c.kind || "-", c.op_id || "-", c.state,
    ids(c.participants), ids(c.waiting_for)]));
  bandwidth(s.bandwidth);
  fill("kicks", s.recent_kicks.map((k) => [k.peer, k.group, ago(k.age), k.error, k.reason]),
    s.recent_kicks.map((k) => ({peer: k.peer})));
  fill("departures", s.recent_departures.map((d) => [d.peer, d.group, ago(d.age), d.reason]),
    s.recent_departures.map((d) => ({peer: d.peer})));
}

function banner(ok, text) {
  const b = document.getElementById("banner");
  b.className = ok ? "ok" : "error";
  b.textContent = text;
  document.body.dataset.error = ok ? "" : text;
}

async function refresh() {
  try {
    const resp = await fetch("status.json", {cache: "no-store"});
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    render(await resp.json());
    document.body.dataset.updates = String(Number(document.body.dataset.updates) + 1);
    banner(true, "live, updated " + new Date().toLocaleTimeString());
  } catch (err) {
    banner(false, "master unreachable (" + err.message + "), retrying");
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}
refresh();
</script>
</body>
</html>
""" % {"refresh_ms": REFRESH_MS}
