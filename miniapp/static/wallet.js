// The Wallet view: balance, the linked TON wallet, top-ups in GRAM (TON Connect, or a transfer
// by hand to the deposit address with its QR code) and in Telegram Stars.
(function () {
  "use strict";
  const C = window.Cocoon;
  if (!C.ready) return;
  const { $, t, pendingTopUps, savePending } = C;

  let me = null;
  let choice = null; // {nano} of the amount typed or chosen, or null
  let sending = false; // one top-up request at a time
  let starsBusy = false; // one Stars invoice per tap
  let watch = null; // {before, timer, element, message} while a credit is awaited

  // ----------------------------------------------------------------------- render

  function render(value) {
    me = value;
    const balance = $("balance");
    balance.classList.remove("skeleton");
    balance.textContent = C.formatGram(me.balance.available);
    const held = BigInt(me.balance.held);
    $("held").hidden = held === 0n;
    $("held").textContent = t("held", { amount: C.formatGram(me.balance.held) });
    $("memo").textContent = me.deposit_memo;
    $("wallet-address").textContent = me.wallet ? me.wallet.address : t("not_linked");
    $("wallet-address").classList.toggle("none", !me.wallet);
    if (me.wallet) $("wallet-address").dataset.raw = me.wallet.raw;
    else delete $("wallet-address").dataset.raw;
    $("connect").hidden = Boolean(me.wallet);
    $("disconnect").hidden = !me.wallet;
    $("connect").disabled = !C.config.tonconnect;
    $("topup-card").hidden = !me.topup.ton;
    $("stars-card").hidden = !me.topup.stars;
    $("usdt-card").hidden = !me.topup.usdt;
    if (me.topup.usdt) $("usdt-rate").textContent = t("usdt_rate", { amount: C.formatGram(me.topup.nano_per_usdt) });
    $("deposit-card").hidden = !me.topup.deposit_address;
    $("deposit-address").textContent = me.topup.deposit_address || "";
  }

  // A preset button at the end of `box`: its `label`, `onClick` when tapped.
  function chip(box, label, onClick) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "chip";
    button.textContent = label;
    button.addEventListener("click", onClick);
    box.appendChild(button);
    return button;
  }

  function renderPresets() {
    const box = $("topup-presets");
    box.textContent = "";
    for (const preset of me.topup.presets) {
      const gram = chip(box, preset + " GRAM", () => {
        $("topup-amount").value = preset;
        choose(preset, true);
      });
      gram.dataset.amount = preset;
    }
    const usdt = $("usdt-presets");
    usdt.textContent = "";
    for (const preset of me.topup.usdt_presets || []) {
      chip(usdt, preset + " USDT", () => {
        $("usdt-amount").value = preset;
      });
    }
    const stars = $("stars-presets");
    stars.textContent = "";
    for (const count of me.topup.stars_presets) {
      const nano = BigInt(me.topup.nano_per_star) * BigInt(count);
      const label = t("stars_chip", { stars: count, amount: C.formatGram(nano.toString()) });
      chip(stars, label, () => payStars(count)).dataset.stars = String(count);
    }
  }

  // The deposit address as a QR code (ton:// link with the amount-free transfer and the
  // comment), drawn by qrcode-generator, served by us and loaded only when shown.
  async function renderQr() {
    if (!me.topup.deposit_address || !C.config.qrcodeUrl) return;
    await C.loadScript(C.config.qrcodeUrl);
    const qr = window.qrcode(0, "M");
    qr.addData("ton://transfer/" + me.topup.deposit_address + "?text=" + encodeURIComponent(me.deposit_memo));
    qr.make();
    const box = $("deposit-qr");
    box.innerHTML = qr.createSvgTag({ cellSize: 4, margin: 0, scalable: true });
    box.hidden = false;
  }

  // The amount, checked as the server will check it; the problem is said next to the field.
  function choose(text, fromChip) {
    const parsed = C.parseAmount(text);
    choice = parsed.nano ? parsed : null;
    for (const chip of $("topup-presets").children) {
      chip.classList.toggle("chip-active", Boolean(choice) && chip.dataset.amount === text.trim());
    }
    const error = $("topup-amount-error");
    const show = !choice && text.trim() !== "" && !fromChip;
    error.hidden = !show;
    error.textContent = show ? t("amount_" + parsed.problem) : "";
    $("topup-amount").setAttribute("aria-invalid", show ? "true" : "false");
    const label = choice ? t("top_up", { amount: C.formatGram(choice.nano) }) : t("top_up_choose");
    C.mainAction($("topup-send"), label, Boolean(choice) && !sending, topUp);
  }

  async function refresh() {
    render(await C.me(true));
  }

  // ------------------------------------------------------------------ wallet linking

  async function connect(thenTopUp) {
    const button = $("connect");
    button.disabled = true;
    C.status($("topup-status"), "");
    try {
      const linked = await C.connectWallet("user");
      C.toast(t("linked", { address: linked.address }));
      C.haptic("success");
      await refresh();
      if (thenTopUp) await topUp();
    } catch (error) {
      if (error.code !== "cancelled") C.toast(error.message || t("error"));
    } finally {
      button.disabled = !C.config.tonconnect;
    }
  }

  async function disconnect() {
    const ui = await C.tonConnect();
    if (ui && ui.connected) await ui.disconnect();
    render(await C.request("/wallet", { method: "DELETE" }));
    C.toast(t("unlinked"));
  }

  // -------------------------------------------------------------------------- top-up

  async function topUp() {
    if (!choice || sending) return;
    sending = true;
    const button = $("topup-send");
    C.mainProgress(button, true);
    choose($("topup-amount").value || choice.nano, true);
    try {
      const ui = await C.tonConnect();
      if (!ui) {
        C.status($("topup-status"), t("no_tonconnect"), "error");
        return;
      }
      if (!ui.connected || !me.wallet) {
        C.status($("topup-status"), t("connect_first"));
        sending = false;
        await connect(true);
        return;
      }
      let order;
      try {
        order = await C.request("/topup", { method: "POST", body: { amount: $("topup-amount").value || C.formatAmount(choice.nano) } });
      } catch (error) {
        C.amountError(error, $("topup-amount-error"), $("topup-status"));
        return;
      }
      const before = BigInt(me.balance.available);
      try {
        await ui.sendTransaction(order.transaction);
      } catch (error) {
        C.status($("topup-status"), t("top_up_cancelled"), "error");
        return;
      }
      savePending(pendingTopUps().concat([{ amount: order.amount, at: new Date().toISOString() }]));
      C.status($("topup-status"), t("top_up_sent", { amount: C.formatGram(order.amount) }), "pending");
      awaitCredit(before, "top_up_credited", $("topup-status"));
    } finally {
      sending = false;
      C.mainProgress(button, false);
      choose($("topup-amount").value, true);
    }
  }

  // Poll the balance until the credit shows: no reload needed. A top-up that is slow can be
  // dismissed; it is still credited when it lands.
  function awaitCredit(before, message, element) {
    if (watch) clearTimeout(watch.timer);
    watch = { before, message, element, timer: null, deadline: Date.now() + 15 * 60 * 1000 };
    $("topup-pending").hidden = element !== $("topup-status");
    const tick = async () => {
      const current = watch;
      if (!current) return;
      try {
        const value = await C.me(true);
        const now = BigInt(value.balance.available);
        if (now > current.before) {
          const added = (now - current.before).toString();
          stopWaiting();
          savePending([]);
          render(value);
          C.status(current.element, t(current.message, { amount: C.formatGram(added), balance: C.formatGram(value.balance.available) }), "ok");
          C.haptic("success");
          return;
        }
      } catch (error) {
        // a lost poll is tried again
      }
      if (Date.now() > current.deadline) {
        stopWaiting();
        C.status(current.element, t("top_up_slow"));
        return;
      }
      current.timer = setTimeout(tick, 2000);
    };
    watch.timer = setTimeout(tick, 1500);
  }

  function stopWaiting() {
    if (watch) clearTimeout(watch.timer);
    watch = null;
    $("topup-pending").hidden = true;
  }

  // ---------------------------------------------------------------------------- USDT

  // The wallet signs a jetton transfer to its own USDT jetton wallet, which sends the USDT
  // to the deposit wallet with the memo; the server builds it and credits it on arrival.
  async function topUpUsdt() {
    if (sending) return;
    const element = $("usdt-status");
    const amount = $("usdt-amount").value.trim();
    if (!amount) return;
    sending = true;
    $("usdt-send").disabled = true;
    try {
      const ui = await C.tonConnect();
      if (!ui) {
        C.status(element, t("no_tonconnect"), "error");
        return;
      }
      if (!ui.connected || !me.wallet) {
        C.status(element, t("connect_first"));
        sending = false;
        await connect(false);
        return;
      }
      let order;
      try {
        order = await C.request("/topup/usdt", { method: "POST", body: { amount } });
      } catch (error) {
        C.status(element, error.message, "error");
        return;
      }
      const before = BigInt(me.balance.available);
      try {
        await ui.sendTransaction(order.transaction);
      } catch (error) {
        C.status(element, t("top_up_cancelled"), "error");
        return;
      }
      C.status(element, t("usdt_sent", { usdt: order.usdt, amount: C.formatGram(order.amount) }), "pending");
      awaitCredit(before, "top_up_credited", element);
    } finally {
      sending = false;
      $("usdt-send").disabled = false;
    }
  }

  // --------------------------------------------------------------------------- Stars

  async function payStars(stars) {
    if (starsBusy) return; // a double tap opens one invoice
    starsBusy = true;
    const chips = Array.from($("stars-presets").children);
    for (const chip of chips) chip.disabled = true;
    const element = $("stars-status");
    const release = () => {
      starsBusy = false;
      for (const chip of chips) chip.disabled = false;
    };
    let invoice;
    try {
      invoice = await C.request("/stars", { method: "POST", body: { stars } });
    } catch (error) {
      C.status(element, error.message, "error");
      release();
      return;
    }
    const before = BigInt(me.balance.available);
    if (C.inTelegram && C.tg.isVersionAtLeast("6.1")) {
      C.tg.openInvoice(invoice.invoice_url, (state) => {
        release();
        if (state === "paid") awaitCredit(before, "stars_credited", element);
        else if (state === "failed") C.status(element, t("stars_failed"), "error");
      });
    } else {
      window.open(invoice.invoice_url, "_blank", "noopener");
      C.status(element, t("stars_outside"));
      release();
    }
  }

  // --------------------------------------------------------------------------- start

  $("connect").addEventListener("click", () => connect(false));
  $("disconnect").addEventListener("click", () => disconnect().catch(C.quietly));
  $("topup-amount").addEventListener("input", (event) => choose(event.target.value, false));
  $("topup-send").addEventListener("click", topUp);
  $("usdt-send").addEventListener("click", () => topUpUsdt().catch(C.quietly));
  $("topup-dismiss").addEventListener("click", () => {
    stopWaiting();
    savePending([]);
    C.status($("topup-status"), t("top_up_dismissed"));
  });
  $("deposit-address").addEventListener("click", () => C.copy(me.topup.deposit_address));
  $("memo").addEventListener("click", () => C.copy(me.deposit_memo));

  C.view("wallet", {
    async start() {
      render(await C.me());
      renderPresets();
      choose($("topup-amount").value, true); // typed before the scripts arrived: kept
      renderQr().catch(() => {});
      if (C.config.tonconnect) setTimeout(() => C.tonConnect().catch(() => {}), 0);
    },
    show() {
      choose($("topup-amount").value, true);
      C.me(true).then(render).catch(C.quietly);
    },
    online() {
      C.me(true).then(render).catch(() => {});
    },
  });
})();
