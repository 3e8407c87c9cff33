// The Chat view: the same turns as the bot (holds, billing, sealed to an attested worker),
// streamed as NDJSON. The conversation lives only in this page's memory. What the user typed
// is never lost: a refusal puts it back and says how to fix it.
(function () {
  "use strict";
  const C = window.Cocoon;
  if (!C.ready) return;
  const { $, t } = C;

  let me = null;
  let history = []; // [{role, content}]
  let conversation = newId();
  let running = null; // {controller, turn, stopTimer} of the reply being streamed
  let follow = true; // the view follows the stream unless the user scrolled up

  function newId() {
    const bytes = new Uint8Array(16);
    window.crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  // ------------------------------------------------------------------------ the view

  function atBottom() {
    return window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 48;
  }
  window.addEventListener("scroll", () => {
    if (running) follow = atBottom();
  }, { passive: true });

  function keepInView() {
    if (follow) window.scrollTo(0, document.documentElement.scrollHeight);
  }

  function bubble(role, text) {
    const li = document.createElement("li");
    li.className = "message message-" + role;
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = role === "user" ? t("you") : t("assistant");
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    li.append(who, body);
    $("messages").appendChild(li);
    keepInView();
    return li;
  }

  function footnote(li, done) {
    const mark = document.createElement("div");
    const cost = C.formatGram(done.cost);
    if (done.finish_reason === "cancelled") {
      mark.className = "mark mark-stopped";
      mark.textContent = t("reply_stopped", { cost });
    } else if (done.finish_reason === "length") {
      mark.className = "mark mark-cut";
      mark.textContent = t("reply_cut", { cost });
    }
    const line = document.createElement("div");
    line.className = "hint cost";
    line.textContent = t("reply_cost", {
      cost,
      prompt: done.prompt_tokens,
      completion: done.completion_tokens,
      balance: C.formatGram(done.balance),
    });
    // The privacy report, as the bot's /privacy gives it: who answered, and the proof.
    const w = done.privacy;
    const privacy = document.createElement("details");
    privacy.className = "hint privacy";
    const summary = document.createElement("summary");
    summary.textContent = t(w.tee === "dev" ? "privacy_dev" : "privacy_tdx", { worker: w.worker_id });
    const lines = [
      w.tee === "dev" ? t("privacy_tee_dev") : t("privacy_tee_hw", { tee: w.tee.toUpperCase() }),
    ];
    if (w.image) lines.push(t("privacy_image", { image: w.image }));
    if (w.mrtd) lines.push(t("privacy_mrtd", { prefix: w.mrtd.slice(0, 16) }));
    lines.push(
      w.attested_until ? t("privacy_until", { when: C.formatDate(w.attested_until) }) : t("privacy_expired"),
      t("privacy_engine", { engine: w.engine, version: w.engine_version }),
    );
    if (w.off_machine) lines.push(t("privacy_off_machine"));
    lines.push(
      t("privacy_key", { fingerprint: w.key_fingerprint }),
      w.receipt_id ? t("privacy_verified", { receipt: w.receipt_id }) : t("privacy_unverified"),
    );
    privacy.append(summary);
    for (const text of lines) {
      const row = document.createElement("div");
      row.textContent = text;
      privacy.append(row);
    }
    if (mark.textContent) li.append(mark);
    li.append(line, privacy);
  }

  function showPrice() {
    const model = me.models.find((m) => m.id === $("model").value);
    if (!model) return;
    $("model-price").textContent = t("price", {
      prompt: C.formatGram(model.prompt),
      completion: C.formatGram(model.completion),
    });
  }

  function setRunning(value) {
    running = value;
    $("stop").hidden = !value;
    $("send").hidden = Boolean(value);
  }

  // A refusal: the message goes back into the composer, with the way to fix it.
  function refused(text, error) {
    $("prompt").value = text;
    const box = $("composer-error");
    box.textContent = "";
    let words = error.message;
    if (error.code === "message_too_long" && error.details.limit) words = t("fix_shorten", { limit: error.details.limit });
    if (error.code === "rate_limited" && error.details.retry_after) words = t("fix_wait", { seconds: error.details.retry_after });
    box.append(words);
    if (error.code === "insufficient_balance") {
      const fix = document.createElement("button");
      fix.type = "button";
      fix.className = "link-button";
      fix.textContent = t("fix_top_up");
      fix.addEventListener("click", () => C.show("wallet", true));
      box.append(" ", fix);
    }
    box.hidden = false;
  }

  async function send(event) {
    if (event) event.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || running) return;
    $("composer-error").hidden = true;
    const controller = new AbortController();
    setRunning({ controller, turn: null, stopTimer: null });
    follow = true;
    if (C.sealed && C.sealed.active()) { // sealed in this page (sealed.js): its own context
      $("prompt").value = "";
      try {
        await C.sealed.send(text, controller.signal);
      } finally {
        setRunning(null);
      }
      return;
    }
    history.push({ role: "user", content: text });
    let response;
    try {
      response = await C.request("/chat", {
        method: "POST",
        body: { model: $("model").value, messages: history, conversation },
        signal: controller.signal,
        raw: true,
      });
    } catch (error) {
      history.pop();
      setRunning(null);
      if (error.name !== "AbortError") refused(text, error);
      return;
    }
    $("prompt").value = ""; // taken: the message is in the conversation now
    bubble("user", text);
    const li = bubble("assistant", "");
    const body = li.querySelector(".text");
    li.classList.add("streaming");
    body.dataset.placeholder = t("thinking");
    let reply = "";
    let ended = false;
    try {
      for await (const line of C.records(response, "\n")) {
        if (!line.trim()) continue;
        const item = JSON.parse(line);
        if (item.type === "start") {
          running.turn = item.turn;
        } else if (item.type === "text") {
          reply += item.text;
          body.textContent = reply;
          keepInView();
        } else if (item.type === "done") {
          ended = true;
          C.markdown(body, reply);
          footnote(li, item);
          $("reply-announcer").textContent = reply; // read once, when it is whole
        } else if (item.type === "error") {
          ended = true;
          li.classList.add("failed");
          const note = document.createElement("div");
          note.className = "hint error";
          note.textContent = C.errorText(item.error.code, item.error.details, item.error.message);
          li.append(note);
        }
      }
      if (!ended) throw new C.ApiError(0, "offline", t("reply_lost"));
    } catch (error) {
      if (error.name !== "AbortError") {
        li.classList.add("failed");
        body.textContent = reply;
        const note = document.createElement("div");
        note.className = "hint error";
        note.textContent = t("reply_lost");
        li.append(note);
        if (!reply) $("prompt").value = text; // nothing came back: the question is kept
      }
    } finally {
      li.classList.remove("streaming");
      if (running && running.stopTimer) clearTimeout(running.stopTimer);
      setRunning(null);
      if (reply) history.push({ role: "assistant", content: reply });
      else history.pop(); // nothing came back: the question can be asked again
      keepInView();
    }
  }

  // Stop: the server ends the reply and still sends its cost; if it cannot be reached, the
  // stream is dropped (the server stops and bills the turn when its reader leaves).
  async function stop() {
    const current = running;
    if (!current) return;
    if (current.turn) {
      try {
        await C.request("/chat/stop", { method: "POST", body: { turn: current.turn } });
        current.stopTimer = setTimeout(() => current.controller.abort(), 10000);
        return;
      } catch (error) {
        // fall through: drop the stream
      }
    }
    current.controller.abort();
  }

  $("chat-form").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) send(event);
  });
  $("prompt").addEventListener("input", () => ($("composer-error").hidden = true));
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", () => {
    if (running) running.controller.abort();
    history = [];
    conversation = newId();
    $("messages").textContent = "";
  });
  $("model").addEventListener("change", () => {
    showPrice();
    C.request("/model", { method: "POST", body: { model: $("model").value } }).catch(C.quietly);
  });

  C.chatView = { bubble, keepInView }; // for the sealed chat (sealed.js)

  C.view("chat", {
    async start() {
      me = await C.me();
      $("model").textContent = "";
      for (const model of me.models) {
        const option = document.createElement("option");
        option.value = model.id;
        option.textContent = model.id;
        $("model").appendChild(option);
      }
      $("model").value = me.model;
      showPrice();
    },
  });
})();
