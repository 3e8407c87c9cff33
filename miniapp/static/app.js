// Cocoon Mini App: what every page shares. Telegram WebApp glue (theme, MainButton,
// BackButton), the authenticated JSON API, exact GRAM amounts, and TON Connect.
// No user-facing words here: they come translated from the server (#cocoon-strings).
(function () {
  "use strict";

  const config = JSON.parse(document.getElementById("cocoon-config").textContent);
  const strings = JSON.parse(document.getElementById("cocoon-strings").textContent);
  const tg = window.Telegram && window.Telegram.WebApp;
  const inTelegram = Boolean(tg && tg.platform && tg.platform !== "unknown");
  const NANO = 1000000000n;

  function t(key, values) {
    let text = Object.prototype.hasOwnProperty.call(strings, key) ? strings[key] : key;
    for (const [name, value] of Object.entries(values || {})) {
      text = text.split("{" + name + "}").join(String(value));
    }
    return text;
  }

  // ------------------------------------------------------------------ amounts (no floats)

  function formatGram(nano) {
    let value = BigInt(nano);
    const sign = value < 0n ? "\u2212" : ""; // a minus sign, not a hyphen
    if (value < 0n) value = -value;
    const whole = value / NANO;
    const frac = (value % NANO).toString().padStart(9, "0").replace(/0+$/, "");
    return sign + whole.toString() + (frac ? "." + frac : "") + " GRAM";
  }

  function formatDate(iso) {
    try {
      return new Date(iso).toLocaleString(config.lang, { dateStyle: "medium", timeStyle: "short" });
    } catch (error) {
      return iso;
    }
  }

  // ------------------------------------------------------------------------- the API

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  function initData() {
    return (tg && tg.initData) || config.devInitData || "";
  }

  async function request(path, options) {
    const opts = options || {};
    const headers = { Authorization: "tma " + initData() };
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
      throw new ApiError(0, "network", t("offline_network"));
    }
    if (!response.ok) {
      let code = "http_" + response.status;
      let message = t("error");
      try {
        const payload = await response.json();
        code = payload.error.code;
        message = payload.error.message;
      } catch (error) {
        // not our JSON: keep the generic message
      }
      if (response.status === 401) showAuthProblem(message);
      throw new ApiError(response.status, code, message);
    }
    return opts.raw ? response : response.json();
  }

  function showAuthProblem(message) {
    const banner = document.getElementById("auth-banner");
    banner.textContent = message;
    banner.hidden = false;
  }

  // ---------------------------------------------------------------------- page bits

  function $(id) {
    return document.getElementById(id);
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

  function haptic(kind) {
    if (inTelegram && tg.HapticFeedback && tg.isVersionAtLeast("6.1")) {
      tg.HapticFeedback.notificationOccurred(kind);
    }
  }

  // Telegram's MainButton carries the page's main action inside Telegram; in a browser the
  // page's own button does. mainAction(button, text, enabled) keeps both in step.
  let mainHandler = null;
  function mainAction(button, text, enabled, handler) {
    button.textContent = text;
    button.disabled = !enabled;
    if (handler) mainHandler = handler;
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

  function languageFromTelegram() {
    const user = tg && tg.initDataUnsafe && tg.initDataUnsafe.user;
    const code = ((user && user.language_code) || "").toLowerCase().split(/[-_]/)[0];
    return config.languages.includes(code) ? code : null;
  }

  function link(path) {
    return config.langFixed ? path + "?lang=" + encodeURIComponent(config.lang) : path;
  }

  function setUpTelegram() {
    if (!tg) return;
    tg.ready();
    if (!inTelegram) return;
    tg.expand();
    if (config.page !== "wallet" && tg.isVersionAtLeast("6.1")) {
      tg.BackButton.show();
      tg.BackButton.onClick(() => (window.location.href = link(config.pages.wallet)));
    }
    tg.MainButton.onClick(() => mainHandler && mainHandler());
  }

  function setUpNavigation() {
    for (const anchor of document.querySelectorAll("nav.tabs a")) {
      anchor.href = link(anchor.getAttribute("href"));
      if (anchor.dataset.tab === config.page) anchor.setAttribute("aria-current", "page");
    }
  }

  let mePromise = null;
  function me(refresh) {
    if (!mePromise || refresh) {
      mePromise = request("/me").then((value) => {
        $("tab-provider").hidden = !value.is_provider;
        return value;
      });
    }
    return mePromise;
  }

  // ---------------------------------------------------------------------- TON Connect

  let tonConnectUI = null;
  let linking = null; // {purpose, resolve, reject} while a connect with ton_proof runs
  const walletListeners = [];

  function tonConnect() {
    if (tonConnectUI) return tonConnectUI;
    if (!window.TON_CONNECT_UI) return null;
    tonConnectUI = new window.TON_CONNECT_UI.TonConnectUI({
      manifestUrl: config.manifestUrl || window.location.origin + "/tonconnect-manifest.json",
      language: config.lang === "ru" ? "ru" : "en",
      analytics: { mode: "off" },
      uiPreferences: { theme: tg && tg.colorScheme === "dark" ? "DARK" : "LIGHT" },
    });
    tonConnectUI.onStatusChange(onWallet, (error) => {
      if (linking) linking.reject(error);
      linking = null;
    });
    tonConnectUI.onModalStateChange((state) => {
      if (state.status === "closed" && linking && !tonConnectUI.connected) {
        linking.reject(new ApiError(0, "cancelled", ""));
        linking = null;
      }
    });
    return tonConnectUI;
  }

  async function onWallet(wallet) {
    for (const listener of walletListeners) listener(wallet);
    if (!wallet || !linking) return;
    const current = linking;
    linking = null;
    const item = wallet.connectItems && wallet.connectItems.tonProof;
    if (!item || !("proof" in item)) {
      await tonConnectUI.disconnect();
      current.reject(new ApiError(400, "proof_refused", t("error")));
      return;
    }
    try {
      const linked = await request("/wallet", {
        method: "POST",
        body: { purpose: current.purpose, account: wallet.account, proof: item.proof },
      });
      current.resolve(linked);
    } catch (error) {
      await tonConnectUI.disconnect();
      current.reject(error);
    }
  }

  // Connect a wallet with a fresh single-use ton_proof payload; the server verifies the
  // proof and links the wallet (purpose "user" or "payout"). Resolves with the linked wallet.
  async function connectWallet(purpose) {
    const ui = tonConnect();
    if (!ui) throw new ApiError(0, "no_tonconnect", t("no_tonconnect"));
    if (ui.connected) await ui.disconnect();
    ui.setConnectRequestParameters({ state: "loading" });
    const { payload } = await request("/wallet/payload", { method: "POST" });
    ui.setConnectRequestParameters({ state: "ready", value: { tonProof: payload } });
    const done = new Promise((resolve, reject) => (linking = { purpose, resolve, reject }));
    await ui.openModal();
    return done;
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
    if (!initData()) showAuthProblem(t("open_in_telegram"));
    return true;
  }

  window.Cocoon = {
    config,
    tg,
    inTelegram,
    t,
    formatGram,
    formatDate,
    ApiError,
    request,
    me,
    $,
    toast,
    status,
    haptic,
    mainAction,
    mainProgress,
    tonConnect,
    connectWallet,
    onWalletChange: (listener) => walletListeners.push(listener),
    ready: start(),
  };
})();
