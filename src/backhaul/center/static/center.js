// The admin center's progressive script: every change is a fetch() to the control API
// (/v1/...), with the session cookie and this page's CSRF token; the API's error detail is
// shown on a refusal. The page's live part is re-fetched every few seconds. Pages read fine
// without it; they only cannot change anything.
"use strict";

(function () {
  const meta = document.querySelector('meta[name="csrf-token"]');
  const csrf = meta ? meta.content : "";
  const flash = document.getElementById("flash");
  const live = document.getElementById("live");

  function say(text, ok) {
    flash.textContent = text;
    flash.className = ok ? "ok" : "error";
    flash.hidden = false;
  }

  async function call(method, url, body) {
    const init = { method: method, credentials: "same-origin", headers: { "X-CSRF-Token": csrf } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(url, init);
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    if (response.status === 401) { window.location.assign("/admin/signin"); }
    if (!response.ok) {
      throw new Error((data && data.detail) || (response.status + " " + response.statusText));
    }
    return data;
  }

  function formBody(form) {
    const body = {};
    for (const field of form.elements) {
      if (!field.name || field.disabled || field.value === "") continue;
      if (field.dataset.type === "int") {
        const n = Number(field.value);
        body[field.name] = Number.isInteger(n) ? n : field.value;
      } else {
        body[field.name] = field.value;
      }
    }
    return body;
  }

  function showSecret(value) {
    const box = document.getElementById("secret");
    document.getElementById("secret-value").textContent = value;
    box.hidden = false;
  }

  document.getElementById("secret-copy").addEventListener("click", async function () {
    const value = document.getElementById("secret-value").textContent;
    try {
      await navigator.clipboard.writeText(value);
      say("Copied to the clipboard.", true);
    } catch (e) {
      say("Copy failed (" + e.message + "); select the token and copy it by hand.", false);
    }
  });

  async function act(method, url, body, confirmText, secretField) {
    if (confirmText && !window.confirm(confirmText)) return;
    try {
      const data = await call(method, url, body);
      if (secretField && data && data[secretField]) showSecret(data[secretField]);
      say("Done: " + method + " " + decodeURIComponent(url), true);
      await refresh();
    } catch (e) {
      say(e.message, false);
    }
  }

  document.addEventListener("submit", function (event) {
    const form = event.target.closest("form[data-api]");
    if (!form) return;
    event.preventDefault();
    act(form.dataset.method || "POST", form.dataset.api, formBody(form), form.dataset.confirm, form.dataset.secret);
  });

  document.addEventListener("click", function (event) {
    const button = event.target.closest("button[data-api]");
    if (!button) return;
    event.preventDefault();
    const method = button.dataset.method || "POST";
    let body;
    if (button.dataset.bodyGroup !== undefined) body = { group: button.dataset.bodyGroup };
    else if (method !== "DELETE") body = {};
    act(method, button.dataset.api, body, button.dataset.confirm);
  });

  async function refresh() {
    if (!live) return;
    const focused = document.activeElement;
    if (focused && live.contains(focused) && focused.matches("input, select, textarea")) return;
    const url = new URL(window.location.href);
    url.searchParams.set("fragment", "1");
    try {
      const response = await fetch(url, { credentials: "same-origin" });
      if (response.status === 401) { window.location.assign("/admin/signin"); return; }
      if (response.ok) live.innerHTML = await response.text();
    } catch (e) {
      say("The relay did not answer (" + e.message + "); retrying.", false);
    }
  }

  if (live && live.dataset.refresh) {
    const seconds = Number(live.dataset.refresh);
    if (seconds > 0) window.setInterval(refresh, seconds * 1000);
  }
})();
