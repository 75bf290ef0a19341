// The shardq dashboard: fetches server-rendered fragments with the bearer token and
// swaps them in; one request a second for the view on screen, never two at once.
"use strict";
(function () {
  const KEY = "shardq-token";  // sessionStorage: this tab only, never a URL or a cookie
  const $ = (id) => document.getElementById(id);
  let inFlight = false;
  let lastHtml = "";
  let pending = null;  // the action awaiting confirmation

  function token() { return sessionStorage.getItem(KEY); }

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    const t = token();
    if (t) h["Authorization"] = "Bearer " + t;
    return h;
  }

  function route() {
    const hash = location.hash.replace(/^#/, "") || "cluster";
    const [view, query] = hash.split("?");
    return { view: view, params: new URLSearchParams(query || "") };
  }

  function go(view, params) {
    const q = params && params.toString();
    location.hash = view + (q ? "?" + q : "");
  }

  function showLogin(message) {
    $("app").hidden = true;
    $("nav").hidden = true;
    $("view").innerHTML = "";
    lastHtml = "";
    $("login").hidden = false;
    $("login-error").textContent = message || "";
  }

  function showApp() {
    $("login").hidden = true;
    $("app").hidden = false;
    $("nav").hidden = false;
  }

  function apiPath() {
    const r = route();
    const p = new URLSearchParams(r.params);
    if (r.view === "queues") {
      p.set("q", $("queue-search").value);
      p.set("sort", $("queue-sort").value);
    }
    const view = ["cluster", "queues", "jobs", "job", "queue"].includes(r.view) ? r.view : "cluster";
    return "/ui/api/" + view + "?" + p.toString();
  }

  function syncControls() {
    const r = route();
    for (const a of document.querySelectorAll("#nav a")) {
      const v = a.dataset.view;
      a.classList.toggle("on", v === r.view || (v === "jobs" && ["job", "queue"].includes(r.view)));
    }
    $("controls-queues").hidden = r.view !== "queues";
    $("controls-jobs").hidden = !["jobs", "queue"].includes(r.view);
    if (r.view === "jobs" || r.view === "queue") {
      const q = r.params.get("queue") || "";
      if (document.activeElement !== $("jobs-queue")) $("jobs-queue").value = q;
      const state = r.params.get("state") || (r.view === "jobs" ? "waiting" : "");
      for (const a of document.querySelectorAll("#jobs-states a")) {
        a.classList.toggle("on", a.dataset.state === state);
        const p = new URLSearchParams({ queue: q, state: a.dataset.state });
        a.href = "#jobs?" + p.toString();
      }
    }
  }

  async function refresh(force) {
    if (inFlight) return;  // coalesce: one request at a time
    inFlight = true;
    try {
      const resp = await fetch(apiPath(), { headers: headers(), cache: "no-store" });
      if (resp.status === 401) {
        const had = token();
        sessionStorage.removeItem(KEY);
        showLogin(had ? "wrong token" : "");
        return;
      }
      showApp();
      const html = await resp.text();
      if (force || html !== lastHtml) {  // unchanged: keep the DOM (selection, scroll)
        $("view").innerHTML = html;
        lastHtml = html;
      }
      $("status").textContent = resp.ok ? "updated " + new Date().toLocaleTimeString()
                                        : "error " + resp.status;
    } catch (e) {
      $("status").textContent = "coordinator unreachable";
    } finally {
      inFlight = false;
    }
  }

  function toast(text, ok) {
    const t = $("toast");
    t.textContent = text;
    t.className = ok ? "ok" : "bad";
    t.hidden = false;
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => { t.hidden = true; }, 6000);
  }

  async function runAction(data) {
    const body = {};
    for (const [k, v] of Object.entries(data)) {
      if (k !== "confirm") body[k] = v;
    }
    try {
      const resp = await fetch("/ui/api/action", {
        method: "POST", headers: headers({ "Content-Type": "application/json" }),
        body: JSON.stringify(body),
      });
      const answer = await resp.json().catch(() => ({ error: "HTTP " + resp.status }));
      toast(answer.message || answer.error || ("HTTP " + resp.status), resp.ok);
    } catch (e) {
      toast("coordinator unreachable", false);
    }
    refresh(true);
  }

  document.addEventListener("click", (ev) => {
    const button = ev.target.closest("[data-action]");
    if (!button) return;
    ev.preventDefault();
    pending = Object.assign({}, button.dataset);
    $("confirm-text").textContent = button.dataset.confirm || ("Run " + button.dataset.action + "?");
    $("confirm").showModal();
  });

  $("confirm").addEventListener("close", () => {
    const action = pending;
    pending = null;
    if (action && $("confirm").returnValue === "ok") runAction(action);
  });

  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY, $("token").value);
    $("token").value = "";
    refresh(true);
  });

  // A new search or sort starts again at page 1.
  function firstPage() {
    if (route().params.get("page")) go("queues"); else refresh(true);
  }
  let searchTimer = null;
  $("queue-search").addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(firstPage, 200);
  });
  $("queue-sort").addEventListener("change", firstPage);
  $("jobs-queue").addEventListener("change", () => {
    const r = route();
    go("jobs", new URLSearchParams({ queue: $("jobs-queue").value,
                                     state: r.params.get("state") || "waiting" }));
  });
  window.addEventListener("hashchange", () => { syncControls(); refresh(true); });

  syncControls();
  refresh(true);
  setInterval(() => refresh(false), 1000);
})();
