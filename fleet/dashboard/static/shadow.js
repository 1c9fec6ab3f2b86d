// The shadow view: each fleet's candidate per device and in total, in words (the sentences come
// from /api/shadow), with Promote and Stop for operators (the code of `edgekit shadow promote|stop`).
"use strict";
const edgekitShadow = (() => {
  const { get, post, whoAmI, every, stamp, cell, badge, role } = edgekit.lib;

  function percent(value) { return value == null ? "–" : `${(value * 100).toFixed(1)}%`; }
  // Three decimals below 1 ms: a tiny model's 0.004 ms is not 0.0 ms.
  function ms(value) { return value == null ? "–" : `${value.toFixed(value >= 1 ? 1 : 3)} ms`; }
  // "1.0 ms / 2.1 ms": half of the answers within the first, 95% within the second.
  function latency(p50, p95) { return `${ms(p50)} / ${ms(p95)}`; }

  function paragraphs(parent, lines, className) {
    for (const line of lines) {
      const p = document.createElement("p");
      if (className) p.className = className;
      p.textContent = line;
      parent.appendChild(p);
    }
  }

  function deviceRow(d) {
    const row = document.createElement("tr");
    row.dataset.device = d.device;
    row.dataset.state = d.state;
    if (d.state === "failed") row.classList.add("is-affected");
    cell(row, d.device);
    cell(row, badge(d.state_words, d.state === "failed" ? "affected" : d.state === "running" ? "online" : "muted"));
    const what = cell(row, "");
    paragraphs(what, d.words);
    if (d.error) paragraphs(what, [`Why it failed: ${d.error}`], "error");
    cell(row, d.abs_error_max == null ? null : d.abs_error_max.toPrecision(4));
    cell(row, latency(d.serving_p50_ms, d.serving_p95_ms));
    cell(row, latency(d.candidate_p50_ms, d.candidate_p95_ms));
    cell(row, d.severity === "model affected" ? badge(d.severity_words, "affected")
      : d.severity === "inputs changed" ? badge(d.severity_words, "drifted") : d.severity_words);
    return row;
  }

  function actions(view, section) {
    if (role() !== "operator") return;
    const fleet = view.fleet;
    const bar = document.createElement("div");
    bar.className = "shadow-actions";
    bar.innerHTML = "<label>agreement at least <input class='min-agreement' type='number' min='0' max='100' " +
      "step='0.5' value='98'>%</label> <label>at most <input class='max-latency-ratio' type='number' min='0' " +
      "step='0.1' value='1.2'>× as slow</label> <label>outputs differ by at most <input class='max-error' " +
      "type='number' min='0' step='any' placeholder='not judged'></label> <label>canaries <input class='canary' type='number' min='0' " +
      "value='0'></label> ";
    const result = document.createElement("div");
    result.className = "shadow-result";
    const promote = document.createElement("button");
    promote.className = "promote";
    promote.textContent = `Switch fleet ${fleet} to ${view.candidate}`;
    promote.onclick = async () => {
      const minAgreement = Number(bar.querySelector(".min-agreement").value) / 100;
      const maxRatio = Number(bar.querySelector(".max-latency-ratio").value);
      const canary = Math.max(0, Number(bar.querySelector(".canary").value) || 0);
      const maxErrorText = bar.querySelector(".max-error").value.trim();
      const maxError = maxErrorText === "" ? null : Number(maxErrorText);
      const sure = confirm(`Switch fleet ${fleet} to ${view.candidate}?\n\nOnly if on every device it agreed ` +
        `with the current model on at least ${(minAgreement * 100).toFixed(1)}% of inputs and is at most ` +
        `${maxRatio}× as slow; otherwise nothing changes and you see why. ` +
        (canary > 0 ? `${canary} device(s) get it first (the canaries).` : "Every device installs it as an update."));
      if (!sure) return;
      result.replaceChildren();
      try {
        const done = await post(`/api/shadow/${encodeURIComponent(fleet)}/promote`,
          { min_agreement: minAgreement, max_latency_ratio: maxRatio, canary, max_error: maxError });
        if (done.passed) {
          paragraphs(result, [`${done.candidate} passed on every device: fleet ${fleet} is switching to it ` +
            `(${done.rollout.phase}). Follow it on the rollouts page.`], "passed");
        } else {
          paragraphs(result, [`${done.candidate || "The new model"} was not rolled out: nothing changed.`], "error");
          const list = document.createElement("ul");
          list.className = "refusal";
          for (const reason of done.reasons) {
            const item = document.createElement("li");
            item.textContent = reason;
            list.appendChild(item);
          }
          result.appendChild(list);
        }
      } catch (error) { paragraphs(result, [error.message], "error"); }
    };
    const stop = document.createElement("button");
    stop.className = "stop";
    stop.textContent = "Stop trying it";
    stop.onclick = async () => {
      const sure = confirm(`Stop trying ${view.candidate} on fleet ${fleet}?\n\nDevices unload it; the current ` +
        "model keeps serving, and the figures so far stay here.");
      if (!sure) return;
      result.replaceChildren();
      try {
        const done = await post(`/api/shadow/${encodeURIComponent(fleet)}/stop`);
        paragraphs(result, [`Fleet ${fleet} told to stop trying ${view.candidate} (desired state ${done.seq}).`], "passed");
      } catch (error) { paragraphs(result, [error.message], "error"); }
    };
    bar.append(promote, " ", stop);
    section.append(bar, result);
  }

  async function refresh() {
    await whoAmI();
    const views = await get("/api/shadow");
    const root = document.getElementById("shadows");
    const kept = new Map([...root.querySelectorAll("section.shadow")].map((s) => [s.dataset.fleet, s]));
    root.querySelectorAll(".shadow-empty").forEach((e) => e.remove());
    if (!views.length) {
      const empty = document.createElement("p");
      empty.className = "shadow-empty";
      empty.textContent = "No new model is being tried. `edgekit push MODEL --fleet F --shadow` starts trying one.";
      root.appendChild(empty);
    }
    for (const view of views) {
      let section = kept.get(view.fleet);
      if (!section) {  // built once: the buttons and their results stay across refreshes
        section = document.createElement("section");
        section.className = "shadow";
        section.dataset.fleet = view.fleet;
        section.innerHTML = "<h2></h2><div class='shadow-total'></div><table class='shadow-devices'><thead><tr>" +
          "<th>device</th><th>state</th><th>what it measured</th><th>largest output difference</th>" +
          "<th>current model: half / 95% of answers within</th><th>new model: half / 95% of answers within</th>" +
          "<th>the new model on these inputs</th></tr></thead>" +
          "<tbody></tbody></table>";
        root.appendChild(section);
        actions(view, section);
      }
      kept.delete(view.fleet);
      section.dataset.candidate = view.candidate;
      section.querySelector("h2").textContent = view.headline;
      const total = section.querySelector(".shadow-total");
      total.replaceChildren();
      paragraphs(total, view.total.words);
      total.dataset.agreement = percent(view.total.agreement);
      const body = section.querySelector("tbody");
      body.replaceChildren(...view.devices.map(deviceRow));
      const sum = document.createElement("tr");
      sum.className = "total";
      cell(sum, "in total");
      cell(sum, `${view.total.compared.toLocaleString("en")} compared, ${view.total.dropped.toLocaleString("en")} skipped`);
      cell(sum, `agreement ${percent(view.total.agreement)} (${percent(view.total.agreement_low)}–` +
        `${percent(view.total.agreement_high)})`);
      cell(sum, view.total.abs_error_max == null ? null : view.total.abs_error_max.toPrecision(4));
      cell(sum, latency(view.total.serving_p50_ms, view.total.serving_p95_ms));
      cell(sum, latency(view.total.candidate_p50_ms, view.total.candidate_p95_ms));
      cell(sum, "");
      body.appendChild(sum);
    }
    for (const gone of kept.values()) gone.remove();
    stamp();
  }

  return { page: () => every(refresh) };
})();
