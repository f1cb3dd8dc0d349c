// usher directory dashboard. Served by the directory's admin port as /dashboard.js.
//
// `model(services, routes, nowMs)` turns the admin API's `GET /v1/services` and
// `GET /v1/routes` documents into the rows the page shows (strings only); it needs no
// browser, and the end-to-end tests run it under Node.js against a real directory. The rest
// draws those rows, writing every value as text (never as HTML): instance ids, labels and
// addresses come from the network.
"use strict";

(function (root) {
  const api = {};

  /** A duration in milliseconds as "850 ms", "4.2 s", "3 m 20 s", "5 h 2 m", "3 d 4 h". */
  function duration(ms) {
    if (typeof ms !== "number" || !Number.isFinite(ms)) return "—";
    if (ms < 0) ms = 0;
    if (ms < 1000) return Math.round(ms) + " ms";
    const s = ms / 1000;
    if (s < 60) return s.toFixed(1) + " s";
    const m = Math.floor(s / 60);
    if (m < 60) return m + " m " + Math.floor(s % 60) + " s";
    const h = Math.floor(m / 60);
    if (h < 48) return h + " h " + (m % 60) + " m";
    return Math.floor(h / 24) + " d " + (h % 24) + " h";
  }
  api.duration = duration;

  /** A number for a cell; "—" when the field is missing. */
  function count(n) {
    return typeof n === "number" ? String(n) : "—";
  }

  /** One autoscaler reason (directory/src/autoscale.rs `Reason`) in words. */
  function reason(r) {
    switch (r && r.reason) {
      case "cold_start": return "cold start: a request waits";
      case "scale_up": return "scale up toward " + r.ideal;
      case "scale_down": return "scale down toward " + r.ideal;
      case "load_needs_all": return "the load needs every instance (" + r.outstanding + " outstanding)";
      case "at_max": return "at max (wanted " + r.wanted + ")";
      case "at_min": return "at min";
      case "idle": return "idle";
      case "idle_grace": return "idle, not for the idle timeout yet";
      case "down_delayed": return "down to " + r.ideal + " delayed";
      case "pinned": return "pinned at " + r.instances;
      case "steady": return "steady";
      default: return r && typeof r.reason === "string" ? r.reason.replace(/_/g, " ") : "?";
    }
  }
  api.reason = reason;

  function change(d, nowMs) {
    return d.from + " → " + d.to + ", " + duration(nowMs - d.at_ms) + " ago";
  }

  function summary(routes, services) {
    const instances = routes.instances || [];
    const up = instances.filter((i) => i.state === "up").length;
    const subscribers = routes.subscribers || {};
    const named = subscribers.named || 0;
    return [
      ["epoch", count(routes.epoch)],
      ["revision", count(routes.revision)],
      ["grace period", routes.in_grace_period
        ? "yes: nothing is withdrawn until the agents are back"
        : "over"],
      ["heartbeat interval", duration(routes.heartbeat_interval_ms)],
      ["TTL", duration(routes.ttl_ms)],
      ["instances", up + " up of " + instances.length],
      ["service versions", String((services.services || []).length)],
      ["sidecar subscriptions", String((subscribers.compact || 0) + named) +
        (named ? " (" + named + " from older sidecars)" : "")],
    ];
  }

  function serviceRow(s, nowMs) {
    const sc = s.scaling;
    const decisions = (sc && sc.decisions) || [];
    const last = decisions[decisions.length - 1];
    return [
      s.service,
      s.version,
      count(s.up) + " / " + count(s.instances),
      count(s.in_flight),
      count(s.queued),
      count(s.outstanding),
      count(s.sidecars),
      sc ? count(sc.target) + (typeof sc.pinned === "number" ? " (pinned)" : "") : "—",
      sc ? count(sc.ideal) : "—",
      sc ? count(sc.started) : "—",
      sc ? String(sc.scheduler) : "not scaled",
      last ? change(last, nowMs) + ": " + (last.reasons || []).map(reason).join("; ") : "—",
    ];
  }

  function instanceRows(routes, services) {
    const busy = new Map();
    for (const s of services.services || []) {
      busy.set(s.service + "\u0000" + s.version, s.busy || {});
    }
    return (routes.instances || []).map((i) => {
      const inFlight = (busy.get(i.service + "\u0000" + i.version) || {})[i.id] || 0;
      const labels = Object.entries(i.labels || {}).map(([k, v]) => k + "=" + v).join(" ");
      return [
        i.service,
        i.version,
        i.id,
        String(i.address),
        String(i.state),
        inFlight + " / " + count(i.capacity),
        count(i.weight),
        duration(i.age_ms),
        (typeof i.last_heartbeat_ms_ago === "number" ? duration(i.last_heartbeat_ms_ago) + " ago" : "—") +
          (i.withdrawal_held ? " (TTL lapsed, withdrawal held)" : ""),
        labels,
      ];
    });
  }

  function decisionRows(services, nowMs) {
    const all = [];
    for (const s of services.services || []) {
      for (const d of (s.scaling && s.scaling.decisions) || []) {
        all.push({ s, d });
      }
    }
    all.sort((a, b) => b.d.at_ms - a.d.at_ms);
    return all.map(({ s, d }) => [
      new Date(d.at_ms).toISOString().slice(11, 19) + " UTC",
      duration(nowMs - d.at_ms) + " ago",
      s.service + " " + s.version,
      d.from + " → " + d.to,
      count(d.outstanding),
      (d.reasons || []).map(reason).join("; "),
    ]);
  }

  /**
   * How often the page reads `GET /v1/routes` of a table of `instances`, in ms: every 2 s up
   * to 1,000 instances, then 2 ms per instance (20 s at 10,000). Building that document takes
   * the directory's one thread about 10 ms at 10,000 instances, so a big table is read less
   * often; `GET /v1/services` (the load and scaling, about 0.1 ms) is read every 2 s always.
   */
  api.routesEvery = function (instances) {
    return Math.max(2000, 2 * (instances || 0));
  };

  /**
   * The page's content from `GET /v1/services` and `GET /v1/routes` at `nowMs` (Unix ms):
   * `{summary: [[label, value]], services: [row], instances: [row], decisions: [row],
   * routesEveryMs}`, every cell a string, in the order of the page's columns; `routesEveryMs`
   * is when to read `GET /v1/routes` again (`routesEvery`).
   */
  api.model = function (services, routes, nowMs) {
    return {
      routesEveryMs: api.routesEvery((routes.instances || []).length),
      summary: summary(routes, services),
      services: (services.services || []).map((s) => serviceRow(s, nowMs)),
      instances: instanceRows(routes, services),
      decisions: decisionRows(services, nowMs),
    };
  };

  if (typeof module === "object" && module.exports) {
    module.exports = api;
  } else {
    root.usherDashboard = api;
  }
  if (typeof document === "undefined") return;

  // ---- the page ----
  const TOKEN_KEY = "usher-admin-token";
  const REFRESH_MS = 2000;
  const MAX_ROWS = 1000;
  const STATES = new Set(["starting", "up", "draining", "unknown"]);
  const STATE_COLUMN = 4;
  const el = (id) => document.getElementById(id);
  let paused = false;
  let timer = null;
  let last = null;
  let routes = null;
  let routesAt = 0;

  class NeedsToken extends Error {}

  function text(tag, value, className) {
    const e = document.createElement(tag);
    e.textContent = value;
    if (className) e.className = className;
    return e;
  }

  function fill(table, rows, stateColumn) {
    const shown = rows.slice(0, MAX_ROWS).map((row) => {
      const tr = document.createElement("tr");
      row.forEach((value, i) => {
        const state = i === stateColumn && STATES.has(value) ? "state state-" + value : "";
        tr.append(text("td", value, state));
      });
      return tr;
    });
    table.tBodies[0].replaceChildren(...shown);
    return shown.length;
  }

  function drawInstances() {
    if (!last) return;
    const needle = el("filter").value.trim().toLowerCase();
    const rows = needle
      ? last.instances.filter((row) => row.some((c) => c.toLowerCase().includes(needle)))
      : last.instances;
    const shown = fill(el("instances"), rows, STATE_COLUMN);
    const every = last.routesEveryMs;
    el("instances-count").textContent = (shown < rows.length
      ? "showing " + shown + " of " + rows.length
      : rows.length + (needle ? " matching" : "")) +
      (every > REFRESH_MS ? " · read every " + every / 1000 + " s" : "");
  }

  function draw(model) {
    const pairs = model.summary.flatMap(([label, value]) => [text("dt", label), text("dd", value)]);
    el("summary").replaceChildren(...pairs);
    fill(el("services"), model.services, -1);
    fill(el("decisions"), model.decisions, -1);
    el("decisions-empty").hidden = model.decisions.length > 0;
    drawInstances();
  }

  function problem(message) {
    el("error").hidden = message === null;
    el("error").textContent = message || "";
  }

  async function get(path) {
    const headers = {};
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = "Bearer " + token;
    const reply = await fetch(path, { headers, cache: "no-store" });
    if (reply.status === 401) throw new NeedsToken();
    if (!reply.ok) {
      throw new Error(path + " answered " + reply.status + ": " + (await reply.text()).trim());
    }
    return reply.json();
  }

  async function refresh() {
    timer = null;
    try {
      const due = last === null || Date.now() - routesAt >= last.routesEveryMs;
      const [services, fresh] = await Promise.all([
        get("/v1/services"),
        due ? get("/v1/routes") : Promise.resolve(null),
      ]);
      if (fresh !== null) {
        routes = fresh;
        routesAt = Date.now();
      }
      last = api.model(services, routes, Date.now());
      draw(last);
      problem(null);
      el("login").hidden = true;
      el("updated").textContent = "updated " + new Date().toLocaleTimeString();
    } catch (e) {
      if (e instanceof NeedsToken) {
        // Polling stops until an operator gives a token.
        el("login").hidden = false;
        problem(sessionStorage.getItem(TOKEN_KEY)
          ? "the directory refused this admin token"
          : "this admin port needs the admin token (the directory's admin-token file)");
        return;
      }
      problem("cannot read the directory: " + e.message);
    }
    schedule();
  }

  function schedule() {
    if (!paused && timer === null) timer = setTimeout(refresh, REFRESH_MS);
  }

  document.addEventListener("DOMContentLoaded", () => {
    el("login").addEventListener("submit", (event) => {
      event.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, el("token").value.trim());
      el("token").value = "";
      refresh();
    });
    el("pause").addEventListener("click", () => {
      paused = !paused;
      el("pause").textContent = paused ? "Resume" : "Pause";
      if (paused && timer !== null) {
        clearTimeout(timer);
        timer = null;
      } else if (!paused) {
        refresh();
      }
    });
    el("filter").addEventListener("input", drawInstances);
    refresh();
  });
})(this);
