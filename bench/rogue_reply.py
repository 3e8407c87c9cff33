"""The rogue-worker bench's attacks on the reply path (inflated counts, an oversized, endless or
trickling reply) and on what a worker proves about itself (an off-machine engine, unlisted
weights). Run by ``bench.rogue``."""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing
import time
from pathlib import Path

import nacl.public
import nacl.signing
import redis

from backend.bounds import (
    COMPLETION_SLACK_TOKENS,
    ReplyBounds,
    delivered_floor,
    prompt_token_bound,
)
from backend.pricing import default_max_tokens, worst_case_cost
from bench.rogue_kit import Bench, Outcome
from tests.support import attest
from tests.support.network import SERVED, Streamed, tdx_evidence
from tests.support.rogue import RogueJob, RogueWorker
from workers import registry, streams
from workers.stream_crypto import StreamSealer
from workers.wire import ChatMessage, StreamChunk, WorkerKeys


async def inflated_counts(b: Bench) -> Outcome:
    async def plan(rogue: RogueWorker, job: RogueJob) -> None:
        await rogue.chunk(job, "Hi!")
        await rogue.final(job, prompt_tokens=10_000_000, completion_tokens=job.request.max_tokens)

    text = b.attack_text(plan, "Say hi")
    before = await b.net.available()
    reply = await b.net.chat(text, max_tokens=None, to=b.rogue.worker_id)
    charged = await b.charged(before)
    messages = [ChatMessage(role="user", content=text)]
    max_tokens = default_max_tokens(b.net.settings, b.price)
    bound = b.cost(prompt_token_bound(messages), len(b"Hi!") + COMPLETION_SLACK_TOKENS)
    as_signed = min(
        b.cost(10_000_000, max_tokens),
        worst_case_cost(b.price, prompt_tokens=prompt_token_bound(messages), max_tokens=max_tokens),
    )
    honest = b.cost(31, 2)  # SmolLM2's own count of "Say hi", and "Hi!"
    flags = sorted(kind for w, kind in await b.net.flags() if w == b.rogue.worker_id)
    return Outcome(
        "inflated counts",
        charged > bound or reply.status != 200,
        f"'Hi!' claimed as 10,000,000 prompt + {max_tokens} completion tokens: charged "
        f"{charged:,} nanoTON (the bound {bound:,}; as signed, capped by the hold "
        f"{as_signed:,}; an honest SmolLM2 turn {honest:,}); flagged {', '.join(flags)}",
    )


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux)


def _flood(
    redis_url: str, job_id: str, reply_key: str, keys: tuple[bytes, bytes], chunks: int, size: int
) -> None:
    """The flooding rogue, in a process of its own (so that the growth measured is the web
    server's): ``chunks`` valid chunks of ``size`` characters, with the rogue's own credentials
    and keys (``keys``: its box and signing keys' seeds)."""
    client = redis.Redis.from_url(redis_url)
    text = "x" * size
    rogue_keys = WorkerKeys(nacl.public.PrivateKey(keys[0]), nacl.signing.SigningKey(keys[1]))
    sealer = StreamSealer(job_id, reply_key, rogue_keys)
    for seq in range(chunks):
        sealed = sealer.seal(StreamChunk(job_id=job_id, seq=seq, text=text))
        client.xadd(streams.stream_key(job_id), {b"d": sealed})
    client.close()


async def oversized_reply(b: Bench, flood_mb: int) -> Outcome:
    async def plan(rogue: RogueWorker, job: RogueJob) -> None:
        writer = multiprocessing.get_context("spawn").Process(
            target=_flood,
            args=(
                rogue.redis_url,
                job.job_id,
                job.request.reply_key,
                (bytes(rogue.keys.box_key), bytes(rogue.keys.signing_key)),
                flood_mb,
                1_000_000,
            ),
        )
        writer.start()
        await asyncio.to_thread(writer.join)
        await rogue.final(job, prompt_tokens=5, completion_tokens=1)

    text = b.attack_text(plan, "One word please")
    before = await b.net.available()
    _reset_peak_rss()
    rss = _rss_mb("VmRSS")
    seen = await b.net.streamed(text, max_tokens=1, to=b.rogue.worker_id)
    grew = _rss_mb("VmHWM") - rss
    received = len(seen.text.encode())
    charged = await b.charged(before)
    over = received > ReplyBounds.for_max_tokens(1).text_bytes
    overcharged = charged > b.cost(0, delivered_floor(received, 1))
    return Outcome(
        "oversized reply",
        over or overcharged or grew > 64,
        f"{flood_mb} chunks of 1 MB to max_tokens 1: the client received {received} bytes "
        f"({_ended(seen)}); this process (the web server) grew {grew:.0f} MB at its peak; "
        f"charged {charged}",
    )


