// edgekit dashboard: plain JavaScript over the JSON API, refreshed every few seconds.
"use strict";
const edgekit = (() => {
  const REFRESH_MS = 5000;
  const PALETTE = ["#2f6fde", "#d9822b", "#b0413e", "#2e8b57", "#7b4fb8", "#8a6d3b"];

  let session = { user: null, role: null, csrf: null, accounts: false };

  async function get(path) {
    const response = await fetch(path, { credentials: "same-origin" });
    if (!response.ok) throw new Error(`${path}: ${response.status}`);
    return response.json();
  }

  // An action: a POST with the session's CSRF token; its JSON, or an Error saying why not.
  async function post(path, body) {
    const response = await fetch(path, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": session.csrf || "" },
      body: JSON.stringify(body || {}),
    });
    const doc = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(doc.error || `${path}: ${response.status}`);
    return doc;
  }

  async function whoAmI() {
    session = await get("/api/session");
    const who = document.getElementById("who");
    if (!who) return;
    who.replaceChildren();
    if (session.user) {
      who.append(`signed in as ${session.user} (${session.role}) `);
      if (session.csrf) {
        const out = document.createElement("button");
        out.id = "sign-out";
        out.textContent = "Sign out";
        out.onclick = async () => { await post("/api/logout"); location.href = "/login"; };
        who.appendChild(out);
      }
    } else if (session.accounts) {
      const link = document.createElement("a");
      link.href = "/login";
      link.textContent = "Sign in";
      who.appendChild(link);
    }
  }

  function fillAudit(entries) {
    const body = document.querySelector("#audit tbody");
    if (!body) return;
    body.replaceChildren();
    for (const e of entries) {
      const row = document.createElement("tr");
      cell(row, e.at);
      cell(row, e.actor);
      cell(row, e.action);
      cell(row, e.fleet);
      cell(row, e.target);
      cell(row, e.detail ? `${e.result}: ${e.detail}` : e.result);
      body.appendChild(row);
    }
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

  function fillAlerts(alerts) {
    const body = document.querySelector("#alerts tbody");
    body.replaceChildren();
    for (const a of alerts) {
      const row = document.createElement("tr");
      row.dataset.alert = a.id;
      row.classList.add(`rule-${a.rule}`);
      cell(row, `${when(a.since)} (${ago(a.since)})`);
      if (a.device) {
        const link = document.createElement("a");
        link.href = `/devices/${encodeURIComponent(a.device)}`;
        link.textContent = a.summary;
        cell(row, link);
      } else {
        cell(row, a.summary);
      }
      cell(row, a.acked_at ? `by ${a.acked_by} ${ago(a.acked_at)}` : "not yet");
      const actions = cell(row, "");
      if (session.role === "operator" && !a.acked_at) {
        const button = document.createElement("button");
        button.className = "ack";
        button.textContent = "Acknowledge";
        button.onclick = async () => {
          const sure = confirm(`Acknowledge alert ${a.id}: "${a.summary}"?\n\nIt is marked as seen by you ` +
            "in the dashboard and the audit log; it stays open until the problem clears.");
          if (!sure) return;
          try { await post(`/api/alerts/${a.id}/ack`); } catch (error) { alert(error.message); }
          refreshOverview();
        };
        actions.appendChild(button);
      }
      body.appendChild(row);
    }
    if (!alerts.length) {
      const row = document.createElement("tr");
      cell(row, "No open alerts: every device is fine.").colSpan = 4;
      body.appendChild(row);
    }
  }

  function when(iso) {
    return new Date(Date.parse(iso)).toLocaleString([], { dateStyle: "short", timeStyle: "short" });
  }

  async function refreshOverview() {
    await whoAmI();
    const [fleets, devices, events, alerts, audit] = await Promise.all([get("/api/fleets"), get("/api/devices"),
      get("/api/events?limit=20"), get("/api/alerts?open=1"), get("/api/audit?limit=20")]);
    fillAlerts(alerts);
    fillAudit(audit);
    const cards = document.getElementById("fleets");
    cards.replaceChildren();
    for (const f of fleets) {
      const card = document.createElement("div");
      card.className = "fleet-card";
      const versions = Object.entries(f.versions).map(([v, n]) => `${v} ×${n}`).join(", ") || "no version yet";
      card.innerHTML = "<strong></strong><div></div><div class='muted'></div>";
      const name = document.createElement("a");
      name.href = `/fleets/${encodeURIComponent(f.fleet)}`;
      name.textContent = f.fleet;
      card.children[0].appendChild(name);
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
      cell(row, driftWords(d));
      body.appendChild(row);
    }
    fillEvents(events, true);
    stamp();
  }

  // The drift state in words: what an owner can act on, not a bare score.
  function driftWords(d) {
    const kind = driftClass(d);
    if (kind) {
      const since = d.drifted_since ? ` since ${clock(d.drifted_since)}` : "";
      const why = kind === "affected"
        ? "inputs no longer look like the training data, and the predictions suffer"
        : "inputs no longer look like the training data";
      return badge(`${d.drift_text}${since}: ${why}`, kind);
    }
    if (d.drift_score == null && d.drift_severity == null) return "not measured yet";
    return "inputs look like the training data";
  }

  function clock(iso) {
    const at = new Date(Date.parse(iso));
    const sameDay = at.toDateString() === new Date().toDateString();
    return sameDay ? at.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
                   : at.toLocaleString([], { dateStyle: "short", timeStyle: "short" });
  }

  // The time axis covers the range asked for (and any data outside it), never what uPlot
  // guesses from one or two points (which spanned years).
  function chart(element, title, series, data, hours) {
    element.replaceChildren();
    const now = Date.now() / 1000;
    const times = data[0];
    const from = Math.min(now - hours * 3600, times.length ? times[0] : Infinity);
    const to = Math.max(now, times.length ? times[times.length - 1] : -Infinity);
    const opts = {
      title, width: Math.max(320, element.clientWidth - 16), height: 220,
      scales: { x: { time: true, range: () => [from, to] } },
      series: [{}, ...series.map((label, i) => (label === "threshold"
        ? { label, stroke: "#b0413e", dash: [6, 4], width: 1 }
        : { label, stroke: PALETTE[i % PALETTE.length] }))],
      axes: [{}, {}],
    };
    opts.hooks = { setScale: [(u, key) => {  // what the chart really spans (the tests read it)
      if (key !== "x") return;
      element.dataset.from = String(Math.round(u.scales.x.min));
      element.dataset.to = String(Math.round(u.scales.x.max));
    }] };
    return new uPlot(opts, data, element);
  }

  async function refreshFleet(fleet) {
    await whoAmI();
    const hours = range();
    const history = await get(`/api/fleets/${encodeURIComponent(fleet)}/history?hours=${hours}`);
    document.getElementById("title").textContent = `fleet ${fleet}`;
    const versions = [...new Set(history.points.flatMap((p) => Object.keys(p.versions)))].sort();
    const t = history.points.map((p) => p.t);
    const element = document.getElementById("history-chart");
    chart(element, "devices", ["reporting", ...versions.map((v) => `version ${v}`)],
      [t, history.points.map((p) => p.reporting), ...versions.map((v) => history.points.map((p) => p.versions[v] ?? 0))],
      hours);
    element.dataset.versions = versions.join(",");
    const actions = document.getElementById("fleet-actions");
    actions.replaceChildren();
    if (session.role === "operator" && history.previous) {
      const button = document.createElement("button");
      button.className = "rollback";
      button.textContent = `Roll the fleet back to ${history.previous}`;
      button.onclick = async () => {
        const sure = confirm(`Send every device of fleet ${fleet} back to ${history.previous}?\n\n` +
          "Each one installs it as it would an update; a rollout in progress is replaced.");
        if (!sure) return;
        try {
          const done = await post(`/api/fleets/${encodeURIComponent(fleet)}/rollback`);
          actions.append(` Fleet ${fleet} told to go back to ${done.bundle}.`);
        } catch (error) { alert(error.message); }
      };
      actions.appendChild(button);
    }
    if (session.role === "operator") await pushPanel(fleet);
    stamp();
  }

  // The operator pushes a catalog version to the fleet, with canaries first: what `edgekit push
  // NAME --version V --fleet F --canary N` does (the same code, on the service).
  async function pushPanel(fleet) {
    const panel = document.getElementById("push-panel");
    if (!panel || !panel.hidden) return;
    const select = document.getElementById("push-version");
    for (const entry of await get("/api/catalog")) {
      for (const version of entry.versions) {
        const option = document.createElement("option");
        option.value = JSON.stringify([entry.name, version]);
        option.textContent = `${entry.name}@${version}`;
        select.appendChild(option);
      }
    }
    if (!select.options.length) return;
    select.selectedIndex = select.options.length - 1;
    panel.hidden = false;
    document.getElementById("push-button").onclick = async () => {
      const [name, version] = JSON.parse(select.value);
      const canary = Math.max(0, Number(document.getElementById("push-canary").value) || 0);
      const how = canary > 0
        ? `${canary} device(s) get it first (the canaries). The rest of the fleet gets it only after ` +
          "they served it well for the soak time; if a canary fails, the rollout stops and the canaries " +
          "go back to what they ran."
        : "Every device of the fleet gets it now.";
      if (!confirm(`Push ${name}@${version} to fleet ${fleet}?\n\n${how}`)) return;
      const result = document.getElementById("push-result");
      try {
        await post(`/api/fleets/${encodeURIComponent(fleet)}/push`, { name, version, canary });
        location.href = "/rollouts";
      } catch (error) { result.textContent = ` ${error.message}`; }
    };
  }

  function range() {
    const select = document.getElementById("range");
    return select ? Number(select.value) : 24;
  }

  async function refreshDevice(id) {
    const hours = range();
    const [d, rows] = await Promise.all([get(`/api/devices/${encodeURIComponent(id)}`),
      get(`/api/devices/${encodeURIComponent(id)}/telemetry?hours=${hours}`)]);
    await whoAmI();
    document.getElementById("title").textContent = `${d.device} (${d.fleet})`;
    const actions = document.getElementById("device-actions");
    if (actions && session.role === "operator" && d.rollback_to && !actions.querySelector("button")) {
      const button = document.createElement("button");
      button.className = "rollback-device";
      button.textContent = `Roll ${d.device} back to ${d.rollback_to}`;
      button.onclick = async () => {
        const sure = confirm(`Send ${d.device} alone back to ${d.rollback_to}?\n\nThe other devices of fleet ` +
          `${d.fleet} keep what they run; ${d.device} stays on ${d.rollback_to} until the next push to the fleet.`);
        if (!sure) return;
        try {
          const done = await post(`/api/devices/${encodeURIComponent(d.device)}/rollback`);
          actions.append(` ${d.device} told to go back to ${done.bundle}.`);
        } catch (error) { alert(error.message); }
      };
      actions.appendChild(button);
    }
    const summary = document.getElementById("summary");
    summary.replaceChildren(badge(d.online ? d.status : "offline", d.online ? "online" : "offline"));
    summary.appendChild(document.createTextNode(" "));
    const drift = driftWords(d);
    summary.appendChild(drift instanceof Node ? drift : document.createTextNode(drift));
    summary.appendChild(document.createTextNode(` version ${d.version ?? "–"} · last seen ${ago(d.last_seen)}`));
    const t = rows.map((r) => Date.parse(r.window_end) / 1000);
    chart(document.getElementById("latency-chart"), "latency", ["p50", "p95", "p99"],
      [t, rows.map((r) => r.latency_p50_ms), rows.map((r) => r.latency_p95_ms), rows.map((r) => r.latency_p99_ms)], hours);
    // The threshold the device judges by (its worst feature's PSI limit): above it, drifted.
    const driftChart = document.getElementById("drift-chart");
    chart(driftChart, "drift", ["drift score", "threshold"],
      [t, rows.map((r) => r.drift_score), rows.map((r) => r.drift_threshold)], hours);
    const limits = rows.map((r) => r.drift_threshold).filter((v) => v != null);
    driftChart.dataset.threshold = limits.length ? String(limits[limits.length - 1]) : "";
    chart(document.getElementById("board-chart"), "board",
      ["CPU %", "memory MB", "temperature °C", "RAM in use %", "disk in use %"],
      [t, rows.map((r) => r.cpu_percent), rows.map((r) => r.memory_mb), rows.map((r) => r.temperature_c),
        rows.map((r) => r.memory_used_percent), rows.map((r) => r.disk_used_percent)], hours);
    chart(document.getElementById("accuracy-chart"), "estimated accuracy", ["estimate", "low", "high"],
      [t, ...["estimate", "low", "high"].map((k) => rows.map((r) => (r.accuracy ? r.accuracy[k] : null)))], hours);
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

  // One canary's measured value of one abort criterion, in words.
  function measured(key, d) {
    if (key === "error_rate") {
      return d.error_rate == null ? `${d.device}: no predictions yet`
        : `${d.device}: ${(d.error_rate * 100).toFixed(1)}% of ${d.predictions} predictions`;
    }
    if (key === "p95_ms") {
      const before = d.baseline_p95_ms == null ? "no figure before" : `${d.baseline_p95_ms.toFixed(1)} ms before`;
      return d.p95_ms == null ? `${d.device}: not measured yet (${before})`
        : `${d.device}: ${d.p95_ms.toFixed(1)} ms (${before})`;
    }
    if (key === "drifted") return `${d.device}: ${d.drifted ? "drifted" : "no drift"}`;
    return `${d.device}: ${d.serving ? "serving" : "not yet"}`;
  }

  async function refreshRollouts() {
    await whoAmI();
    const rollouts = await get("/api/rollouts");
    const root = document.getElementById("rollouts");
    root.replaceChildren();
    if (!rollouts.length) root.textContent = "No rollouts yet: `edgekit push --canary N` starts one.";
    for (const r of rollouts) {
      const section = document.createElement("section");
      section.className = `rollout phase-${r.phase}`;
      section.dataset.fleet = r.fleet;
      const title = document.createElement("h2");
      title.textContent = `${r.label} to fleet ${r.fleet}: ${r.phase_words} (since ${clock(r.phase_since)})`;
      section.appendChild(title);
      if (session.role === "operator" && !["done", "aborted"].includes(r.phase)) {
        const button = document.createElement("button");
        button.className = "abort";
        button.textContent = "Abort this rollout";
        button.onclick = async () => {
          const reached = r.phase === "fleet" ? "every device" : (r.devices.filter((d) => d.canary)
            .map((d) => d.device).join(", ") || "no device");
          const sure = confirm(`Stop the rollout of ${r.label} to fleet ${r.fleet}?\n\nThe devices it reached ` +
            `(${reached}) are sent back to the previous version; the others keep what they run.`);
          if (!sure) return;
          try { await post(`/api/rollouts/${encodeURIComponent(r.fleet)}/abort`); } catch (error) { alert(error.message); }
          refreshRollouts();
        };
        section.appendChild(button);
        const resume = document.createElement("button");
        resume.className = "resume";
        resume.textContent = "Resume now";
        resume.onclick = async () => {
          const sure = confirm(`Take the rollout of ${r.label} to fleet ${r.fleet} one step on now?\n\n` +
            "edgekit asks every device what it runs, then goes on as the abort criteria say (to the " +
            "rest of the fleet once the canaries served it well for the soak time; back if they failed). " +
            "The service does this by itself every few seconds: use it when the rollout seems stuck.");
          if (!sure) return;
          const note = document.getElementById("rollouts-note");
          try {
            const done = await post(`/api/rollouts/${encodeURIComponent(r.fleet)}/resume`);
            note.textContent = `The rollout of ${r.label} to fleet ${r.fleet} was taken on: now ${done.phase}.`;
          } catch (error) { note.textContent = error.message; }
          refreshRollouts();
        };
        section.appendChild(resume);
      }
      if (r.reason) {
        const why = document.createElement("p");
        why.className = "reason";
        why.textContent = r.reason;
        section.appendChild(why);
      }
      const canaries = r.devices.filter((d) => d.canary);
      const criteria = document.createElement("table");
      criteria.className = "criteria";
      criteria.innerHTML = "<thead><tr><th>abort when</th><th>limit</th><th>measured on the canaries</th></tr></thead>";
      const body = document.createElement("tbody");
      for (const c of r.criteria) {
        const row = document.createElement("tr");
        cell(row, c.criterion);
        cell(row, c.limit);
        cell(row, canaries.map((d) => measured(c.key, d)).join("; ") || "no canary");
        body.appendChild(row);
      }
      criteria.appendChild(body);
      section.appendChild(criteria);
      const devices = document.createElement("table");
      devices.className = "rollout-devices";
      devices.innerHTML = "<thead><tr><th>device</th><th>role</th><th>state</th></tr></thead>";
      const rows = document.createElement("tbody");
      for (const d of r.devices) {
        const row = document.createElement("tr");
        row.dataset.device = d.device;
        row.dataset.canary = String(d.canary);
        cell(row, d.device);
        cell(row, d.canary ? "canary" : "fleet");
        cell(row, d.state);
        rows.appendChild(row);
      }
      devices.appendChild(rows);
      section.appendChild(devices);
      root.appendChild(section);
    }
    stamp();
  }

  function loginPage() {
    document.getElementById("login").addEventListener("submit", async (event) => {
      event.preventDefault();
      const response = await fetch("/api/login", {
        method: "POST", credentials: "same-origin", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ name: document.getElementById("name").value,
          password: document.getElementById("password").value }),
      });
      if (response.ok) { location.href = "/"; return; }
      const doc = await response.json().catch(() => ({}));
      document.getElementById("login-error").textContent = doc.error || `sign-in failed (${response.status})`;
    });
  }

  return {
    // For the pages' own scripts (shadow.js): the same fetches, session and cells.
    lib: { get, post, whoAmI, every, stamp, cell, badge, clock, role: () => session.role },
    loginPage,
    overview: () => every(refreshOverview),
    rolloutsPage: () => every(refreshRollouts),
    fleetPage: (fleet) => {
      document.getElementById("range").addEventListener("change", () => refreshFleet(fleet));
      every(() => refreshFleet(fleet));
    },
    devicePage: (id) => {
      const select = document.getElementById("range");
      const wanted = new URLSearchParams(location.search).get("hours");
      if (select && wanted && [...select.options].some((o) => o.value === wanted)) select.value = wanted;
      if (select) select.addEventListener("change", () => refreshDevice(id));
      every(() => refreshDevice(id));
    },
  };
})();
