// The web chat: the same turns as the bot (holds, billing, sealed to an attested worker),
// streamed as NDJSON. The conversation lives only in this page's memory.
(function () {
  "use strict";
  const C = window.Cocoon;
  if (!C.ready) return;
  const { $, t } = C;

  let me = null;
  let history = []; // [{role, content}]
  let conversation = newId();
  let running = null; // AbortController of the reply being streamed

  function newId() {
    const bytes = new Uint8Array(16);
    window.crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
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
    li.scrollIntoView({ block: "end" });
    return li;
  }

  function footnote(li, done) {
    const cost = document.createElement("div");
    cost.className = "hint cost";
    cost.textContent = t("reply_cost", {
      cost: C.formatGram(done.cost),
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
      t("privacy_verified"),
    );
    privacy.append(summary);
    for (const text of lines) {
      const line = document.createElement("div");
      line.textContent = text;
      privacy.append(line);
    }
    li.append(cost, privacy);
  }

  function showPrice() {
    const model = me.models.find((m) => m.id === $("model").value);
    if (!model) return;
    $("model-price").textContent = t("price", {
      prompt: C.formatGram(model.prompt),
      completion: C.formatGram(model.completion),
    });
  }

  function setRunning(controller) {
    running = controller;
    $("stop").hidden = !controller;
    $("send").disabled = Boolean(controller);
    $("prompt").disabled = Boolean(controller);
  }

  async function send(event) {
    if (event) event.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || running) return;
    $("prompt").value = "";
    history.push({ role: "user", content: text });
    bubble("user", text);
    const li = bubble("assistant", "");
    const body = li.querySelector(".text");
    li.classList.add("streaming");
    body.dataset.placeholder = t("thinking");
    const controller = new AbortController();
    setRunning(controller);
    let reply = "";
    try {
      const response = await C.request("/chat", {
        method: "POST",
        body: { model: $("model").value, messages: history, conversation },
        signal: controller.signal,
        raw: true,
      });
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let newline;
        while ((newline = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, newline);
          buffer = buffer.slice(newline + 1);
          if (!line.trim()) continue;
          const event = JSON.parse(line);
          if (event.type === "text") {
            reply += event.text;
            body.textContent = reply;
          } else if (event.type === "done") {
            footnote(li, event);
          } else if (event.type === "error") {
            li.classList.add("failed");
            const note = document.createElement("div");
            note.className = "hint error";
            note.textContent = event.error.message;
            li.append(note);
          }
        }
      }
    } catch (error) {
      if (error.name !== "AbortError") {
        li.classList.add("failed");
        body.textContent = reply;
        const note = document.createElement("div");
        note.className = "hint error";
        note.textContent = error.message;
        li.append(note);
      }
    } finally {
      li.classList.remove("streaming");
      setRunning(null);
      if (reply) history.push({ role: "assistant", content: reply });
      else history.pop(); // nothing came back: the question can be asked again
      $("prompt").focus();
    }
  }

  $("chat-form").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) send(event);
  });
  $("stop").addEventListener("click", () => running && running.abort());
  $("new-chat").addEventListener("click", () => {
    if (running) running.abort();
    history = [];
    conversation = newId();
    $("messages").textContent = "";
  });
  $("model").addEventListener("change", () => {
    showPrice();
    C.request("/model", { method: "POST", body: { model: $("model").value } }).catch((e) =>
      C.toast(e.message),
    );
  });

  C.me()
    .then((value) => {
      me = value;
      for (const model of me.models) {
        const option = document.createElement("option");
        option.value = model.id;
        option.textContent = model.id;
        $("model").appendChild(option);
      }
      $("model").value = me.model;
      showPrice();
    })
    .catch((error) => C.toast(error.message));
})();
