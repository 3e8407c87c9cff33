// The History view: top-ups, chat replies (model, tokens, cost) and payouts, grouped by day,
// each row opening its details; top-ups sent but not yet credited first, dismissible.
(function () {
  "use strict";
  const C = window.Cocoon;
  if (!C.ready) return;
  const { $, t, pendingTopUps } = C;

  let kind = "";
  let cursor = null; // where the next page starts (the server's opaque cursor)
  let page = 0; // pages loaded, when the server pages by number
  let lastDay = null;
  let loading = null;

  function dayOf(iso) {
    const date = new Date(iso);
    const today = new Date();
    const yesterday = new Date(today.getTime() - 86400000);
    const same = (a, b) => a.toDateString() === b.toDateString();
    if (same(date, today)) return t("today");
    if (same(date, yesterday)) return t("yesterday");
    return C.formatDate(iso, { dateStyle: "long" });
  }

  // USDT micro-units (10^-6) as decimal USDT, exactly.
  function usdt(micro) {
    const units = BigInt(micro);
    const whole = units / 1000000n;
    const fraction = (units % 1000000n).toString().padStart(6, "0").replace(/0+$/, "");
    return fraction ? whole + "." + fraction : whole.toString();
  }

  function summary(item) {
    const d = item.details || {};
    if (item.kind === "deposit" && d.usdt_micro != null) return usdt(d.usdt_micro) + " " + t("source_usdt");
    if (item.kind === "deposit") return t("source_" + (d.source || "ton"));
    if (item.kind === "turn") return d.model || "";
    return t("state_" + d.state);
  }

  function facts(item) {
    const d = item.details || {};
    const rows = [[t("detail_amount"), C.signedGram(item.amount)]];
    if (item.kind === "deposit") {
      rows.push([t("detail_fee"), t("detail_fee_none")]);
      if (d.usdt_micro != null && d.nano_per_micro != null) {
        const rate = (BigInt(d.nano_per_micro) * 1000000n).toString();
        rows.push([t("source_usdt"), t("usdt_details", { usdt: usdt(d.usdt_micro), rate: C.formatGram(rate) })]);
      }
      if (d.tx_hash) rows.push([t("detail_tx"), d.tx_hash, d.tx_url]);
    } else if (item.kind === "turn") {
      rows.push([t("detail_model"), d.model || ""]);
      rows.push([t("detail_tokens"), t("tokens_value", { prompt: d.prompt_tokens, completion: d.completion_tokens })]);
      if (d.receipt) rows.push([t("detail_receipt"), d.receipt]);
    } else {
      rows.push([t("detail_to"), d.destination || ""]);
      rows.push([t("detail_state"), t("state_" + d.state)]);
      if (d.tx_hash) rows.push([t("detail_tx"), d.tx_hash, d.tx_url]);
    }
    const list = document.createElement("dl");
    list.className = "facts item-details";
    for (const [name, value, url] of rows) {
      const dt = document.createElement("dt");
      dt.textContent = name;
      const dd = document.createElement("dd");
      if (url) {
        const a = document.createElement("a");
        a.href = url;
        a.target = "_blank";
        a.rel = "noopener";
        a.textContent = t("detail_open_tx");
        a.addEventListener("click", (event) => {
          if (!C.inTelegram) return;
          event.preventDefault(); // Telegram opens outside links in its own browser
          C.tg.openLink(url);
        });
        dd.append(a);
      } else {
        dd.textContent = value;
        if (name === t("detail_to") || name === t("detail_receipt")) dd.className = "mono";
      }
      list.append(dt, dd);
    }
    return list;
  }

  function row(item, pending) {
    const li = document.createElement("div");
    li.className = "item item-" + item.kind + (pending ? " item-pending" : "");
    li.dataset.kind = item.kind;
    li.setAttribute("role", "listitem");
    const open = document.createElement("button");
    open.type = "button";
    open.className = "item-open";
    open.setAttribute("aria-expanded", "false");
    const head = document.createElement("div");
    head.className = "item-head";
    const title = document.createElement("span");
    title.textContent = t("kind_" + item.kind);
    const amount = document.createElement("span");
    amount.className = "item-amount " + (BigInt(item.amount) >= 0n ? "plus" : "minus");
    amount.textContent = C.signedGram(item.amount);
    head.append(title, amount);
    const sub = document.createElement("div");
    sub.className = "hint";
    const time = C.formatDate(item.at, { timeStyle: "short" });
    sub.textContent = pending ? t("pending") + " · " + time : time + " · " + summary(item);
    open.append(head, sub);
    li.append(open);
    open.addEventListener("click", () => {
      const shown = li.querySelector(".item-details");
      if (shown) shown.remove();
      else li.append(facts(item));
      open.setAttribute("aria-expanded", shown ? "false" : "true");
    });
    if (pending) {
      const dismiss = document.createElement("button");
      dismiss.type = "button";
      dismiss.className = "link-button";
      dismiss.textContent = t("dismiss");
      dismiss.addEventListener("click", () => {
        C.savePending(pendingTopUps().filter((p) => p.at !== item.at));
        li.remove();
      });
      li.append(dismiss);
    }
    return li;
  }

  function add(item, pending) {
    const list = $("history-list");
    const day = dayOf(item.at);
    if (day !== lastDay) {
      const previous = list.lastElementChild;
      if (previous && previous.classList.contains("item")) previous.classList.add("last");
      const heading = document.createElement("h3");
      heading.className = "day";
      heading.textContent = day;
      list.append(heading);
      lastDay = day;
    }
    list.append(row(item, pending));
  }

  async function load(reset) {
    if (loading) return loading;
    const list = $("history-list");
    if (reset) {
      cursor = null;
      page = 0;
      lastDay = null;
      list.textContent = "";
      if (!kind || kind === "deposit") {
        for (const p of pendingTopUps()) add({ kind: "deposit", at: p.at, amount: p.amount, details: {} }, true);
      }
    }
    const query = new URLSearchParams();
    if (cursor) query.set("cursor", cursor);
    else query.set("page", String(page + 1));
    if (kind) query.set("kind", kind);
    list.setAttribute("aria-busy", "true");
    loading = C.request("/history?" + query.toString());
    try {
      const result = await loading;
      page += 1;
      cursor = result.next_cursor || null;
      for (const item of result.items) add(item, false);
      if (!list.querySelector(".item")) {
        const empty = document.createElement("p");
        empty.className = "empty";
        empty.textContent = t("history_empty");
        list.append(empty);
      }
      $("history-more").hidden = !result.has_more;
    } finally {
      loading = null;
      list.setAttribute("aria-busy", "false");
    }
  }

  function select(chip) {
    kind = chip.dataset.kind;
    for (const other of $("history-filter").children) {
      const on = other === chip;
      other.setAttribute("aria-selected", on ? "true" : "false");
      other.tabIndex = on ? 0 : -1;
    }
    load(true).catch(C.quietly);
  }

  const chips = Array.from($("history-filter").children);
  chips.forEach((chip, index) => {
    chip.tabIndex = index === 0 ? 0 : -1;
    chip.addEventListener("click", () => select(chip));
    chip.addEventListener("keydown", (event) => {
      const step = event.key === "ArrowRight" ? 1 : event.key === "ArrowLeft" ? -1 : 0;
      if (!step) return;
      const next = chips[(index + step + chips.length) % chips.length];
      next.focus();
      select(next);
    });
  });
  $("history-more").addEventListener("click", () => load(false).catch(C.quietly));

  function showBalance(me) {
    const balance = $("history-balance");
    balance.classList.remove("skeleton");
    balance.textContent = C.formatGram(me.balance.available);
  }

  C.view("history", {
    async start() {
      const [me] = await Promise.all([C.me(), load(true)]);
      showBalance(me);
    },
    show() {
      C.me(true).then(showBalance).catch(() => {});
      load(true).catch(C.quietly);
    },
    online() {
      load(true).catch(() => {});
    },
  });
})();
