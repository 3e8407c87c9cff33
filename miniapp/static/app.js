// Cocoon Mini App: what every view shares. One page, four views (Wallet, History, Chat,
// Provider) switched without a reload; Telegram's glue (theme, header and bottom bar colours,
// MainButton, BackButton); the authenticated JSON API with errors said in the page's language;
// exact GRAM amounts in the same grammar as the server (backend/money.py); scripts loaded on
// demand (TON Connect: tonconnect.js). No user-facing words here: they come translated from the
// server (#cocoon-strings).
(function () {
  "use strict";

  const config = JSON.parse(document.getElementById("cocoon-config").textContent);
  const strings = JSON.parse(document.getElementById("cocoon-strings").textContent);
  const tg = window.Telegram && window.Telegram.WebApp;
  const inTelegram = Boolean(tg && tg.platform && tg.platform !== "unknown");
  const NANO = 1000000000n;
  const MAX_NANO = 9223372036854775807n;
  const MINUS = "\u2212";

  function $(id) {
    return document.getElementById(id);
  }

  function t(key, values) {
    let text = Object.prototype.hasOwnProperty.call(strings, key) ? strings[key] : key;
    for (const [name, value] of Object.entries(values || {})) {
      text = text.split("{" + name + "}").join(String(value));
    }
    return text;
  }

  // ------------------------------------------------------------------ amounts (no floats)

  function formatAmount(nano) {
    let value = BigInt(nano);
    const sign = value < 0n ? MINUS : "";
    if (value < 0n) value = -value;
    const whole = value / NANO;
    const frac = (value % NANO).toString().padStart(9, "0").replace(/0+$/, "");
    return sign + whole.toString() + (frac ? "." + frac : "");
  }

  function formatGram(nano) {
    return formatAmount(nano) + " GRAM";
  }

  function signedGram(nano) {
    return (BigInt(nano) > 0n ? "+" : "") + formatGram(nano);
  }

  // The amount grammar of backend/money.py, rule for rule: ASCII digits, at most one decimal
  // separator (a comma only where the language writes one), at most 9 decimals, nothing else
  // but an optional "GRAM" or "TON" after it. {nano} or {problem}.
  function parseAmount(text, comma) {
    const useComma = comma === undefined ? config.decimalComma : comma;
    if (text.length > 40) return { problem: "format" };
    const raw = text.trim().replace(/\s*(gram|ton)$/i, "");
    if (!raw) return { problem: "empty" };
    const match = /^([0-9]*)(?:([.,])([0-9]*))?$/.exec(raw);
    if (!match || !(match[1] || match[3])) return { problem: "format" };
    if (match[2] === "," && !useComma) return { problem: "comma" };
    const frac = match[3] || "";
    if (frac.length > 9) return { problem: "precision" };
    const nano = BigInt(match[1] || "0") * NANO + BigInt(frac.padEnd(9, "0"));
    if (nano <= 0n) return { problem: "not_positive" };
    if (nano > MAX_NANO) return { problem: "too_large" };
    return { nano: nano.toString() };
  }

  function formatDate(iso, options) {
    try {
      return new Date(iso).toLocaleString(config.lang, options || { dateStyle: "medium", timeStyle: "short" });
    } catch (error) {
      return iso;
    }
  }

  // ------------------------------------------------------------------------- errors

  // A refusal in the page's language, from the stable code and details the API answers with;
  // the server's own sentence (in the page's language too) only where the page has no words.
  class ApiError extends Error {
    constructor(status, code, message, details) {
      super(message);
      this.status = status;
      this.code = code;
      this.details = details || {};
    }
  }

  function errorText(code, details, fallback) {
    const d = details || {};
    if (code === "invalid_amount" && d.problem) return t("amount_" + d.problem);
    const key = "err_" + code;
    if (!Object.prototype.hasOwnProperty.call(strings, key)) return fallback || t("error");
    const values = {};
    for (const name of ["minimum", "available", "needed"]) {
      if (d[name] !== undefined) values[name] = formatGram(d[name]);
    }
    if (d.limit !== undefined) values.limit = d.limit;
    const text = t(key, values);
    if (/\{[a-z_]+\}/.test(text)) return fallback || t("error"); // words it cannot fill
    return text;
  }

  // ------------------------------------------------------------------------- the API

  function initData() {
    return (tg && tg.initData) || config.devInitData || "";
  }

  let online = true;
  function setOnline(value) {
    if (online === value) return;
    online = value;
    $("offline-banner").hidden = value;
    if (value) for (const view of Object.values(views)) if (view.started && view.online) view.online();
  }
  window.addEventListener("online", () => setOnline(true));
  window.addEventListener("offline", () => setOnline(false));

  async function request(path, options) {
    const opts = options || {};
    const headers = { Authorization: "tma " + initData(), "X-Cocoon-Language": config.lang };
    let body;
    if (opts.body !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(opts.body);
    }
    let response;
    try {
      response = await fetch(config.api + path, {
        method: opts.method || "GET",
        headers: headers,
        body: body,
        signal: opts.signal,
      });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      setOnline(false);
      throw new ApiError(0, "offline", t("offline_network"));
    }
    return answer(response, opts);
  }

  async function answer(response, opts) {
    setOnline(true);
    if (!response.ok) {
      let code = "http_" + response.status;
      let message = t("error");
      let details = {};
      try {
        const payload = await response.json();
        code = payload.error.code;
        details = payload.error.details || {};
        message = errorText(code, details, payload.error.message);
      } catch (error) {
        // not our JSON (a proxy's page): the generic words
      }
      if (response.status === 401) endSession(message);
      throw new ApiError(response.status, code, message, details);
    }
    return opts.raw ? response : response.json();
  }

  // A streamed body (a `raw: true` answer), one record at a time: the text before each
  // `separator` ("\n" for NDJSON, "\n\n" for Server-Sent Events); an unfinished last one is not.
  async function* records(response, separator) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf(separator)) >= 0) {
        yield buffer.slice(0, end);
        buffer = buffer.slice(end + separator.length);
      }
    }
  }

  // An expired or refused session: one clean screen with a way back, nothing half-working.
  function endSession(message) {
    $("session-reopen").onclick = () => (inTelegram ? tg.close() : window.location.reload());
    $("session-reason").textContent = message;
    $("session-screen").hidden = false;
    $("main").hidden = true;
    document.querySelector("nav.tabs").hidden = true;
    if (inTelegram) tg.MainButton.hide();
  }

  // ---------------------------------------------------------------------- page bits

  // An error a view could not show itself, as a toast; not when the offline banner or the
  // session screen already says it.
  function quietly(error) {
    if (error && error.status !== 401 && error.code !== "offline") toast(error.message);
  }

  let toastTimer = null;
  function toast(message) {
    const box = $("toast");
    box.textContent = message;
    box.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => (box.hidden = true), 5000);
  }

  function status(element, message, kind) {
    element.textContent = message;
    element.hidden = !message;
    element.dataset.kind = kind || "info";
  }

  // A failed request of an amount form: the amount refused is said under its field
  // (`fieldError`), anything else in the form's `statusLine`.
  function amountError(error, fieldError, statusLine) {
    if (error.code === "invalid_amount") {
      fieldError.textContent = error.message;
      fieldError.hidden = false;
    } else {
      status(statusLine, error.message, "error");
    }
  }

  function haptic(kind) {
    if (inTelegram && tg.HapticFeedback && tg.isVersionAtLeast("6.1")) {
      tg.HapticFeedback.notificationOccurred(kind);
    }
  }

  // Top-ups sent from this device and not yet seen credited: [{amount, at}] (Wallet writes
  // them, History shows them as pending rows that can be dismissed).
  const PENDING = "cocoon.pending-topups";
  function pendingTopUps() {
    try {
      return JSON.parse(localStorage.getItem(PENDING) || "[]");
    } catch (error) {
      return [];
    }
  }
  function savePending(list) {
    localStorage.setItem(PENDING, JSON.stringify(list.slice(-10)));
  }

  async function copy(text) {
    try {
      await navigator.clipboard.writeText(text);
    } catch (error) {
      const area = document.createElement("textarea");
      area.value = text;
      document.body.appendChild(area);
      area.select();
      document.execCommand("copy");
      area.remove();
    }
    haptic("success");
    toast(t("copied"));
  }

  // Telegram's MainButton carries the view's main action inside Telegram; in a browser the
  // view's own button does. mainAction(button, text, enabled, handler) keeps both in step.
  let mainHandler = null;
  let mainOwner = null;
  function mainAction(button, text, enabled, handler) {
    button.textContent = text;
    button.disabled = !enabled;
    if (handler) mainHandler = handler;
    mainOwner = button;
    if (!inTelegram) return;
    button.hidden = true;
    tg.MainButton.setParams({ text: text, is_visible: true, is_active: enabled });
  }
  function mainProgress(button, busy) {
    button.classList.toggle("busy", busy);
    if (!inTelegram) return;
    if (busy) tg.MainButton.showProgress(false);
    else tg.MainButton.hideProgress();
  }

  // -------------------------------------------------------------------------- theme

  // The page on secondary_bg_color, sections on section_bg_color (app.css); the header, the
  // background behind the page and the bottom bar in the same colours. A theme that gives
  // sections the page's own colour gets sections lifted a little, so cards never vanish.
  function applyTheme() {
    const root = document.documentElement;
    const theme = (tg && tg.themeParams) || {};
    const page = theme.secondary_bg_color || theme.bg_color;
    const section = theme.section_bg_color || theme.bg_color;
    if (page && section && page.toLowerCase() === section.toLowerCase()) {
      root.style.setProperty("--section-lift", "color-mix(in srgb, " + section + " 92%, " + (theme.text_color || "#808080") + ")");
    } else {
      root.style.removeProperty("--section-lift");
    }
    root.dataset.scheme = scheme();
    if (inTelegram && tg.isVersionAtLeast("6.1")) {
      tg.setHeaderColor("secondary_bg_color");
      tg.setBackgroundColor("secondary_bg_color");
    }
    if (inTelegram && tg.isVersionAtLeast("7.10")) tg.setBottomBarColor("bottom_bar_bg_color");
    for (const listener of themeListeners) listener(scheme());
  }

  const themeListeners = [];
  function scheme() {
    if (inTelegram) return tg.colorScheme === "dark" ? "dark" : "light";
    return window.matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light";
  }

  // --------------------------------------------------------------------------- views

  const views = {}; // name -> {start, show, hide, online, started}
  let current = null;

  function view(name, handlers) {
    views[name] = Object.assign({ started: false }, handlers);
  }

  function link(path) {
    return config.langFixed ? path + "?lang=" + encodeURIComponent(config.lang) : path;
  }

  function viewOf(pathname) {
    for (const [name, path] of Object.entries(config.pages)) if (path === pathname) return name;
    return "wallet";
  }

  // Switch views in place: no request, no reload; the address follows (deep links work).
  function show(name, push) {
    if (!views[name] || name === current) return;
    const previous = current;
    current = name;
    for (const section of document.querySelectorAll("[data-view]")) {
      section.hidden = section.dataset.view !== name;
    }
    for (const anchor of document.querySelectorAll("nav.tabs a")) {
      if (anchor.dataset.tab === name) anchor.setAttribute("aria-current", "page");
      else anchor.removeAttribute("aria-current");
    }
    document.title = t("title_" + name) + " · Cocoon";
    if (push) history.pushState({ view: name }, "", link(config.pages[name]));
    if (previous && views[previous].hide) views[previous].hide();
    if (inTelegram) {
      tg.MainButton.hide();
      if (tg.isVersionAtLeast("6.1")) {
        if (name === "wallet") tg.BackButton.hide();
        else tg.BackButton.show();
      }
    }
    const v = views[name];
    if (!v.started) {
      v.started = true;
      Promise.resolve(v.start())
        .then(() => {
          // When the first view shows its data (the loading budget is measured to here).
          if (!performance.getEntriesByName("cocoon:first-data").length) performance.mark("cocoon:first-data");
        })
        .catch(quietly);
    } else if (v.show) {
      v.show();
    }
    window.scrollTo(0, 0);
  }

  function setUpNavigation() {
    for (const anchor of document.querySelectorAll("nav.tabs a")) {
      anchor.href = link(anchor.getAttribute("href"));
      anchor.addEventListener("click", (event) => {
        if (event.metaKey || event.ctrlKey || event.shiftKey) return;
        event.preventDefault();
        show(anchor.dataset.tab, true);
      });
    }
    window.addEventListener("popstate", () => show(viewOf(location.pathname), false));
  }

  function setUpTelegram() {
    if (!tg) return;
    tg.ready();
    applyTheme();
    if (!inTelegram) {
      window.matchMedia("(prefers-color-scheme: dark)").addEventListener("change", applyTheme);
      return;
    }
    tg.expand();
    tg.onEvent("themeChanged", applyTheme);
    if (tg.isVersionAtLeast("6.1")) tg.BackButton.onClick(() => show("wallet", true));
    // The MainButton acts for the view on screen only.
    tg.MainButton.onClick(() => {
      const owner = mainOwner && mainOwner.closest("[data-view]");
      if (mainHandler && owner && !owner.hidden) mainHandler();
    });
  }

  function languageFromTelegram() {
    const user = tg && tg.initDataUnsafe && tg.initDataUnsafe.user;
    const code = ((user && user.language_code) || "").toLowerCase().split(/[-_]/)[0];
    return config.languages.includes(code) ? code : null;
  }

  let mePromise = null;
  function me(refresh) {
    if (!mePromise || refresh) {
      // The first one was asked for by the page's head, before the scripts arrived.
      const boot = window.CocoonBoot;
      let loading;
      if (!refresh && boot && boot.me && boot.initData === initData()) {
        loading = boot.me.then((response) => (response ? answer(response, {}) : request("/me")));
        boot.me = null;
      } else {
        loading = request("/me");
      }
      mePromise = loading.then((value) => {
        $("tab-provider").hidden = !value.is_provider;
        return value;
      });
      mePromise.catch(() => (mePromise = null)); // a failed load is tried again next time
    }
    return mePromise;
  }

  // ------------------------------------------------------------------ scripts on demand

  const scripts = {};
  function loadScript(url) {
    if (!scripts[url]) {
      scripts[url] = new Promise((resolve, reject) => {
        const script = document.createElement("script");
        script.src = url;
        script.async = true;
        script.onload = resolve;
        script.onerror = () => {
          delete scripts[url];
          reject(new ApiError(0, "offline", t("offline_network")));
        };
        document.head.appendChild(script);
      });
    }
    return scripts[url];
  }

  // --------------------------------------------------------------------------- start

  function start() {
    const wanted = !config.langFixed && languageFromTelegram();
    if (wanted && wanted !== config.lang) {
      const url = new URL(window.location.href);
      url.searchParams.set("lang", wanted);
      window.location.replace(url.toString());
      return false;
    }
    setUpTelegram();
    setUpNavigation();
    if (!initData()) {
      $("auth-banner").textContent = t("open_in_telegram");
      $("auth-banner").hidden = false;
    }
    document.addEventListener("DOMContentLoaded", () => show(viewOf(location.pathname), false));
    return true;
  }

  window.Cocoon = {
    config,
    tg,
    inTelegram,
    t,
    formatAmount,
    formatGram,
    signedGram,
    parseAmount,
    formatDate,
    errorText,
    ApiError,
    request,
    records,
    me,
    view,
    show,
    loadScript,
    $,
    toast,
    quietly,
    status,
    amountError,
    haptic,
    copy,
    pendingTopUps,
    savePending,
    mainAction,
    mainProgress,
    scheme,
    onThemeChange: (listener) => themeListeners.push(listener),
    isOnline: () => online,
    ready: start(),
  };
})();
