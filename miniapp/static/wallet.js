// The wallet page: balance, the linked TON wallet, top-ups in GRAM and in Telegram Stars.
(function () {
  "use strict";
  const C = window.Cocoon;
  if (!C.ready) return;
  const { $, t } = C;

  let me = null;
  let choice = ""; // decimal GRAM text of the chosen amount
  let waiting = null; // {before, timer, deadline} while a top-up is on its way
  let resumeTopUp = false;

  function render(value) {
    me = value;
    $("balance").textContent = C.formatGram(me.balance.available);
    const held = BigInt(me.balance.held);
    $("held").hidden = held === 0n;
    $("held").textContent = t("held", { amount: C.formatGram(me.balance.held) });
    $("memo").textContent = me.deposit_memo;
    if (me.wallet) {
      $("wallet-address").textContent = me.wallet.address;
      $("wallet-address").dataset.raw = me.wallet.raw;
    } else {
      $("wallet-address").textContent = t("not_linked");
      delete $("wallet-address").dataset.raw;
    }
    $("connect").hidden = Boolean(me.wallet);
    $("disconnect").hidden = !me.wallet;
    $("topup-card").hidden = !me.topup.ton;
    $("stars-card").hidden = !me.topup.stars;
  }

  function renderPresets() {
    const box = $("topup-presets");
    box.textContent = "";
    for (const preset of me.topup.presets) {
      const chip = document.createElement("button");
      chip.type = "button";
      chip.className = "chip";
      chip.textContent = preset + " GRAM";
      chip.dataset.amount = preset;
      chip.addEventListener("click", () => {
        $("topup-amount").value = preset;
        choose(preset);
      });
      box.appendChild(chip);
    }
    const stars = $("stars-presets");
    stars.textContent = "";
    for (const count of me.topup.stars_presets) {
      const chip = document.createElement("button");
      chip.type = "button";
      chip.className = "chip";
      chip.dataset.stars = String(count);
      const nano = BigInt(me.topup.nano_per_star) * BigInt(count);
      chip.textContent = t("stars_chip", { stars: count, amount: C.formatGram(nano.toString()) });
      chip.addEventListener("click", () => payStars(count));
      stars.appendChild(chip);
    }
  }

  function choose(text) {
    choice = text.trim();
    for (const chip of $("topup-presets").children) {
      chip.classList.toggle("chip-active", chip.dataset.amount === choice);
    }
    const valid = /^\d+([.,]\d{1,9})?$/.test(choice) && !/^0+([.,]0*)?$/.test(choice);
    const label = valid ? t("top_up", { amount: choice.replace(",", ".") + " GRAM" }) : t("top_up_choose");
    C.mainAction($("topup-send"), label, valid && !waiting, topUp);
  }

  async function refresh() {
    render(await C.me(true));
  }

  // ------------------------------------------------------------------ wallet linking

  async function connect(purposeAfter) {
    const button = $("connect");
    button.disabled = true;
    C.status($("topup-status"), "");
    try {
      const linked = await C.connectWallet("user");
      C.toast(t("linked", { address: linked.address }));
      C.haptic("success");
      await refresh();
      if (purposeAfter) await topUp();
    } catch (error) {
      if (error.code !== "cancelled") C.toast(error.message || t("error"));
    } finally {
      button.disabled = false;
    }
  }

  async function disconnect() {
    const ui = C.tonConnect();
    if (ui && ui.connected) await ui.disconnect();
    render(await C.request("/wallet", { method: "DELETE" }));
    C.toast(t("unlinked"));
  }

  // -------------------------------------------------------------------------- top-up

  async function topUp() {
    if (!choice || waiting) return;
    const ui = C.tonConnect();
    if (!ui) {
      C.status($("topup-status"), t("no_tonconnect"), "error");
      return;
    }
    if (!ui.connected || !me.wallet) {
      C.status($("topup-status"), t("connect_first"));
      resumeTopUp = true;
      await connect(true);
      return;
    }
    resumeTopUp = false;
    const button = $("topup-send");
    C.mainProgress(button, true);
    let order;
    try {
      order = await C.request("/topup", { method: "POST", body: { amount: choice } });
    } catch (error) {
      C.mainProgress(button, false);
      C.status($("topup-status"), error.message, "error");
      return;
    }
    const before = BigInt(me.balance.available);
    try {
      await ui.sendTransaction(order.transaction);
    } catch (error) {
      C.mainProgress(button, false);
      C.status($("topup-status"), t("top_up_cancelled"), "error");
      return;
    }
    C.mainProgress(button, false);
    C.status($("topup-status"), t("top_up_sent", { amount: C.formatGram(order.amount) }), "pending");
    waitForCredit(before, "top_up_credited", $("topup-status"));
  }

  // Poll the balance until the watcher credits the deposit: no reload needed.
  function waitForCredit(before, message, element) {
    if (waiting) clearTimeout(waiting.timer);
    waiting = { before, deadline: Date.now() + 15 * 60 * 1000, timer: null };
    choose(choice);
    const tick = async () => {
      try {
        const value = await C.me(true);
        const now = BigInt(value.balance.available);
        if (now > waiting.before) {
          const added = (now - waiting.before).toString();
          waiting = null;
          render(value);
          C.status(element, t(message, { amount: C.formatGram(added), balance: C.formatGram(value.balance.available) }), "ok");
          C.haptic("success");
          choose(choice);
          return;
        }
      } catch (error) {
        // a lost poll is retried
      }
      if (Date.now() > waiting.deadline) {
        waiting = null;
        C.status(element, t("top_up_slow"));
        choose(choice);
        return;
      }
      waiting.timer = setTimeout(tick, 2000);
    };
    waiting.timer = setTimeout(tick, 1500);
  }

  // --------------------------------------------------------------------------- Stars

  async function payStars(stars) {
    const element = $("stars-status");
    let invoice;
    try {
      invoice = await C.request("/stars", { method: "POST", body: { stars } });
    } catch (error) {
      C.status(element, error.message, "error");
      return;
    }
    const before = BigInt(me.balance.available);
    if (C.inTelegram && C.tg.isVersionAtLeast("6.1")) {
      C.tg.openInvoice(invoice.invoice_url, (state) => {
        if (state === "paid") waitForCredit(before, "stars_credited", element);
        else if (state === "failed") C.status(element, t("stars_failed"), "error");
      });
    } else {
      window.open(invoice.invoice_url, "_blank", "noopener");
      C.status(element, t("stars_outside"));
    }
  }

  // --------------------------------------------------------------------------- start

  $("connect").addEventListener("click", () => connect(false));
  $("disconnect").addEventListener("click", () => disconnect().catch((e) => C.toast(e.message)));
  $("topup-amount").addEventListener("input", (event) => choose(event.target.value));
  $("topup-send").addEventListener("click", topUp);
  if (!window.TON_CONNECT_UI) $("connect").disabled = true;

  C.me()
    .then((value) => {
      render(value);
      renderPresets();
      choose("");
      C.tonConnect();
    })
    .catch((error) => C.toast(error.message));
})();
