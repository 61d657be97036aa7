// bap-engine ops dashboard: a static page over the admin JSON API (no build step, no dependency).
// The admin key is asked once and kept in sessionStorage (this tab only); every call sends it as
// X-Admin-Key. All server data is written with textContent, never as HTML.
"use strict";

(() => {
  const KEY = "bap-engine.admin-key";
  const STATES = ["provisioning", "running", "sleeping", "stopped", "failed", "destroying"];
  const params = new URLSearchParams(location.search);
  const POLL_MS = Math.max(500, Number(params.get("interval")) || 3000);
  const $ = (id) => document.getElementById(id);

  let selected = (location.hash.match(/product=([0-9a-f-]{36})/) || [])[1] || null;
  let timer = null;
  let refreshing = false;

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    Object.entries(props || {}).forEach(([k, v]) => {
      if (k === "class") node.className = v;
      else if (k === "onclick") node.addEventListener("click", v);
      else if (k.startsWith("data-")) node.setAttribute(k, v);
      else node[k] = v;
    });
    children.forEach((c) => node.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c))));
    return node;
  }

  function show(id, visible) { $(id).hidden = !visible; }
  function banner(id, text) { $(id).textContent = text || ""; show(id, Boolean(text)); }
  function when(iso) { return iso ? iso.replace("T", " ").replace(/\.\d+Z$/, "Z") : "–"; }

  class Unauthorized extends Error {}

  async function api(method, path) {
    const response = await fetch(path, {
      method, cache: "no-store",
      headers: { "X-Admin-Key": sessionStorage.getItem(KEY) || "", "Accept": "application/json" },
    });
    let body = null;
    try { body = await response.json(); } catch (_) { body = null; }
    if (response.status === 401) throw new Unauthorized("the admin key was rejected");
    if (!response.ok) {
      const err = body && body.error;
      throw new Error(err ? `${err.code}: ${err.message}` : `HTTP ${response.status}`);
    }
    return body;
  }

  function login(message) {
    sessionStorage.removeItem(KEY);
    clearTimeout(timer);
    show("app", false); show("forget", false); show("login", true);
    banner("error", message || "");
    $("admin-key").focus();
  }

  function bars(container, rows, cls) {
    const max = Math.max(1, ...rows.map((r) => r.count));
    container.replaceChildren(...rows.map((r) => {
      const fill = el("div", { class: "fill" });
      fill.style.width = `${(100 * r.count) / max}%`;
      return el("div", { class: `bar ${cls ? cls(r) : ""}`, "data-label": r.label },
        el("span", {}, r.label), el("div", { class: "track" }, fill), el("span", {}, r.count));
    }));
  }

  function renderProducts(products) {
    const tbody = $("products").tBodies[0];
    tbody.replaceChildren(...products.map((p) => el("tr",
      { class: p.product_id === selected ? "selected" : "", "data-product": p.product_id, "data-slug": p.slug },
      el("td", {}, el("button", { class: "link", title: p.product_id, onclick: () => select(p.product_id) },
        p.display_name ? `${p.slug} — ${p.display_name}` : p.slug)),
      el("td", {}, p.total),
      ...STATES.map((s) => el("td", { "data-state": s }, p.by_status[s] || 0)))));
  }

  function actionButtons(product, engine) {
    const st = engine.status;
    const spec = [
      ["stop", "Stop", "POST", "stop", st === "running" || st === "sleeping"],
      ["start", "Start", "POST", "start", st === "stopped" || st === "sleeping" || st === "failed"],
      ["rotate-key", "Rotate key", "POST", "rotate-key", st === "running"],
      ["destroy", "Destroy", "DELETE", "", st !== "destroying"],
    ];
    return spec.map(([action, label, method, suffix, enabled]) => el("button", {
      type: "button", disabled: !enabled, class: action === "destroy" ? "danger" : "", "data-action": action,
      onclick: () => act(product, engine.user_id, action, method, suffix),
    }, label));
  }

  function renderProduct(product, metrics, engines, audit) {
    $("product-title").textContent = `${product.slug} (${product.display_name})`;
    $("m-provisions").textContent = metrics.provisions_1h;
    $("m-crashes").textContent = metrics.crashes_1h;
    $("m-restarts").textContent = metrics.restarts_1h;
    $("m-boot").textContent = metrics.avg_boot_ms == null ? "–" : Math.round(metrics.avg_boot_ms);
    bars($("states"), STATES.map((s) => ({ label: s, count: product.by_status[s] || 0 })),
      (r) => (r.label === "failed" ? "failed" : ""));
    bars($("boot"), metrics.boot_ms.buckets.map((b) => ({
      label: b.le == null ? "longer" : `≤ ${b.le >= 1000 ? `${b.le / 1000} s` : `${b.le} ms`}`, count: b.count,
    })));
    $("boot-samples").textContent = `(last ${metrics.boot_ms.samples} provisions)`;
    $("engines-count").textContent = `(${engines.engines.length} of ${engines.total})`;
    $("engines").tBodies[0].replaceChildren(...engines.engines.map((e) => el("tr", { "data-user": e.user_id },
      el("td", {}, e.user_id),
      el("td", {}, el("span", { class: `status ${e.status}`, "data-status": e.status }, e.status)),
      el("td", {}, e.url || "–"), el("td", {}, e.engine_version), el("td", {}, when(e.created_at)),
      el("td", {}, when(e.last_health_at)), el("td", {}, ...actionButtons(product, e)))));
    $("audit").tBodies[0].replaceChildren(...audit.events.map((a) => el("tr", { "data-action": a.action },
      el("td", {}, when(a.timestamp)), el("td", {}, a.action), el("td", {}, a.user_id || "–"),
      el("td", {}, a.actor), el("td", {}, a.duration_ms == null ? "" : `${a.duration_ms} ms`),
      el("td", { class: "wrap" }, JSON.stringify(a.metadata)))));
    show("product", true);
  }

  async function refresh() {
    if (refreshing) return;
    refreshing = true;
    clearTimeout(timer);
    try {
      const { products } = await api("GET", "/products");
      renderProducts(products);
      const product = products.find((p) => p.product_id === selected);
      if (product) {
        const base = `/products/${encodeURIComponent(product.product_id)}`;
        const status = $("status-filter").value;
        const [metrics, engines, audit] = await Promise.all([
          api("GET", `${base}/metrics`),
          api("GET", `${base}/engines?limit=200${status ? `&status=${encodeURIComponent(status)}` : ""}`),
          api("GET", `${base}/audit?limit=20`),
        ]);
        renderProduct(product, metrics, engines, audit);
      } else {
        show("product", false);
      }
      banner("error", "");
      $("refreshed").textContent = `updated ${new Date().toLocaleTimeString()}`;
    } catch (err) {
      if (err instanceof Unauthorized) { refreshing = false; login(err.message); return; }
      banner("error", `refresh failed: ${err.message}`);
    } finally {
      refreshing = false;
    }
    timer = setTimeout(refresh, POLL_MS);
  }

  function select(productId) {
    selected = productId;
    history.replaceState(null, "", `#product=${productId}`);
    refresh();
  }

  async function act(product, userId, action, method, suffix) {
    if (!window.confirm(`${action} the engine of user "${userId}" in product "${product.slug}"?`)) return;
    const path = `/products/${encodeURIComponent(product.product_id)}/engines/${encodeURIComponent(userId)}` +
      (suffix ? `/${suffix}` : "");
    banner("notice", `${action} ${userId}…`);
    try {
      const result = await api(method, path);
      banner("notice", `${action} ${userId}: ${result.status}`);
    } catch (err) {
      if (err instanceof Unauthorized) { login(err.message); return; }
      banner("notice", "");
      banner("error", `${action} ${userId} failed: ${err.message}`);
    }
    refresh();
  }

  function start() {
    show("login", false); show("app", true); show("forget", true);
    banner("error", "");
    refresh();
  }

  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("admin-key").value.trim();
    if (!value) return;
    sessionStorage.setItem(KEY, value);
    $("admin-key").value = "";
    start();
  });
  $("forget").addEventListener("click", () => login(""));
  $("status-filter").addEventListener("change", refresh);

  if (sessionStorage.getItem(KEY)) start(); else login("");
})();
