// ragq dashboard: polls the JSON API and updates the page in place.
// API data only ever reaches the page as textContent or attribute values, never as markup.
"use strict";

(() => {
  const REFRESH_MS = 2000;
  const HIDDEN_REFRESH_MS = 10000; // a background tab polls less
  const FETCH_TIMEOUT_MS = 10000;
  const STALE_MS = 3 * REFRESH_MS + FETCH_TIMEOUT_MS;
  const KEY_STORAGE = "ragq-api-key";
  const BATCH_LIMIT = 20;
  const FAILURE_LIMIT = 30;
  const CHART_WINDOW_S = 15 * 60;
  const BUCKET_S = 10;
  const SERIES_CLASSES = 6;
  const SVG_NS = "http://www.w3.org/2000/svg";

  const page = { lastOk: null, waitingForKey: false, timer: null, inFlight: false };

  // ---- small helpers -------------------------------------------------------------------------------------

  const $ = (id) => document.getElementById(id);

  function setText(node, value) {
    const text = value === null || value === undefined ? "" : String(value);
    if (node.textContent !== text) node.textContent = text;
  }

  function setClass(node, className) {
    if (node.getAttribute("class") !== className) node.setAttribute("class", className);
  }

  function setTitle(node, title) {
    if (title) {
      if (node.getAttribute("title") !== title) node.setAttribute("title", title);
    } else if (node.hasAttribute("title")) {
      node.removeAttribute("title");
    }
  }

  function isNumber(value) {
    return typeof value === "number" && Number.isFinite(value);
  }

  function fmtInt(value) {
    return isNumber(value) ? Math.round(value).toLocaleString("en-US") : "–";
  }

  function fmtRate(value) {
    if (!isNumber(value)) return "–";
    return value < 10 ? value.toFixed(2) : value.toFixed(1);
  }

  function fmtDuration(seconds) {
    if (!isNumber(seconds) || seconds < 0) return "–";
    const s = Math.round(seconds);
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} m ${String(s % 60).padStart(2, "0")} s`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} m`;
    return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
  }

  // Times come as unix seconds (/v1/models) or ISO 8601 strings (/v1/batches).
  function toMillis(value) {
    if (isNumber(value)) return value < 1e12 ? value * 1000 : value;
    if (typeof value === "string" && value) {
      const parsed = Date.parse(value);
      return Number.isNaN(parsed) ? null : parsed;
    }
    return null;
  }

  function fmtAgo(value) {
    const ms = toMillis(value);
    return ms === null ? "–" : `${fmtDuration(Math.max(0, (Date.now() - ms) / 1000))} ago`;
  }

  function fmtTime(value) {
    const ms = toMillis(value);
    return ms === null ? "" : new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
  }

  function stateClass(text) {
    const value = String(text || "").toLowerCase();
    if (/^(ready|completed|succeeded)$/.test(value)) return "state-ok";
    if (/^(in_progress|running|cancelling)$/.test(value)) return "state-active";
    if (/^(dead|down|crashed|failed|error|expired|cancelled)$/.test(value)) return "state-bad";
    return "state-warn";
  }

  // ---- talking to the API ----------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, type, message) {
      super(message);
      this.status = status;
      this.type = type;
    }
  }

  function storedKey() {
    try {
      return sessionStorage.getItem(KEY_STORAGE);
    } catch {
      return null;
    }
  }

  async function getJson(path) {
    const headers = { Accept: "application/json" };
    const key = storedKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    const controller = new AbortController();
    const timeout = setTimeout(() => controller.abort(), FETCH_TIMEOUT_MS);
    let response;
    try {
      response = await fetch(path, { headers, signal: controller.signal, cache: "no-store", credentials: "omit" });
    } catch (error) {
      const message = error.name === "AbortError" ? "no answer within 10 s" : `the API is unreachable (${error.message})`;
      throw new ApiError(0, "network", message);
    } finally {
      clearTimeout(timeout);
    }
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    if (!response.ok) {
      const error = body && typeof body.error === "object" && body.error !== null ? body.error : {};
      const type = typeof error.type === "string" ? error.type : `http_${response.status}`;
      const message = typeof error.message === "string" ? error.message : response.statusText || "request failed";
      throw new ApiError(response.status, type, message);
    }
    if (body === null || typeof body !== "object") throw new ApiError(response.status, "bad_response", "the answer is not JSON");
    return body;
  }

  // ---- rendering: tables keep their rows (keyed) so a refresh changes text, not elements -----------------

  // rows: [{key, className, cells: [{text, className, title, span, clip, progress: {value, max, className, title}}]}]
  function syncRows(tbody, rows) {
    const existing = new Map();
    for (const tr of Array.from(tbody.children)) existing.set(tr.dataset.key, tr);
    rows.forEach((row, index) => {
      let tr = existing.get(row.key);
      if (tr) {
        existing.delete(row.key);
      } else {
        tr = document.createElement("tr");
        tr.dataset.key = row.key;
      }
      setClass(tr, row.className || "");
      while (tr.children.length > row.cells.length) tr.lastElementChild.remove();
      while (tr.children.length < row.cells.length) tr.appendChild(document.createElement("td"));
      row.cells.forEach((cell, i) => fillCell(tr.children[i], cell));
      if (tbody.children[index] !== tr) tbody.insertBefore(tr, tbody.children[index] || null);
    });
    for (const tr of existing.values()) tr.remove();
  }

  function fillCell(td, cell) {
    const span = cell.span || 1;
    if (td.colSpan !== span) td.colSpan = span;
    setClass(td, cell.className || "");
    setTitle(td, cell.title);
    if (cell.progress) {
      let bar = td.firstElementChild;
      if (!bar || bar.tagName !== "PROGRESS") {
        td.textContent = "";
        bar = document.createElement("progress");
        td.appendChild(bar);
      }
      const max = Math.max(1, cell.progress.max);
      if (bar.max !== max) bar.max = max;
      if (bar.value !== cell.progress.value) bar.value = cell.progress.value;
      setClass(bar, cell.progress.className || "");
      setTitle(bar, cell.progress.title);
    } else if (cell.clip) {
      // The cell takes what width the row leaves (CSS: max-width 0); a block inside cuts the text with an ellipsis.
      let box = td.firstElementChild;
      if (!box || box.tagName !== "DIV") {
        td.textContent = "";
        box = document.createElement("div");
        box.setAttribute("class", "clip");
        td.appendChild(box);
      }
      setText(box, cell.text);
    } else {
      setText(td, cell.text);
    }
  }

  function showEmpty(id, empty) {
    $(id).hidden = !empty;
  }

  function renderTotals(models) {
    let workers = 0;
    let queued = 0;
    let pending = 0;
    let running = 0;
    let rate = 0;
    for (const model of models) {
      const queues = model.queues || {};
      queued += queues.interactive_queued || 0;
      pending += queues.backlog_pending || 0;
      running += queues.running || 0;
      for (const worker of model.workers || []) {
        workers += 1;
        rate += isNumber(worker.items_per_s) ? worker.items_per_s : 0;
      }
    }
    setText($("total-models"), fmtInt(models.length));
    setText($("total-workers"), fmtInt(workers));
    setText($("total-queued"), fmtInt(queued));
    setText($("total-pending"), fmtInt(pending));
    setText($("total-running"), fmtInt(running));
    setText($("total-rate"), fmtRate(rate));
  }

  function errorCell(error) {
    if (!error || typeof error !== "object") return { text: "" };
    const text = `${error.type || "error"}: ${error.message || ""} (${fmtAgo(error.at)})`;
    // One line, cut to the cell's width; the whole message and the time are in the tooltip.
    return { text, clip: true, className: "clip-cell state-bad", title: `${text}\n${fmtTime(error.at)}` };
  }

  function renderModels(models) {
    const rows = [];
    for (const model of models) {
      const queues = model.queues || {};
      const workers = Array.isArray(model.workers) ? model.workers : [];
      let done = 0;
      let rate = 0;
      for (const worker of workers) {
        done += isNumber(worker.jobs_done) ? worker.jobs_done : 0;
        rate += isNumber(worker.items_per_s) ? worker.items_per_s : 0;
      }
      const count = `${workers.length} worker${workers.length === 1 ? "" : "s"}`;
      rows.push({
        key: `m:${model.id}`,
        className: "model-row",
        cells: [
          { text: `${model.id}  ·  ${count}` },
          { text: "" }, { text: "" }, { text: "" }, { text: "" },
          { text: fmtInt(queues.interactive_queued), className: "num" },
          { text: fmtInt(queues.backlog_pending), className: "num" },
          { text: fmtInt(queues.running), className: "num" },
          { text: fmtInt(done), className: "num" },
          { text: fmtRate(rate), className: "num" },
          { text: "" }, { text: "" },
        ],
      });
      if (workers.length === 0) {
        rows.push({ key: `n:${model.id}`, className: "no-workers", cells: [{ text: "no live worker", span: 12 }] });
      }
      for (const worker of workers) {
        const caps = `≤${fmtInt(worker.max_batch_size)} · ≤${fmtInt(worker.max_batch_tokens)} tok`;
        rows.push({
          key: `w:${model.id}:${worker.name}`,
          className: "worker-row",
          cells: [
            { text: worker.host && !String(worker.name).includes(worker.host) ? `${worker.name} (${worker.host})` : worker.name, className: "mono" },
            {
              text: isNumber(worker.engine_restarts) && worker.engine_restarts > 0
                ? `${worker.engine} · ${worker.engine_restarts} restart${worker.engine_restarts === 1 ? "" : "s"}`
                : worker.engine,
              className: `nowrap ${stateClass(worker.engine)}`,
            },
            { text: worker.device },
            { text: worker.dtype },
            { text: caps, className: "num" },
            { text: "" }, { text: "" }, { text: "" },
            { text: fmtInt(worker.jobs_done), className: "num" },
            { text: fmtRate(worker.items_per_s), className: "num" },
            { text: fmtDuration((Date.now() - (toMillis(worker.up_since) ?? Date.now())) / 1000), title: fmtTime(worker.up_since), className: "nowrap" },
            errorCell(worker.last_error),
          ],
        });
      }
    }
    syncRows($("models").tBodies[0], rows);
    showEmpty("models-empty", models.length === 0);
  }

  // The batch list (/v1/batches) gives every recent batch; /v1/models adds the rate and ETA of open ones.
  function renderBatches(listed, models) {
    const live = new Map();
    for (const model of models || []) {
      for (const batch of model.batches || []) live.set(batch.id, { ...batch, model: model.id });
    }
    const batches = listed ? listed.slice() : [];
    const seen = new Set(batches.map((batch) => batch.id));
    for (const batch of live.values()) if (!seen.has(batch.id)) batches.push(batch);
    const rows = batches.map((batch) => {
      const counts = batch.request_counts;
      const rate = live.get(batch.id);
      let total;
      let done;
      let failed;
      if (counts) {
        total = counts.total;
        failed = counts.failed;
        done = counts.succeeded + counts.failed + counts.cancelled + counts.expired;
      } else {
        total = batch.total;
        failed = batch.failed;
        done = (batch.completed || 0) + (batch.failed || 0);
      }
      const open = batch.status === "in_progress" || batch.status === "cancelling";
      const eta = !open ? "" : rate && isNumber(rate.eta_s) ? fmtDuration(rate.eta_s) : "–";
      return {
        key: `b:${batch.id}`,
        cells: [
          { text: batch.id, className: "mono" },
          { text: batch.model },
          { text: batch.status, className: stateClass(batch.status) },
          {
            progress: {
              value: done,
              max: total,
              className: failed > 0 ? "has-failures" : "",
              title: `${isNumber(total) && total > 0 ? Math.floor((100 * done) / total) : 0} %`,
            },
          },
          { text: `${fmtInt(done)} / ${fmtInt(total)}`, className: "num" },
          { text: fmtInt(failed), className: failed > 0 ? "num state-bad" : "num" },
          { text: rate ? fmtRate(rate.items_per_s) : "–", className: "num" },
          { text: eta, className: "num" },
          { text: fmtAgo(batch.created_at), title: fmtTime(batch.created_at), className: "nowrap" },
        ],
      };
    });
    syncRows($("batches").tBodies[0], rows);
    showEmpty("batches-empty", rows.length === 0);
  }

  function renderFailures(models) {
    const failures = [];
    for (const model of models) {
      for (const failure of model.recent_failures || []) failures.push({ ...failure, model: model.id });
    }
    failures.sort((a, b) => (toMillis(b.at) || 0) - (toMillis(a.at) || 0));
    const rows = failures.slice(0, FAILURE_LIMIT).map((failure, index) => ({
      key: `f:${failure.job_id}:${failure.at}:${index}`,
      cells: [
        { text: fmtAgo(failure.at), title: fmtTime(failure.at), className: "nowrap" },
        { text: failure.model },
        { text: failure.type, className: "error-type" },
        { text: failure.message, className: "wrap" },
        { text: failure.job_id, className: "mono" },
        { text: failure.batch_id || "", className: "mono" },
      ],
    }));
    syncRows($("failures").tBodies[0], rows);
    showEmpty("failures-empty", rows.length === 0);
  }

  function svg(tag, attributes) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
    return node;
  }

  function niceCeiling(value) {
    if (value <= 1) return 1;
    const magnitude = 10 ** Math.floor(Math.log10(value));
    for (const step of [1, 2, 2.5, 5, 10]) if (value <= step * magnitude) return step * magnitude;
    return 10 * magnitude;
  }

  // One line per model: items per second in each 10 s bucket over the last 15 minutes, and a dashed line of
  // failed items (all models). The newest bucket is still filling, so the lines end at the one before it.
  function renderChart(models) {
    const chart = $("chart");
    const width = Math.max(300, Math.round(chart.clientWidth || 900));
    const height = 160;
    const pad = { left: 40, right: 8, top: 10, bottom: 18 };
    let newest = null;
    for (const model of models) for (const point of model.throughput || []) newest = Math.max(newest ?? point.t, point.t);
    const end = newest === null ? Math.floor(Date.now() / 1000 / BUCKET_S) * BUCKET_S : newest; // start of the filling bucket
    const start = end - CHART_WINDOW_S;
    const buckets = [];
    for (let t = start; t < end; t += BUCKET_S) buckets.push(t);
    const failedByBucket = new Map();
    const series = models.map((model) => {
      const byBucket = new Map();
      for (const point of model.throughput || []) {
        byBucket.set(point.t, point.items || 0);
        failedByBucket.set(point.t, (failedByBucket.get(point.t) || 0) + (point.failed || 0));
      }
      const rate = (model.workers || []).reduce((sum, w) => sum + (isNumber(w.items_per_s) ? w.items_per_s : 0), 0);
      return { id: model.id, rate, values: buckets.map((t) => ({ t, rate: (byBucket.get(t) || 0) / BUCKET_S })) };
    });
    const failed = buckets.map((t) => ({ t, rate: (failedByBucket.get(t) || 0) / BUCKET_S }));
    const peak = Math.max(0, ...series.flatMap((s) => s.values.map((v) => v.rate)));
    const top = niceCeiling(peak);
    const x = (t) => pad.left + ((t + BUCKET_S - start) / CHART_WINDOW_S) * (width - pad.left - pad.right);
    const y = (rate) => pad.top + (1 - Math.min(rate, top) / top) * (height - pad.top - pad.bottom);
    const line = (values) => values.map((v) => `${x(v.t).toFixed(1)},${y(v.rate).toFixed(1)}`).join(" ");
    const nodes = [];
    for (const fraction of [0, 0.5, 1]) {
      const yy = y(top * fraction);
      nodes.push(svg("line", { class: "axis", x1: pad.left, x2: width - pad.right, y1: yy, y2: yy }));
      const label = svg("text", { x: pad.left - 4, y: yy + 4, "text-anchor": "end" });
      label.textContent = fmtRate(top * fraction).replace(/\.00$/, "");
      nodes.push(label);
    }
    for (const [t, text, anchor] of [[start - BUCKET_S, "15 min ago", "start"], [start + CHART_WINDOW_S / 2, "7.5 min", "middle"], [end - BUCKET_S, "now", "end"]]) {
      const label = svg("text", { x: x(t), y: height - 4, "text-anchor": anchor });
      label.textContent = text;
      nodes.push(label);
    }
    if (buckets.length > 0) {
      const baseline = y(0).toFixed(1);
      const first = x(buckets[0]).toFixed(1);
      const last = x(buckets[buckets.length - 1]).toFixed(1);
      series.forEach((s, index) => {
        const colour = `s${index % SERIES_CLASSES}`;
        const points = line(s.values);
        nodes.push(svg("polygon", { class: `area ${colour}`, points: `${first},${baseline} ${points} ${last},${baseline}` }));
        nodes.push(svg("polyline", { class: `series ${colour}`, points }));
      });
      if (failed.some((v) => v.rate > 0)) nodes.push(svg("polyline", { class: "series failed", points: line(failed) }));
    }
    chart.setAttribute("viewBox", `0 0 ${width} ${height}`);
    chart.replaceChildren(...nodes);

    const legend = series.map((s, index) => {
      const item = document.createElement("span");
      const swatch = document.createElement("span");
      swatch.setAttribute("class", `swatch s${index % SERIES_CLASSES}`);
      item.append(swatch, document.createTextNode(`${s.id} (${fmtRate(s.rate)}/s now)`));
      return item;
    });
    const failedTotal = failed.reduce((sum, v) => sum + v.rate * BUCKET_S, 0);
    const failedItem = document.createElement("span");
    const failedSwatch = document.createElement("span");
    failedSwatch.setAttribute("class", "swatch failed");
    failedItem.append(failedSwatch, document.createTextNode(`failed (${fmtInt(failedTotal)} in 15 min)`));
    legend.push(failedItem);
    $("chart-legend").replaceChildren(...legend);
  }

  // ---- status, errors and the API key ------------------------------------------------------------------

  function setStatus(state, text) {
    const status = $("status");
    if (status.dataset.state !== state) status.dataset.state = state;
    setText(status, text);
  }

  function tick() {
    if (page.lastOk === null) {
      setText($("updated"), "");
      return;
    }
    const age = Date.now() - page.lastOk;
    setText($("updated"), `updated ${fmtDuration(age / 1000)} ago`);
    if (age > STALE_MS && !page.waitingForKey && $("status").dataset.state === "ok") {
      setStatus("stale", "stale");
      $("content").classList.add("dimmed");
    }
  }

  function describe(error) {
    if (error.status === 0) return error.message;
    return `${error.status} ${error.type}: ${error.message}`;
  }

  function showProblems(problems) {
    const banner = $("banner");
    if (problems.length === 0) {
      banner.hidden = true;
      setText(banner, "");
      return;
    }
    setText(banner, problems.join("\n"));
    banner.hidden = false;
  }

  function askForKey(error) {
    page.waitingForKey = true;
    const hadKey = Boolean(storedKey());
    setStatus("auth", hadKey ? "API key refused" : "API key needed");
    const keyError = $("key-error");
    setText(keyError, hadKey ? `The API refused this key (${error.status} ${error.type}): ${error.message}` : "");
    keyError.hidden = !hadKey;
    $("key-form").hidden = false;
    // Nothing of the previous key's tenant stays on screen.
    $("content").hidden = true;
    $("key-input").focus();
  }

  function showKeyControls() {
    const hasKey = Boolean(storedKey());
    $("forget-key").hidden = !hasKey;
    $("tenant-note").hidden = !hasKey;
  }

  // ---- the refresh loop ------------------------------------------------------------------------------------

  function schedule(delay) {
    clearTimeout(page.timer);
    page.timer = setTimeout(refresh, delay ?? (document.hidden ? HIDDEN_REFRESH_MS : REFRESH_MS));
  }

  async function refresh() {
    if (page.inFlight) return;
    page.inFlight = true;
    try {
      const [models, batches] = await Promise.allSettled([getJson("/v1/models"), getJson(`/v1/batches?limit=${BATCH_LIMIT}`)]);
      const failures = [models, batches].filter((result) => result.status === "rejected").map((result) => result.reason);
      const unauthorised = failures.find((error) => error.status === 401);
      if (unauthorised) {
        askForKey(unauthorised);
        return;
      }
      page.waitingForKey = false;
      $("key-form").hidden = true;
      $("content").hidden = false;
      showKeyControls();
      const modelList = models.status === "fulfilled" && Array.isArray(models.value.data) ? models.value.data : null;
      const batchList = batches.status === "fulfilled" && Array.isArray(batches.value.data) ? batches.value.data : null;
      const problems = [];
      try {
        if (modelList) {
          renderTotals(modelList);
          renderChart(modelList);
          renderModels(modelList);
          renderFailures(modelList);
        }
        if (modelList || batchList) renderBatches(batchList, modelList);
      } catch (error) {
        problems.push(`The page could not show the API's answer: ${error.message}`);
      }
      if (models.status === "rejected") problems.push(`/v1/models: ${describe(models.reason)}`);
      if (batches.status === "rejected") problems.push(`/v1/batches: ${describe(batches.reason)}`);
      showProblems(problems);
      // Figures that could not be refreshed stay, dimmed, with their age in the header.
      $("content").classList.toggle("dimmed", problems.length > 0);
      if (problems.length === 0) {
        page.lastOk = Date.now();
        setStatus("ok", "live");
      } else {
        setStatus("error", failures.some((error) => error.status === 403) ? "forbidden" : "error");
      }
      tick();
    } finally {
      page.inFlight = false;
      if (!page.waitingForKey) schedule();
    }
  }

  function start() {
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("key-input").value.trim();
      if (!key) return;
      try {
        sessionStorage.setItem(KEY_STORAGE, key);
      } catch {
        setText($("key-error"), "This browser does not allow session storage; the key cannot be kept.");
        $("key-error").hidden = false;
        return;
      }
      $("key-input").value = "";
      setStatus("loading", "checking key…");
      page.waitingForKey = false;
      schedule(0);
    });
    $("forget-key").addEventListener("click", () => {
      try {
        sessionStorage.removeItem(KEY_STORAGE);
      } catch {
        // nothing stored
      }
      page.lastOk = null;
      showKeyControls();
      schedule(0);
    });
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && !page.waitingForKey) schedule(0);
    });
    setInterval(tick, 1000);
    refresh();
  }

  start();
})();
