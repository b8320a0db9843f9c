// Live dashboard: renders the stats JSON (embedded at load, then polled), draws the throughput
// chart as SVG and shows JOB_UPDATE frames from the WebSocket /ws (staff session) in a feed.
"use strict";

(() => {
  const config = JSON.parse(document.getElementById("dashboard-config").textContent);
  let stats = JSON.parse(document.getElementById("dashboard-initial-stats").textContent);

  const SVG_NS = "http://www.w3.org/2000/svg";
  const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
  const byId = (id) => document.getElementById(id);

  // --- DOM helpers (text only: nothing from the server is parsed as HTML) ---------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined) node.setAttribute(name, value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  const number = (n) => (n === null || n === undefined ? "?" : n.toLocaleString("en-US"));
  const clock = (iso) =>
    iso ? new Date(iso).toLocaleTimeString("en-GB", { hour12: false }) : "—";
  const link = (href, text) => (href ? el("a", { href }, text) : text);

  function jobLink(jobId) {
    if (!UUID_RE.test(jobId)) return el("code", {}, jobId);
    return el("a", { href: config.jobUrl.replace(config.jobIdPlaceholder, jobId) },
      el("code", {}, jobId));
  }

  function tenantInfo(tenantId) {
    return stats.tenants.find((t) => t.id === tenantId);
  }

  // --- stats panels ---------------------------------------------------------------------------
  function renderCounts(s) {
    let total = 0;
    for (const status of s.statuses) {
      byId(`count-${status}`).textContent = number(s.totals[status]);
      total += s.totals[status];
    }
    byId("count-total").textContent = number(total);
  }

  function renderTenants(s) {
    const body = byId("tenants-table").tBodies[0];
    const rows = s.tenants.map((t) =>
      el("tr", { "data-tenant-id": t.id },
        el("td", {}, link(t.adminUrl, t.id),
          t.name ? el("div", { class: "muted" }, t.name) : null,
          t.isActive ? null : el("div", { class: "muted" }, "inactive")),
        ...s.statuses.map((status) =>
          el("td", { class: "num", "data-status": status }, number(t.counts[status]))),
        el("td", { class: "num" }, number(t.total)),
        el("td", { class: "num" }, number(t.queue.ready)),
        el("td", { class: "num" }, number(t.queue.delayed)),
        el("td", { class: "num" }, number(t.queue.running)),
        el("td", {}, link(t.jobsUrl, "jobs in admin"),
          s.tenant ? null : " · ", s.tenant ? null : link(t.dashboardUrl, "only this"))));
    if (!rows.length) {
      rows.push(el("tr", {}, el("td", { colspan: s.statuses.length + 6, class: "muted" },
        "No tenant yet.")));
    }
    body.replaceChildren(...rows);
    byId("tenants-note").textContent = s.tenantsTotal > s.tenants.length
      ? `(first ${s.tenants.length} of ${s.tenantsTotal}; choose one with the filter)`
      : "";
  }

  function renderWorkers(s) {
    const body = byId("workers-table").tBodies[0];
    const rows = s.workers.map((w) => {
      let state = "no heartbeat";
      if (w.heartbeatAgeS !== null) state = w.alive ? "alive" : "stale";
      return el("tr", { "data-worker": w.name },
        el("td", {}, el("code", {}, w.name)),
        el("td", {}, el("span", { class: `badge ${w.alive ? "alive" : "stale"}` }, state)),
        el("td", { class: "num" }, w.heartbeatAgeS === null ? "—" : `${w.heartbeatAgeS} s ago`),
        el("td", { class: "num" }, number(w.running)));
    });
    if (!rows.length) {
      rows.push(el("tr", {}, el("td", { colspan: 4, class: "muted" },
        "No worker has sent a heartbeat.")));
    }
    body.replaceChildren(...rows);
  }

  function renderCircuits(s) {
    const body = byId("circuits-table").tBodies[0];
    const when = (iso) => (iso ? new Date(iso).toLocaleTimeString() : "—");
    const rows = (s.openCircuits || []).map((c) =>
      el("tr", { "data-host": c.host },
        el("td", {}, el("code", {}, c.host)),
        el("td", {}, el("span", { class: "badge stale" }, c.state === "open" ? "open" : "half-open")),
        el("td", {}, when(c.openedAt)),
        el("td", {}, c.state === "open" ? when(c.until) : "probing"),
        el("td", { class: "num" }, number(c.failures))));
    if (!rows.length) {
      rows.push(el("tr", {}, el("td", { colspan: 5, class: "muted" },
        "No open circuit: every webhook host takes requests.")));
    }
    body.replaceChildren(...rows);
  }

  function renderSchedules(s) {
    const body = byId("schedules-table").tBodies[0];
    const rows = (s.schedules || []).map((row) =>
      el("tr", { "data-schedule": row.id },
        el("td", {}, el("a", { href: row.adminUrl }, row.name)),
        el("td", {}, row.tenant),
        el("td", {}, el("code", {}, row.timing)),
        el("td", {}, row.nextRunAt ? new Date(row.nextRunAt).toLocaleString() : "—"),
        el("td", {}, el("span", { class: row.enabled ? "badge alive" : "badge stale" },
          row.enabled ? "enabled" : "disabled"))));
    if (!rows.length) {
      rows.push(el("tr", {}, el("td", { colspan: 5, class: "muted" }, "No schedule.")));
    }
    body.replaceChildren(...rows);
  }

  function niceMax(value) {
    const exponent = 10 ** Math.floor(Math.log10(Math.max(1, value)));
    for (const step of [1, 2, 5, 10]) {
      if (step * exponent >= value) return step * exponent;
    }
    return 10 * exponent;
  }

  function renderChart(throughput) {
    const chart = byId("throughput-chart");
    const buckets = throughput.buckets;
    const [width, height, left, right, top, bottom] = [640, 220, 44, 8, 10, 24];
    const plotW = width - left - right;
    const plotH = height - top - bottom;
    const yMax = Math.max(2, niceMax(Math.max(0, ...buckets.map((b) => b.completed + b.failed))));
    const y = (v) => top + plotH - (v / yMax) * plotH;
    const slot = plotW / buckets.length;
    const nodes = [];
    for (const v of [0, yMax / 2, yMax]) {
      nodes.push(svg("line", { class: "grid", x1: left, x2: width - right, y1: y(v), y2: y(v) }));
      nodes.push(svg("text", { x: left - 6, y: y(v) + 4, "text-anchor": "end" }, number(v)));
    }
    buckets.forEach((b, i) => {
      const x = left + i * slot + 1;
      const group = svg("g", { "data-start": b.start });
      group.append(svg("title", {},
        `${clock(b.start)}: ${b.completed} completed, ${b.failed} failed`));
      group.append(svg("rect", { class: "bar-completed", x, width: slot - 2,
        y: y(b.completed), height: plotH * (b.completed / yMax) }));
      group.append(svg("rect", { class: "bar-failed", x, width: slot - 2,
        y: y(b.completed + b.failed), height: plotH * (b.failed / yMax) }));
      nodes.push(group);
      const secondsAgo = (buckets.length - 1 - i) * throughput.bucketSeconds;
      if (secondsAgo % 120 === 0) {
        nodes.push(svg("text", { x: x + slot / 2, y: height - 6, "text-anchor": "middle" },
          secondsAgo ? `-${secondsAgo / 60} min` : "now"));
      }
    });
    chart.replaceChildren(...nodes);

    const completed = buckets.reduce((sum, b) => sum + b.completed, 0);
    const failed = buckets.reduce((sum, b) => sum + b.failed, 0);
    const lastMinute = buckets.slice(-6).reduce((sum, b) => sum + b.completed + b.failed, 0);
    byId("throughput-summary").textContent =
      `${number(completed)} completed, ${number(failed)} failed in 10 min · ` +
      `${(lastMinute / 60).toFixed(2)} jobs/s over the last minute`;
  }

  function renderStats(s) {
    stats = s;
    renderCounts(s);
    renderTenants(s);
    renderWorkers(s);
    renderCircuits(s);
    renderSchedules(s);
    renderChart(s.throughput);
    const time = byId("stats-time");
    time.textContent = clock(s.serverTime);
    time.dateTime = s.serverTime;
    warn(s.redisOk ? "" : "Redis unreachable: ready counts and heartbeats are unknown.");
    subscribeAll();
  }

  function warn(text, href) {
    const box = byId("stats-warning");
    box.replaceChildren(text, href ? " " : "", href ? el("a", { href }, "Log in again") : "");
    box.hidden = !text;
  }

  // --- polling --------------------------------------------------------------------------------
  let fetching = false;
  let refreshTimer = null;

  async function refresh() {
    refreshTimer = null;
    if (fetching) return;
    fetching = true;
    try {
      const url = new URL(config.statsUrl, window.location.href);
      if (config.tenant) url.searchParams.set("tenant", config.tenant);
      const response = await fetch(url, {
        credentials: "same-origin",
        headers: { Accept: "application/json" },
      });
      if (response.status === 403) {
        warn("Your session has ended.", config.loginUrl);
      } else if (!response.ok) {
        warn(`Stats request failed (HTTP ${response.status}).`);
      } else {
        renderStats(await response.json());
      }
    } catch (error) {
      warn(`Stats request failed (${error.message}).`);
    } finally {
      fetching = false;
    }
  }

  // Job updates make the counts stale: refresh soon, at most a few times a second.
  function refreshSoon() {
    if (refreshTimer === null) refreshTimer = window.setTimeout(refresh, 400);
  }

  // --- live feed ------------------------------------------------------------------------------
  const feed = byId("feed");
  const lastCursor = new Map(); // job id -> the greatest cursor shown (BigInt)

  // Cursors are strings of digits that may outgrow Number: compared as BigInt.
  function newer(update) {
    if (update.cursor == null) return true;
    const cursor = BigInt(update.cursor);
    const previous = lastCursor.get(update.jobId);
    if (previous !== undefined && cursor <= previous) return false; // a resumed replay repeats
    lastCursor.set(update.jobId, cursor);
    return true;
  }

  function addFeedRow(update) {
    if (!newer(update)) return;
    const key = `${update.jobId}|${update.cursor}`;
    const tenant = tenantInfo(update.tenantId);
    const row = el("tr", {
      class: "fresh", "data-job-id": update.jobId, "data-status": update.status, "data-key": key,
    },
      el("td", {}, el("time", { datetime: update.updatedAt }, clock(update.updatedAt))),
      el("td", {}, link(tenant && tenant.adminUrl, update.tenantId)),
      el("td", {}, jobLink(update.jobId)),
      el("td", {}, update.jobType),
      el("td", {}, el("span", { class: `badge status-${String(update.status).toLowerCase()}` },
        update.status),
        update.status === "RUNNING" && update.progress != null
          ? el("span", { class: "dash-progress" }, ` ${update.progress}%`) : ""),
      el("td", { class: "num" }, update.attempts),
      el("td", { class: "dash-feed-error", title: update.error || "" },
        update.error || (update.status === "RUNNING" ? update.progressMessage || "" : "")));
    feed.prepend(row);
    while (feed.rows.length > config.feedLimit) {
      feed.lastElementChild.remove();
    }
    if (lastCursor.size > 10 * config.feedLimit) {
      // Forget the oldest jobs (a Map iterates in insertion order); their frames are long past.
      for (const jobId of [...lastCursor.keys()].slice(0, lastCursor.size - config.feedLimit)) {
        lastCursor.delete(jobId);
      }
    }
    byId("feed-empty").hidden = true;
  }

  // --- WebSocket ------------------------------------------------------------------------------
  let socket = null;
  let backoffMs = 1000;
  const requested = new Set(); // SUBSCRIBE sent on this socket
  const subscribed = new Set(); // SUBSCRIBED received on this socket
  // tenant -> the cursor the server last said this page holds every change up to (SUBSCRIBED,
  // RESYNC): where to resume after a reconnect or a RESYNC.
  const resumeFrom = new Map();

  function setState(state, text) {
    const badge = byId("ws-state");
    badge.dataset.state = state;
    badge.textContent = text || state;
  }

  function wantedTenants() {
    return config.tenant ? [config.tenant] : stats.tenants.map((t) => t.id);
  }

  function subscribe(tenantId, cursor) {
    requested.add(tenantId);
    const message = { type: "SUBSCRIBE", tenantId };
    if (cursor != null) message.cursor = cursor;
    else message.since = stats.serverTime;
    socket.send(JSON.stringify(message));
  }

  function subscribeAll() {
    if (!socket || socket.readyState !== WebSocket.OPEN || !socket.connectedFrameSeen) return;
    for (const tenantId of wantedTenants()) {
      if (requested.has(tenantId)) continue;
      // From the last cursor the server gave (or the one the stats were read at): nothing in
      // between is missed.
      subscribe(tenantId, resumeFrom.get(tenantId) || stats.cursor);
    }
    if (!wantedTenants().length) setState("live", "live · no tenants yet");
  }

  function onFrame(frame) {
    switch (frame.type) {
      case "CONNECTED":
        backoffMs = 1000;
        socket.connectedFrameSeen = true;
        subscribeAll();
        break;
      case "SUBSCRIBED":
        subscribed.add(frame.tenantId);
        if (frame.cursor != null) resumeFrom.set(frame.tenantId, frame.cursor);
        setState("live", `live · ${subscribed.size} tenant${subscribed.size === 1 ? "" : "s"}`);
        break;
      case "JOB_UPDATE":
        addFeedRow(frame);
        refreshSoon();
        break;
      case "ERROR":
        console.warn("dashboard websocket:", frame.message);
        if (frame.code === "RESYNC" && frame.tenantId) {
          // Updates may have been missed, or the replay stopped at its limit: resume from the
          // cursor the server gave.
          if (frame.cursor != null) resumeFrom.set(frame.tenantId, frame.cursor);
          subscribe(frame.tenantId, resumeFrom.get(frame.tenantId));
        }
        break;
      default:
        break;
    }
  }

  function connect() {
    setState("connecting", "connecting…");
    const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${scheme}//${window.location.host}${config.wsPath}`);
    socket = ws;
    requested.clear();
    subscribed.clear();
    ws.addEventListener("message", (event) => {
      if (socket === ws) onFrame(JSON.parse(event.data));
    });
    ws.addEventListener("close", () => {
      if (socket !== ws) return;
      setState("reconnecting", `disconnected · retrying in ${backoffMs / 1000} s`);
      window.setTimeout(connect, backoffMs);
      backoffMs = Math.min(backoffMs * 2, 30000);
    });
  }

  // --- start ----------------------------------------------------------------------------------
  byId("tenant-filter").addEventListener("change", (event) => event.target.form.submit());
  renderStats(stats);
  connect();
  window.setInterval(() => {
    if (!document.hidden) refresh();
  }, config.pollMs);
})();
