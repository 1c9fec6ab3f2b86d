// edgekit dashboard: the bench view (docs/bench.md), over /api/fleets/{fleet}/bench.
"use strict";
(() => {
  const fleet = decodeURIComponent(location.pathname.split("/")[2] || "");
  const ms = (v) => (v === null || v === undefined ? "-" : `${v.toFixed(2)} ms`);

  function cell(row, text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    row.appendChild(td);
  }

  function answers(c) {
    if (c.correct === null) return c.failed.length ? ["failed", "bad"] : ["not checked", ""];
    const counted = `${c.health_check_agreed}/${c.health_check_samples}`;
    return c.correct ? [`yes (${counted})`, ""] : [`NO (${counted})`, "bad"];
  }

  function render(doc) {
    document.getElementById("title").textContent = `Benchmark of fleet ${fleet}`;
    document.getElementById("back").href = `/fleets/${encodeURIComponent(fleet)}`;
    const section = document.getElementById("bench");
    const notes = document.getElementById("bench-notes");
    section.replaceChildren();
    notes.replaceChildren();
    if (!doc.classes.length) {
      const p = document.createElement("p");
      p.textContent = `No device of fleet ${fleet} has reported a benchmark yet. Start one with ` +
        `edgekit bench MODEL ... --fleet ${fleet}`;
      section.appendChild(p);
      return;
    }
    const note = (text, bad) => {
      const li = document.createElement("li");
      li.textContent = text;
      if (bad) li.className = "bad";
      notes.appendChild(li);
    };
    for (const group of doc.classes) {
      const h = document.createElement("h2");
      h.textContent = `benchmark ${doc.bench_seq}: ${group.board_class} (${group.devices.join(", ")})`;
      section.appendChild(h);
      const table = document.createElement("table");
      table.dataset.boardClass = group.board_class;
      const head = table.createTHead().insertRow();
      for (const name of ["model", "devices", "answers match workstation", "load", "p50", "p95", "p99",
        "runs/s by threads", "peak memory (candidate added)", "hottest"]) {
        const th = document.createElement("th");
        th.textContent = name;
        head.appendChild(th);
      }
      const body = table.createTBody();
      for (const c of group.candidates) {
        const row = body.insertRow();
        row.dataset.candidate = c.candidate;
        const first = c.threads[0] || {};
        const [said, style] = answers(c);
        if (style) row.className = "is-affected";
        cell(row, c.candidate);
        cell(row, String(c.devices.length));
        cell(row, said, style);
        cell(row, ms(c.load_ms));
        cell(row, ms(first.p50_ms));
        cell(row, ms(first.p95_ms));
        cell(row, ms(first.p99_ms));
        cell(row, c.threads.map((t) => `${t.threads}t: ${Math.round(t.per_second)}/s`).join("  ") || "-");
        cell(row, c.peak_rss_mb === null ? "-" : `${Math.round(c.peak_rss_mb)} MiB` +
          (c.added_rss_mb === null ? "" : ` (+${c.added_rss_mb.toFixed(1)} MiB)`));
        cell(row, c.temperature_c === null ? "not reported" : `${Math.round(c.temperature_c)} °C`);
        if (c.correct === false) {
          note(`${c.candidate} gave other answers than on the workstation on ${c.disagreeing_devices.join(", ")} ` +
            `(${group.board_class}): do not roll it out to these boards; try another quantization mode or runtime there`, true);
        }
        for (const f of c.failed) note(`${f.device}: ${f.error}`, true);
        if (c.throttled_devices.length) {
          note(`${c.throttled_devices.join(", ")} reported CPU throttling while measuring ${c.candidate}: ` +
            "its figures there are pessimistic (check cooling and power)", false);
        }
      }
      section.appendChild(table);
    }
  }

  async function refresh() {
    const response = await fetch(`/api/fleets/${encodeURIComponent(fleet)}/bench`, { credentials: "same-origin" });
    if (!response.ok) throw new Error(`${response.status}`);
    render(await response.json());
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  }

  const run = () => refresh().catch((error) => {
    document.getElementById("updated").textContent = `update failed: ${error.message}`;
  });
  run();
  setInterval(run, 5000);
})();
