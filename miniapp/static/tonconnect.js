// TON Connect for the views that pay or link a wallet: @tonconnect/ui, loaded on first use,
// in the page's theme; a wallet is linked with a ton_proof the server verifies.
(function () {
  "use strict";
  const C = window.Cocoon;
  if (!C.ready) return;
  const { config, t, ApiError, request } = C;

  let tonConnectUI = null;
  let linking = null; // {purpose, resolve, reject} while a connect with ton_proof runs
  const walletListeners = [];

  // The TON Connect UI, loaded on first use (only the views that pay or link a wallet).
  async function tonConnect() {
    if (tonConnectUI) return tonConnectUI;
    if (!config.tonconnectUrl) return null;
    await C.loadScript(config.tonconnectUrl);
    if (tonConnectUI) return tonConnectUI;
    tonConnectUI = new window.TON_CONNECT_UI.TonConnectUI({
      manifestUrl: config.manifestUrl || window.location.origin + "/tonconnect-manifest.json",
      language: config.lang === "ru" ? "ru" : "en",
      analytics: { mode: "off" },
      uiPreferences: { theme: C.scheme() === "dark" ? "DARK" : "LIGHT" },
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
    await tonConnectUI.connectionRestored;
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
    const ui = await tonConnect();
    if (!ui) throw new ApiError(0, "no_tonconnect", t("no_tonconnect"));
    if (ui.connected) await ui.disconnect();
    ui.setConnectRequestParameters({ state: "loading" });
    const { payload } = await request("/wallet/payload", { method: "POST" });
    ui.setConnectRequestParameters({ state: "ready", value: { tonProof: payload } });
    const done = new Promise((resolve, reject) => (linking = { purpose, resolve, reject }));
    await ui.openModal();
    return done;
  }

  C.onThemeChange((scheme) => {
    if (tonConnectUI) tonConnectUI.uiOptions = { uiPreferences: { theme: scheme === "dark" ? "DARK" : "LIGHT" } };
  });
  C.tonConnect = tonConnect;
  C.connectWallet = connectWallet;
  C.onWalletChange = (listener) => walletListeners.push(listener);
})();
