// The sealed chat (issue 13): this page checks the worker's attestation itself, seals each turn
// to the worker's attested key with a reply key of its own, opens the reply here and checks the
// worker's signed receipt against the text it opened. The server relays ciphertext only; the
// conversation is kept in this page, sealed (crypto_secretbox) with a key that never leaves it.
// The protocol: README, "Verify it yourself". libsodium is libsodium-wrappers (npm), served by
// cocoon web under /app/vendor/ and loaded the first time the sealed chat is used.
(function () {
  "use strict";
  const C = window.Cocoon;
  if (!C || !C.ready) return;
  const { $, t } = C;

  const VENDOR = "/app/vendor/";
  const MAX_TOKENS = 512;
  const CONTEXT = "cocoon_sealed_context"; // the sealed conversation (nonce ‖ secretbox), base64
  const CONTEXT_KEY = "cocoon_sealed_key"; // its key: in this page's storage only
  const enc = new TextEncoder();
  const dec = new TextDecoder();
  let loading = null;
  let history = []; // [{role, content}] of the sealed conversation

  class SealedError extends Error {}

  function script(src) {
    return new Promise((resolve, reject) => {
      const element = document.createElement("script");
      element.src = src;
      element.onload = resolve;
      element.onerror = () => reject(new SealedError(t("sealed_no_library")));
      document.head.appendChild(element);
    });
  }

  // libsodium.js defines window.libsodium; the wrappers build window.sodium on it.
  function sodium() {
    if (!loading) {
      loading = (async () => {
        await script(VENDOR + "libsodium.js");
        await script(VENDOR + "libsodium-wrappers.js");
        await window.sodium.ready;
        return window.sodium;
      })();
      loading.catch(() => (loading = null));
    }
    return loading;
  }

  // ------------------------------------------------------------------------ bytes

  function b64(s, text) {
    return s.from_base64(text, s.base64_variants.ORIGINAL);
  }
  function toB64(s, bytes) {
    return s.to_base64(bytes, s.base64_variants.ORIGINAL);
  }
  function join(a, b) {
    const out = new Uint8Array(a.length + b.length);
    out.set(a);
    out.set(b, a.length);
    return out;
  }
  function signed(s, signature, message, key) {
    try {
      return s.crypto_sign_verify_detached(b64(s, signature), message, key);
    } catch (error) {
      return false;
    }
  }
  // SHA-256 is the browser's own (WebCrypto; libsodium's standard build has SHA-512 only).
  async function sha256(bytes) {
    return new Uint8Array(await window.crypto.subtle.digest("SHA-256", bytes));
  }
  // Python's json.dumps(sort_keys=True, separators=(",", ":")) of a flat object.
  function canonical(object) {
    return "{" + Object.keys(object).sort().map((k) => JSON.stringify(k) + ":" + JSON.stringify(object[k])).join(",") + "}";
  }

  // ------------------------------------------------------------------------ the report

  // One worker of the report, checked here. What a page cannot check: the TDX quote's signature
  // chain (DCAP); the server checked it, `cocoon attest report` checks it on your machine.
  async function checkWorker(s, entry, model, nonce, policy, devAllowed) {
    const reasons = [];
    const check = { worker_id: String(entry.worker_id), tee: "?", image: null, reasons };
    let claims;
    try {
      claims = JSON.parse(entry.claims_json);
    } catch (error) {
      reasons.push("claims_json");
      return check;
    }
    const digest = s.crypto_hash(enc.encode(entry.claims_json)); // SHA-512: the report data
    const evidence = entry.evidence || {};
    check.tee = evidence.tee;
    if (evidence.tee === "dev") {
      if (!devAllowed) reasons.push("dev");
      const dev = evidence.dev || {};
      let key = null;
      try {
        key = b64(s, dev.public_key);
      } catch (error) {
        reasons.push("dev key");
      }
      if (key && !signed(s, dev.signature, digest, key)) reasons.push("dev signature");
    } else if (evidence.tee === "tdx") {
      // A TDX quote: a 48-byte header, then the TD report (MRTD at 184, RTMR0-3 from 376,
      // the report data at 568).
      const quote = b64(s, evidence.quote || "");
      const hex = (from) => s.to_hex(quote.subarray(from, from + 48));
      if (quote.length < 632 || s.to_hex(quote.subarray(568, 632)) !== s.to_hex(digest)) {
        reasons.push("report data");
      } else {
        const image = (policy.images || []).find((i) =>
          i.mr_td.toLowerCase() === hex(184) && i.rtmr0.toLowerCase() === hex(376) &&
          i.rtmr1.toLowerCase() === hex(424) && i.rtmr2.toLowerCase() === hex(472) &&
          i.rtmr3.toLowerCase() === hex(520));
        if (image) check.image = image.name + " " + image.version;
        else reasons.push("image");
      }
    } else {
      reasons.push("tee");
    }
    if (claims.model !== model) reasons.push("model");
    const weights = ((policy.models || {})[claims.model] || {}).weights_sha256 || [];
    if (weights.length && !weights.includes(claims.model_sha256)) reasons.push("weights");
    try {
      check.box = b64(s, claims.box_public_key);
      check.verify = b64(s, claims.verify_key);
    } catch (error) {
      reasons.push("keys");
      return check;
    }
    const fingerprint = s.to_hex(await sha256(join(check.box, check.verify))).slice(0, 16);
    if (check.worker_id !== "w-" + fingerprint) reasons.push("worker id");
    if (!(Number(entry.expires_at) > Date.now() / 1000)) reasons.push("expired");
    const challenge = enc.encode("cocoon-challenge-v1\n" + check.worker_id + "\n" + nonce);
    if (!signed(s, entry.signature, challenge, check.verify)) reasons.push("nonce");
    return check;
  }

  async function trustedWorker(s, model) {
    const nonce = s.to_hex(s.randombytes_buf(32));
    const query = new URLSearchParams({ model, nonce });
    const response = await fetch("/v1/attestation/report?" + query.toString());
    const report = await response.json().catch(() => null);
    if (!response.ok || !report || report.nonce !== nonce || !Array.isArray(report.workers)) {
      throw new SealedError(t("sealed_no_report"));
    }
    const checks = await Promise.all(report.workers.slice(0, 256).map((w) =>
      checkWorker(s, w, model, nonce, report.policy || {}, Boolean(report.dev_mode))));
    const trusted = checks.filter((c) => c.reasons.length === 0);
    if (!trusted.length) {
      const why = checks.map((c) => c.worker_id + ": " + c.reasons.join(", ")).join("; ");
      throw new SealedError(t("sealed_no_worker", { reasons: why || "-" }));
    }
    return trusted[s.randombytes_uniform(trusted.length)];
  }

  // ------------------------------------------------------------------------ one turn

  // Server-Sent Events of the sealed API, one parsed `data:` object at a time.
  async function* events(response) {
    for await (const block of C.records(response, "\n\n")) {
      const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (!data || data === "[DONE]") continue;
      yield JSON.parse(data);
    }
  }

  // The job's stream (wire version 2, workers/stream_crypto.py): the first entry is
  // 0x02 | the worker's job key (32) | its signature over the job (64) | AEAD, each later one
  // 0x02 | AEAD. The stream key is crypto_kx's (our reply key, the worker's job key); entry n's
  // nonce is n and its associated data names the job, so an entry out of its place, tampered
  // with or of another job does not open. The opened payload: a chunk or an error (JSON), or
  // the final record (a 64-byte signature by the worker's attested key, then its JSON).
  const STREAM_FORMAT = 2;
  const STREAM_CONTEXT = enc.encode("cocoon-stream-v2");
  const HEADER_BYTES = 1 + 32 + 64;

  function concat(...parts) {
    const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) { out.set(p, at); at += p.length; }
    return out;
  }

  function streamOpener(s, reply, worker, jobId) {
    const job = enc.encode(jobId);
    const jobLength = new Uint8Array([job.length >> 8, job.length & 255]);
    let key = null;
    let place = 0;
    return function open(sealed) {
      const blob = b64(s, sealed);
      if (!blob.length || blob[0] !== STREAM_FORMAT) {
        throw new SealedError(t("sealed_bad_reply", { reason: "stream format" }));
      }
      let head = blob.subarray(0, 1);
      let entryKey = key;
      if (entryKey === null) {
        if (blob.length < HEADER_BYTES + 16) throw new SealedError(t("sealed_bad_reply", { reason: "stream header" }));
        head = blob.subarray(0, HEADER_BYTES);
        const jobKey = head.subarray(1, 33);
        const signedPart = concat(STREAM_CONTEXT, reply.publicKey, jobKey, job);
        if (!s.crypto_sign_verify_detached(head.subarray(33), signedPart, worker.verify)) {
          throw new SealedError(t("sealed_bad_reply", { reason: "stream signature" }));
        }
        entryKey = s.crypto_kx_client_session_keys(reply.publicKey, reply.privateKey, jobKey).sharedRx;
      }
      const nonce = new Uint8Array(24);
      for (let i = 0, n = place; i < 6; i++, n = Math.floor(n / 256)) nonce[i] = n % 256;
      let plain;
      try {
        plain = s.crypto_aead_xchacha20poly1305_ietf_decrypt(
          null, blob.subarray(head.length), concat(STREAM_CONTEXT, jobLength, job, head), nonce, entryKey);
      } catch (error) {
        throw new SealedError(t("sealed_bad_reply", { reason: "entry " + place + " does not open" }));
      }
      key = entryKey;
      place += 1;
      return plain;
    };
  }

  function openEntry(s, open, worker, jobId, sealed) {
    const plain = open(sealed);
    let record = null;
    try {
      record = JSON.parse(dec.decode(plain));
    } catch (error) {
      const body = plain.subarray(64);
      if (!s.crypto_sign_verify_detached(plain.subarray(0, 64), body, worker.verify)) {
        throw new SealedError(t("sealed_bad_reply", { reason: "final record signature" }));
      }
      record = JSON.parse(dec.decode(body));
    }
    if (record.job_id !== undefined && record.job_id !== jobId) {
      throw new SealedError(t("sealed_bad_reply", { reason: "job id" }));
    }
    return record;
  }

  async function checkReceipt(s, event, worker, jobId, sealedRequest, text, final, model) {
    const signedReceipt = (event.receipt || {}).signed || {};
    const r = signedReceipt.receipt || {};
    const problems = [];
    const message = enc.encode("cocoon-receipt-v1\n" + canonical(r));
    if (!signed(s, signedReceipt.signature, message, worker.verify)) problems.push("signature");
    if (r.job_id !== jobId || r.model !== model) problems.push("job");
    if (r.request_sha256 !== s.to_hex(await sha256(sealedRequest))) problems.push("request digest");
    if (r.reply_sha256 !== s.to_hex(await sha256(enc.encode(text)))) problems.push("reply digest");
    if (!final || ["prompt_tokens", "cached_prompt_tokens", "completion_tokens", "finish_reason"].some((k) => r[k] !== final[k])) {
      problems.push("counts");
    }
    if (problems.length) throw new SealedError(t("sealed_bad_reply", { reason: problems.join(", ") }));
    return r;
  }

  // One sealed turn: `onText` gets the reply as it is opened; resolves to what was verified.
  async function turn(model, messages, signal, onText) {
    const s = await sodium();
    const worker = await trustedWorker(s, model);
    const reply = s.crypto_box_keypair();
    const jobId = worker.worker_id + "_" + s.to_hex(s.randombytes_buf(16)) + "-1";
    const request = { v: 2, job_id: jobId, model, messages, max_tokens: MAX_TOKENS, reply_key: toB64(s, reply.publicKey) };
    const sealedRequest = s.crypto_box_seal(enc.encode(JSON.stringify(request)), worker.box);
    const response = await C.request("/sealed/chat", {
      method: "POST",
      body: { model, worker_id: worker.worker_id, job_id: jobId, max_tokens: MAX_TOKENS, sealed_request: toB64(s, sealedRequest) },
      signal,
      raw: true,
    });
    let text = "";
    let seq = 0;
    let final = null;
    const open = streamOpener(s, reply, worker, jobId);
    for await (const event of events(response)) {
      if (event.object === "cocoon.sealed.event") {
        const record = openEntry(s, open, worker, jobId, event.sealed);
        if (record.type === "chunk") {
          if (record.seq !== seq++) throw new SealedError(t("sealed_bad_reply", { reason: "order" }));
          text += record.text;
          onText(text);
        } else if (record.type === "final") {
          final = record;
        } else {
          throw new SealedError(t("sealed_worker_error", { message: String(record.message || record.code) }));
        }
      } else if (event.object === "cocoon.receipt") {
        const receipt = await checkReceipt(s, event, worker, jobId, sealedRequest, text, final, model);
        return { text, worker, receipt, cost: event.cost_nanoton, receiptId: event.receipt.id };
      } else if (event.error) {
        throw new C.ApiError(0, event.error.code || "error", event.error.message || t("error"));
      }
    }
    throw new SealedError(t("reply_lost"));
  }

  // ------------------------------------------------------------------------ the context

  async function contextKey(s) {
    let key = localStorage.getItem(CONTEXT_KEY);
    if (!key) {
      key = toB64(s, s.crypto_secretbox_keygen());
      localStorage.setItem(CONTEXT_KEY, key);
    }
    return b64(s, key);
  }

  function cloudStorage() {
    const tg = C.tg;
    return C.inTelegram && tg.CloudStorage && tg.isVersionAtLeast("6.9") ? tg.CloudStorage : null;
  }

  async function saveContext() {
    const s = await sodium();
    const nonce = s.randombytes_buf(s.crypto_secretbox_NONCEBYTES);
    const box = s.crypto_secretbox_easy(enc.encode(JSON.stringify(history)), nonce, await contextKey(s));
    const value = toB64(s, join(nonce, box));
    localStorage.setItem(CONTEXT, value);
    // Telegram's CloudStorage keeps a copy when it fits: ciphertext only (the key stays here).
    const cloud = cloudStorage();
    if (cloud && value.length <= 4096) cloud.setItem(CONTEXT, value, () => {});
  }

  async function loadContext() {
    const value = localStorage.getItem(CONTEXT);
    if (!value) return [];
    try {
      const s = await sodium();
      const raw = b64(s, value);
      const nonce = raw.subarray(0, s.crypto_secretbox_NONCEBYTES);
      const box = raw.subarray(s.crypto_secretbox_NONCEBYTES);
      const opened = JSON.parse(dec.decode(s.crypto_secretbox_open_easy(box, nonce, await contextKey(s))));
      return Array.isArray(opened) ? opened : [];
    } catch (error) {
      return []; // another key (storage cleared in part): start afresh
    }
  }

  function forget() {
    history = [];
    localStorage.removeItem(CONTEXT);
    const cloud = cloudStorage();
    if (cloud) cloud.removeItem(CONTEXT, () => {});
  }

  // ------------------------------------------------------------------------ the view

  function proof(li, result) {
    const w = result.worker;
    const box = document.createElement("div");
    box.className = "hint privacy sealed-proof";
    box.dataset.verified = "true";
    const lines = [
      t("sealed_verified"),
      w.tee === "dev" ? t("privacy_tee_dev") : t("privacy_tee_hw", { tee: String(w.tee).toUpperCase() }),
      t("sealed_served", { worker: w.worker_id, image: w.image || "-" }),
      t("reply_cost", {
        cost: C.formatGram(result.cost),
        prompt: result.receipt.prompt_tokens,
        completion: result.receipt.completion_tokens,
        balance: "…",
      }),
    ];
    for (const text of lines) {
      const row = document.createElement("div");
      row.textContent = text;
      box.append(row);
    }
    li.append(box);
  }

  // Called by chat.js's send while the sealed mode is on.
  async function send(text, signal) {
    const view = C.chatView;
    history.push({ role: "user", content: text });
    view.bubble("user", text);
    const li = view.bubble("assistant", "");
    const body = li.querySelector(".text");
    li.classList.add("streaming");
    body.dataset.placeholder = t("sealed_checking");
    try {
      const result = await turn($("model").value, history.slice(-40), signal, (reply) => {
        body.textContent = reply;
        view.keepInView();
      });
      C.markdown(body, result.text);
      proof(li, result);
      history.push({ role: "assistant", content: result.text });
      await saveContext();
      $("reply-announcer").textContent = result.text;
    } catch (error) {
      history.pop();
      if (error.name === "AbortError") return;
      li.classList.add("failed");
      const note = document.createElement("div");
      note.className = "hint error";
      note.textContent = error instanceof C.ApiError ? C.errorText(error.code, error.details || {}, error.message) : error.message;
      li.append(note);
    } finally {
      li.classList.remove("streaming");
      view.keepInView();
    }
  }

  async function switched() {
    const on = $("sealed-mode").checked;
    $("sealed-note").hidden = !on;
    $("messages").textContent = "";
    if (!on) return;
    history = await loadContext();
    for (const message of history) C.chatView.bubble(message.role, message.content);
  }

  const toggle = $("sealed-mode");
  if (!toggle) return;
  toggle.addEventListener("change", switched);
  $("new-chat").addEventListener("click", () => {
    if (toggle.checked) forget();
  });
  C.sealed = { active: () => toggle.checked, send };
})();
