// edgekit dashboard: plain JavaScript over the JSON API, refreshed every few seconds.
"use strict";
const edgekit = (() => {
  const REFRESH_MS = 5000;

  async function get(path) {
    const response = await fetch(path, { credentials: "same-origin" });
    if (!response.ok) throw new Error(`${path}: ${response.status}`);
    return response.json();
  }

  function cell(row, text, className) {
    const td = document.createElement("td");
    if (text instanceof Node) td.appendChild(text); else td.textContent = text ?? "–";
    if (className) td.className = className;
    row.appendChild(td);
    return td;
  }

  // The drift severity's badge class: "model affected" alarms, "inputs changed" is shown
  // quietly; a device whose agent predates severities falls back to its drifted flag.
  function driftClass(d) {
    if (d.drift_severity === "model affected") return "affected";
    if (d.drift_severity === "inputs changed" || (d.drift_severity == null && d.drifted)) return "drifted";
    return null;
  }

  function badge(text, className) {
    const span = document.createElement("span");
    span.className = `badge ${className}`;
    span.textContent = text;
    return span;
  }

  function ago(iso) {
    if (!iso) return "never";
    const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
    if (seconds < 90) return `${Math.round(seconds)} s ago`;
    if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
    return `${Math.round(seconds / 3600)} h ago`;
  }

  function stamp() {
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  }

  function fillEvents(events, withDevice) {
    const body = document.querySelector("#events tbody");
    body.replaceChildren();
    for (const e of events) {
      const row = document.createElement("tr");
      cell(row, e.at);
      if (withDevice) cell(row, e.device);
      cell(row, e.kind);
      cell(row, e.message);
      body.appendChild(row);
    }
  }

  async function refreshOverview() {
    const [fleets, devices, events] = await Promise.all([get("/api/fleets"), get("/api/devices"),
      get("/api/events?limit=20")]);
    const cards = document.getElementById("fleets");
    cards.replaceChildren();
    for (const f of fleets) {
      const card = document.createElement("div");
      card.className = "fleet-card";
      const versions = Object.entries(f.versions).map(([v, n]) => `${v} ×${n}`).join(", ") || "no version yet";
      card.innerHTML = "<strong></strong><div></div><div class='muted'></div>";
      card.children[0].textContent = f.fleet;
      card.children[1].textContent = `${f.devices} devices · ${f.online} online · ${f.offline} offline · ` +
        `${f.model_affected} model affected · ${f.inputs_changed} inputs changed`;
      card.children[2].textContent = versions;
      cards.appendChild(card);
    }
    const body = document.querySelector("#devices tbody");
    body.replaceChildren();
    for (const d of devices) {
      const row = document.createElement("tr");
      row.dataset.device = d.device;
      if (!d.online) row.classList.add("is-offline");
      if (driftClass(d) === "affected") row.classList.add("is-affected");
      else if (driftClass(d)) row.classList.add("is-drifted");
      const link = document.createElement("a");
      link.href = `/devices/${encodeURIComponent(d.device)}`;
      link.textContent = d.device;
      cell(row, link);
      cell(row, d.fleet);
      cell(row, badge(d.online ? d.status : "offline", d.online ? "online" : "offline"));
      cell(row, d.version);
      cell(row, ago(d.last_seen));
      cell(row, d.latency_p95_ms == null ? null : `${d.latency_p95_ms.toFixed(1)} ms`);
      cell(row, driftClass(d) ? badge(d.drift_text, driftClass(d)) : d.drift_text);
      body.appendChild(row);
    }
    fillEvents(events, true);
    stamp();
  }

  function chart(element, title, series, data) {
    element.replaceChildren();
    const opts = {
      title, width: Math.max(320, element.clientWidth - 16), height: 220,
      series: [{}, ...series.map((label, i) => ({ label, stroke: ["#2f6fde", "#d9822b", "#b0413e"][i] }))],
      axes: [{}, {}],
    };
    return new uPlot(opts, data, element);
  }

  async function refreshDevice(id) {
    const [d, rows] = await Promise.all([get(`/api/devices/${encodeURIComponent(id)}`),
      get(`/api/devices/${encodeURIComponent(id)}/telemetry?hours=24`)]);
    document.getElementById("title").textContent = `${d.device} (${d.fleet})`;
    const summary = document.getElementById("summary");
    summary.replaceChildren(badge(d.online ? d.status : "offline", d.online ? "online" : "offline"));
    if (driftClass(d)) summary.appendChild(badge(d.drift_text, driftClass(d)));
    summary.appendChild(document.createTextNode(` version ${d.version ?? "–"} · last seen ${ago(d.last_seen)}`));
    const t = rows.map((r) => Date.parse(r.window_end) / 1000);
    chart(document.getElementById("latency-chart"), "latency", ["p50", "p95", "p99"],
      [t, rows.map((r) => r.latency_p50_ms), rows.map((r) => r.latency_p95_ms), rows.map((r) => r.latency_p99_ms)]);
    chart(document.getElementById("drift-chart"), "drift", ["drift score"], [t, rows.map((r) => r.drift_score)]);
    chart(document.getElementById("accuracy-chart"), "estimated accuracy", ["estimate", "low", "high"],
      [t, ...["estimate", "low", "high"].map((k) => rows.map((r) => (r.accuracy ? r.accuracy[k] : null)))]);
    fillEvents(d.events, false);
    stamp();
  }

  function every(fn) {
    const run = () => fn().catch((error) => {
      document.getElementById("updated").textContent = `update failed: ${error.message}`;
    });
    run();
    setInterval(run, REFRESH_MS);
  }

  return {
    overview: () => every(refreshOverview),
    devicePage: (id) => every(() => refreshDevice(id)),
  };
})();
