// The Provider view: workers (TEE, attestation expiry, online, jobs, earnings),
// earnings, the payout wallet and withdrawals (the same rules as the bot's /withdraw).
(function () {
  "use strict";
  const C = window.Cocoon;
  if (!C.ready) return;
  const { $, t } = C;

  let board = null;
  let key = newKey();

  function newKey() {
    const bytes = new Uint8Array(12);
    window.crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function worker(w) {
    const li = document.createElement("li");
    li.className = "item";
    const head = document.createElement("div");
    head.className = "item-head";
    const name = document.createElement("code");
    name.textContent = w.worker_id;
    const state = document.createElement("span");
    state.className = w.online ? "pill pill-ok" : "pill";
    state.textContent = w.online ? t("online") : t("offline");
    head.append(name, state);
    const lines = [
      (w.model || "?") + " · " + (w.tee === "dev" ? t("tee_dev") : w.tee === "tdx" ? t("tee_tdx") : w.tee || "?"),
      w.attestation_expires_at ? t("attested_until", { date: C.formatDate(w.attestation_expires_at) }) : w.state,
      t("worker_jobs", { jobs: w.jobs, amount: C.formatGram(w.earned) }),
    ];
    li.append(head);
    for (const text of lines) {
      const line = document.createElement("div");
      line.className = "hint";
      line.textContent = text;
      li.append(line);
    }
    return li;
  }

  function hours(seconds) {
    const minutes = Math.floor(seconds / 60);
    return t("duration", { hours: Math.floor(minutes / 60), minutes: minutes % 60 });
  }

  function percent(bps) {
    return (bps / 100).toString(); // basis points: at most two decimals, exact in a double
  }

  // Per hour online, per 1M tokens, the fees and the next payout (backend/accounts/economics.py).
  function renderEconomics(x) {
    $("economics").hidden = !x;
    if (!x) return;
    $("econ-hour").textContent = x.per_hour === null
      ? t("econ_not_enough_online")
      : t("econ_per_hour", { amount: C.formatGram(x.per_hour), online: hours(x.online_s) });
    $("econ-million").textContent = x.per_million_tokens === null ? "—" : C.formatGram(x.per_million_tokens);
    $("econ-fees").textContent = t("econ_fees", { percent: percent(x.fee_bps), amount: C.formatGram(x.fees) });
    const next = x.next_payout;
    const at = next.at ? C.formatDate(next.at, { dateStyle: "medium", timeStyle: "short" }) : "";
    const words = {
      on_its_way: () => t("econ_next_on_its_way", { at }),
      ready: () => t("econ_next_ready"),
      after_online: () => t("econ_next_after", { online: hours(next.online_s || 0), at, minimum: C.formatGram(board.min_withdrawal) }),
      unknown: () => t("econ_next_unknown", { minimum: C.formatGram(board.min_withdrawal) }),
    };
    $("econ-next").textContent = (words[next.kind] || words.unknown)();
  }

  function render(value) {
    board = value;
    $("provider").hidden = false;
    $("earn-available").textContent = C.formatGram(board.earnings.available);
    $("earn-pending").textContent = C.formatGram(board.earnings.pending);
    $("earn-paid").textContent = C.formatGram(board.earnings.paid);
    $("earn-total").textContent = C.formatGram(board.earnings.earned);
    $("earn-jobs").textContent = String(board.earnings.jobs);
    renderEconomics(board.economics);
    $("payout-wallet").textContent = board.payout_wallet
      ? t("payout_wallet", { address: board.payout_wallet.address })
      : t("no_payout_wallet");
    $("min-withdrawal").textContent = t("min_withdrawal", { amount: C.formatGram(board.min_withdrawal) });
    $("workers").textContent = "";
    for (const w of board.workers) $("workers").appendChild(worker(w));
    if (board.workers.length === 0) {
      const empty = document.createElement("li");
      empty.className = "empty";
      empty.textContent = t("no_workers");
      $("workers").appendChild(empty);
    }
    C.mainAction($("withdraw"), t("withdraw"), Boolean(board.payout_wallet), withdraw);
  }

  async function load() {
    const me = await C.me();
    if (!me.is_provider) {
      $("not-provider").textContent = t("not_provider");
      $("not-provider").hidden = false;
      return;
    }
    render(await C.request("/provider"));
  }

  // The amount, checked as the server checks it ("all" too); the problem shows by the field.
  function checkAmount() {
    const amount = $("withdraw-amount").value.trim();
    const parsed = amount.toLowerCase() === "all" ? { nano: "all" } : C.parseAmount(amount);
    const error = $("withdraw-amount-error");
    const problem = amount && !parsed.nano ? t("amount_" + parsed.problem) : "";
    error.textContent = problem;
    error.hidden = !problem;
    $("withdraw-amount").setAttribute("aria-invalid", problem ? "true" : "false");
    return parsed.nano ? amount : null;
  }

  let withdrawing = false;
  async function withdraw() {
    const amount = checkAmount();
    if (!amount || withdrawing) return;
    withdrawing = true;
    C.mainProgress($("withdraw"), true);
    try {
      const payout = await C.request("/provider/withdraw", {
        method: "POST",
        body: { amount, key },
      });
      key = newKey();
      C.status($("withdraw-status"), t("withdraw_done", { amount: C.formatGram(payout.amount) }), "ok");
      C.haptic("success");
      $("withdraw-amount").value = "";
      await load();
    } catch (error) {
      C.amountError(error, $("withdraw-amount-error"), $("withdraw-status"));
    } finally {
      withdrawing = false;
      C.mainProgress($("withdraw"), false);
    }
  }

  async function linkPayout() {
    try {
      const linked = await C.connectWallet("payout");
      C.toast(t("payout_wallet", { address: linked.address }));
      await load();
    } catch (error) {
      if (error.code !== "cancelled") C.toast(error.message || t("error"));
    }
  }

  $("withdraw").addEventListener("click", withdraw);
  $("withdraw-all").addEventListener("click", () => {
    $("withdraw-amount").value = "all";
    checkAmount();
  });
  $("withdraw-amount").addEventListener("input", () => {
    key = newKey();
    checkAmount();
  });
  $("link-payout").addEventListener("click", linkPayout);
  $("link-payout").disabled = !C.config.tonconnect;
  C.view("provider", { start: load, show: () => load().catch(C.quietly) });
})();