async def endless_reply(b: Bench) -> Outcome:
    written = [0]

    async def plan(rogue: RogueWorker, job: RogueJob) -> None:
        while not await rogue.cancel_requested(job) and written[0] < 1_000_000:
            await rogue.chunk(job, " 1")
            written[0] += 1

    text = b.attack_text(plan, "Count for ever")
    before = await b.net.available()
    seen = await b.net.streamed(text, max_tokens=16, to=b.rogue.worker_id)
    charged = await b.charged(before)
    bound = ReplyBounds.for_max_tokens(16).chunks
    return Outcome(
        "endless reply",
        len(seen.texts) > bound or seen.error is None,
        f"the rogue wrote {written[0]} chunks until told to stop; the client got "
        f"{len(seen.texts)} (bound {bound}), {_ended(seen)}; charged {charged}",
    )


async def trickle(b: Bench, trickle_s: float) -> Outcome:
    d = b.net.dispatcher
    saved = (d.job_timeout_s, d.first_token_timeout_s, d.idle_timeout_s, d.deadline_grace_s)
    # A short job timeout, so that the figure takes seconds: the rule is the same at 600 s.
    d.job_timeout_s, d.first_token_timeout_s, d.idle_timeout_s, d.deadline_grace_s = 4, 2, 2, 1
    deadline = 2 + 4 + 1

    async def plan(rogue: RogueWorker, job: RogueJob) -> None:
        started = time.monotonic()
        while time.monotonic() - started < trickle_s and not await rogue.cancel_requested(job):
            await rogue.chunk(job, "word ")
            await asyncio.sleep(1.5)
        await rogue.final(job, prompt_tokens=50, completion_tokens=job.request.max_tokens)

    text = b.attack_text(plan, "Tell me a long story")
    before = await b.net.available()
    started = time.monotonic()
    try:
        seen = await b.net.streamed(text, max_tokens=2048, to=b.rogue.worker_id)
    finally:
        d.job_timeout_s, d.first_token_timeout_s, d.idle_timeout_s, d.deadline_grace_s = saved
    held = time.monotonic() - started
    charged = await b.charged(before)
    return Outcome(
        "trickling",
        held > deadline + 2 or seen.error is None,
        f"a word every 1.5 s for {trickle_s:g} s, deadline {deadline} s: the turn held its "
        f"hold and slot {held:.1f} s, {_ended(seen)}; the client got "
        f"{len(seen.text.encode())} bytes; charged {charged}",
    )


def _ended(seen: Streamed) -> str:
    if seen.error is not None:
        return f"ended {seen.error['code']}"
    return "ended done"


# -- what a worker proves about itself -----------------------------------------------------------


OFF_MACHINE = "http://203.0.113.7:8000"


async def off_machine_engine(b: Bench) -> Outcome:
    off = {"base_url": OFF_MACHINE, "served_model": SERVED, "api_key": False}
    status, body = await b.net.attempt(
        lambda nonce: tdx_evidence(WorkerKeys.generate(), nonce, engine="openai", engine_config=off)
    )
    dev = await b.net.rogue(engine="openai", engine_config=off, advertise=False)
    record = await registry.read_attestation(b.net.admin, dev.worker_id)
    labelled = record is not None and record.off_machine and record.tee == "dev"
    reason = next((r for r in body.get("reasons", []) if "loopback" in r), "")
    return Outcome(
        "off-machine engine URL",
        status == 200 or not labelled,
        f"TDX evidence with base_url={OFF_MACHINE}: HTTP {status} ({reason[:60]}...); "
        f"development TEE: accepted, its record off_machine={labelled}",
    )


async def unlisted_weights(b: Bench) -> Outcome:
    other = hashlib.sha256(b"weights with a backdoor").hexdigest()
    results = []
    try:
        await b.net.rogue(model=attest.MODEL, model_sha256=other, advertise=False)
        results.append("dev: accepted")
    except Exception as error:
        results.append(f"dev: {getattr(error, 'status', type(error).__name__)}")
    status, _body = await b.net.attempt(
        lambda nonce: tdx_evidence(WorkerKeys.generate(), nonce, model_sha256=other)
    )
    results.append(f"TDX: {status}")
    return Outcome(
        "weights not on the allow-list",
        any("accepted" in r or r.endswith(": 200") for r in results),
        f"model {attest.MODEL!r} with weights sha256 {other[:12]}...: " + ", ".join(results),
    )
