// Balance and history: top-ups, chat replies (model, tokens, cost) and payouts, paged.
(function () {
  "use strict";
  const C = window.Cocoon;
  if (!C.ready) return;
  const { $, t } = C;

  let kind = "";
  let page = 0;

  function describe(item) {
    const d = item.details || {};
    if (item.kind === "deposit") return t("source_" + (d.source || "ton"));
    if (item.kind === "turn") {
      return t("turn_details", {
        model: d.model,
        prompt: d.prompt_tokens,
        completion: d.completion_tokens,
      });
    }
    return t("payout_details", { address: d.destination || "", state: t("state_" + d.state) });
  }

  function row(item) {
    const li = document.createElement("li");
    li.className = "item item-" + item.kind;
    li.dataset.kind = item.kind;
    const head = document.createElement("div");
    head.className = "item-head";
    const title = document.createElement("span");
    title.textContent = t("kind_" + item.kind);
    const amount = document.createElement("span");
    amount.className = "item-amount " + (BigInt(item.amount) >= 0n ? "plus" : "minus");
    amount.textContent = (BigInt(item.amount) > 0n ? "+" : "") + C.formatGram(item.amount);
    head.append(title, amount);
    const sub = document.createElement("div");
    sub.className = "hint";
    sub.textContent = C.formatDate(item.at) + " · " + describe(item);
    li.append(head, sub);
    return li;
  }

  async function load(reset) {
    if (reset) {
      page = 0;
      $("history-list").textContent = "";
    }
    page += 1;
    const query = "?page=" + page + (kind ? "&kind=" + kind : "");
    const result = await C.request("/history" + query);
    for (const item of result.items) $("history-list").appendChild(row(item));
    if (page === 1 && result.items.length === 0) {
      const empty = document.createElement("li");
      empty.className = "empty";
      empty.textContent = t("history_empty");
      $("history-list").appendChild(empty);
    }
    $("history-more").hidden = !result.has_more;
  }

  for (const chip of $("history-filter").children) {
    chip.addEventListener("click", () => {
      kind = chip.dataset.kind;
      for (const other of $("history-filter").children) {
        other.classList.toggle("chip-active", other === chip);
      }
      load(true).catch((error) => C.toast(error.message));
    });
  }
  $("history-more").addEventListener("click", () => load(false).catch((e) => C.toast(e.message)));

  C.me()
    .then((me) => {
      $("balance").textContent = C.formatGram(me.balance.available);
      return load(true);
    })
    .catch((error) => C.toast(error.message));
})();
