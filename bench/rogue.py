"""The rogue-worker suite's long form (issue 12, item 8): each attack of
``tests/test_rogue_workers.py`` at full size against ``cocoon up``'s network, with figures; then
the attacks tried, the attacks that succeeded (must be 0), and the honest worker's share of turns.

``.venv/bin/python -m bench.rogue [--flood-mb 300] [--bogus 300000] [--trickle-s 30]``

It replaces ``bench.reply_bounds``: the reply path's figures (an inflated final record, a
300 MB reply to ``max_tokens: 1``, a trickle) are its first attacks, now with an onboarded rogue.

The network is the suite's (``tests/support/network.py``), on a redis-server of its own on a
free port (the last attack restarts it; nothing else is touched): ``cocoon web`` in this
process, an honest node process (the instant engine) and one rogue (``tests/support/rogue.py``),
both onboarded through the onboarding HTTP API with development-TEE evidence, each with its own
Redis ACL user. The rogue attacks the turns of one user, routed to it as a conversation's
earlier turn would route them; every other job it gets it answers as an honest node would.
Meanwhile a second user sends turns that nobody routes, one after another (four at once during
the restart): the honest worker's share of those is the figure that editing the index or
advertising a huge capacity used to bring to nothing (with two workers serving, a fair share is
about half). After each attack the ledger audit (``backend/invariants.py``) runs once every turn
has settled; an attack after which it is not clean counts as succeeded.

An attack succeeds when: inflated counts are billed above the backend's bound; a reply to
``max_tokens: 1`` gets the client more than the turn's text bound, costs more than what was
delivered, or grows this process by more than 64 MB; an endless reply is not cut off at its
chunk bound; a trickle holds its turn past the deadline (job timeout 4 s, first token 2 s here:
7 s) by more than 2 s; evidence claiming an off-machine engine or unlisted weights is accepted
(an off-machine engine with the development TEE must be labelled); any shared-state command of
the rogue's runs, or an unrouted turn fails meanwhile; the rogue gets more slots than its
attestation record's capacity; a Redis restart ends the node, answers 500, or leaves the
network serving nothing. Figures that are times are this machine's, printed to compare runs,
and decide nothing but the trickle.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import logging
import multiprocessing
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import nacl.public
import redis

from backend.bounds import (
    COMPLETION_SLACK_TOKENS,
    ReplyBounds,
    delivered_floor,
    prompt_token_bound,
)
from backend.pricing import default_max_tokens, turn_cost, worst_case_cost
from backend.settings import Settings
from tests.support import attest
from tests.support.network import SERVED, Network, Streamed, network, tdx_evidence
from tests.support.redis_server import RedisServer
from tests.support.rogue import RogueJob, RogueWorker
from workers import registry, streams
from workers.wire import ChatMessage, StreamChunk, WorkerKeys

Plan = Callable[[RogueWorker, RogueJob], Awaitable[None]]


@dataclass
class Outcome:
    attack: str
    succeeded: bool
    figures: str


@dataclass
class Tally:
    """Unrouted turns of the second user: who served them."""

    by: Counter[str] = field(default_factory=Counter)

    def add(self, worker: str) -> None:
        self.by[worker] += 1

    def line(self, honest: str, rogue: str) -> str:
        sent = sum(self.by.values())
        served = self.by[honest]
        failed = {k: v for k, v in self.by.items() if k not in (honest, rogue)}
        share = f"{100 * served / sent:.0f} %" if sent else "-"
        return f"{served}/{sent} by the honest worker ({share}), {self.by[rogue]} by the rogue" + (
            f", failed {dict(failed)}" if failed else ""
        )


class Bench:
    def __init__(self, net: Network, rogue: RogueWorker, bystander_key: str) -> None:
        self.net = net
        self.rogue = rogue
        self.bystander_key = bystander_key
        self.plans: dict[str, Plan] = {}
        self.total = Tally()
        self.price = net.settings.models[SERVED]

    def attack_text(self, plan: Plan, text: str) -> str:
        """A prompt the rogue will answer with ``plan`` (it reads every prompt it serves)."""
        text = f"{text} [{uuid.uuid4().hex[:8]}]"
        self.plans[text] = plan
        return text

    async def behaviour(self, rogue: RogueWorker, job: RogueJob) -> None:
        plan = self.plans.pop(job.request.messages[-1].content, None)
        if plan is None:
            await rogue.answer_honestly(job)
        else:
            await plan(rogue, job)

    def cost(self, prompt: int, completion: int) -> int:
        return turn_cost(
            self.price, prompt_tokens=prompt, cached_prompt_tokens=0, completion_tokens=completion
        )

    async def charged(self, before: int) -> int:
        return before - await self.net.available()

    @contextlib.asynccontextmanager
    async def background(self) -> AsyncIterator[Tally]:
        """Unrouted turns of the second user, one after another, while the block runs."""
        tally = Tally()
        stop = asyncio.Event()

        async def client() -> None:
            while not stop.is_set():
                text = f"background {uuid.uuid4().hex[:6]} turn"
                try:
                    reply = await self.net.chat(text, api_key=self.bystander_key)
                    who = reply.worker or f"{reply.status} {reply.error}"
                except Exception as error:  # the connection itself: counted, never hidden
                    who = type(error).__name__
                tally.add(who)
                self.total.add(who)
                if not who.startswith("w-"):
                    await asyncio.sleep(0.05)

        task = asyncio.create_task(client())
        try:
            yield tally
        finally:
            stop.set()
            await task


# -- the reply path ------------------------------------------------------------------------------


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


def _flood(redis_url: str, job_id: str, reply_key: str, chunks: int, chunk_chars: int) -> None:
    """The flooding rogue, in a process of its own (so that the growth measured is the web
    server's): ``chunks`` valid chunks of text, with the rogue's own credentials."""
    client = redis.Redis.from_url(redis_url)
    text = "x" * chunk_chars
    box = nacl.public.SealedBox(nacl.public.PublicKey(base64.b64decode(reply_key)))
    for seq in range(chunks):
        chunk = StreamChunk(job_id=job_id, seq=seq, text=text)
        sealed = box.encrypt(chunk.model_dump_json().encode())
        client.xadd(streams.stream_key(job_id), {b"d": sealed})
    client.close()


async def oversized_reply(b: Bench, flood_mb: int) -> Outcome:
    async def plan(rogue: RogueWorker, job: RogueJob) -> None:
        writer = multiprocessing.get_context("spawn").Process(
            target=_flood,
            args=(rogue.redis_url, job.job_id, job.request.reply_key, flood_mb, 1_000_000),
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


# -- shared state --------------------------------------------------------------------------------


def _try(attack: Callable[[], object]) -> str:
    try:
        attack()
    except redis.RedisError as error:
        return type(error).__name__
    return "allowed"


async def edit_index(b: Bench) -> Outcome:
    outcomes = {name: _try(a) for name, a in b.rogue.index_edits(b.net.honest_id).items()}
    with b.rogue.keep_trying(lambda: b.rogue.sync.zrem(registry.INDEX_KEY, b.net.honest_id)) as t:
        replies = [await b.net.chat(f"unrouted {n}", api_key=b.bystander_key) for n in range(10)]
    statuses = Counter(r.status for r in replies)
    allowed = [n for n, o in outcomes.items() if o == "allowed"] + [o for o in t if o == "allowed"]
    return Outcome(
        "editing the index",
        bool(allowed) or set(statuses) != {200},
        f"{len(outcomes)} edits: {dict(Counter(outcomes.values()))}; 10 unrouted turns while "
        f"it ZREMs the honest worker again and again ({len(t)} tries): {dict(statuses)}",
    )


async def _healthz(b: Bench) -> float:
    started = time.perf_counter()
    async with b.net.session.get(f"{b.net.url}/healthz") as reply:
        await reply.read()
    return time.perf_counter() - started


async def _timed_turns(b: Bench, rounds: int) -> tuple[list[tuple[int, float]], list[float]]:
    """Turns one after another; each one's (status, seconds) and the slowest /healthz while it
    ran."""
    turns, health = [], []
    for n in range(rounds):
        started = time.perf_counter()
        turn = asyncio.create_task(b.net.chat(f"timed {n}", api_key=b.bystander_key))
        samples = [await _healthz(b)]
        while not turn.done():
            samples.append(await _healthz(b))
            await asyncio.sleep(0.05)
        reply = await turn
        turns.append((reply.status, time.perf_counter() - started))
        health.append(max(samples))
    return turns, health


async def flood_index(b: Bench, bogus: int) -> Outcome:
    base_turns, base_health = await _timed_turns(b, 5)
    result = await asyncio.to_thread(_try, lambda: b.rogue.flood_index(bogus))
    entries = await b.net.admin.zcard(registry.INDEX_KEY)
    if result != "allowed":
        # Refused. Leave them there once with the operator's credentials (as an older release
        # let a worker do) to measure that reading the index is bounded and off a turn's path.
        operator = redis.Redis.from_url(b.net.settings.redis_url)
        pipe = operator.pipeline(transaction=False)
        for start in range(0, bogus, 10_000):
            ids = {f"bogus-{n}": 0 for n in range(start, min(bogus, start + 10_000))}
            pipe.zadd(registry.INDEX_KEY, ids)
        await asyncio.to_thread(pipe.execute)
        operator.close()
    turns, health = await _timed_turns(b, 5)
    left = await b.net.admin.zcard(registry.INDEX_KEY)
    median = statistics.median(s for _st, s in turns)
    return Outcome(
        "flooding the index",
        result == "allowed" or {st for st, _s in turns} != {200},
        f"ZADD of {bogus:,} ids: {result} (index: {entries} entries); with {bogus:,} bogus ids "
        f"left by the operator: turns {median * 1000:.0f} ms median (before "
        f"{statistics.median(s for _st, s in base_turns) * 1000:.0f} ms), slowest /healthz "
        f"{max(health) * 1000:.0f} ms (before {max(base_health) * 1000:.0f} ms), statuses "
        f"{dict(Counter(st for st, _s in turns))}; {left:,} entries left",
    )


async def scripts(b: Bench) -> Outcome:
    admin = redis.Redis.from_url(b.net.settings.redis_url)
    pings: list[tuple[str, float]] = []
    stop = threading.Event()

    def ping() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                admin.ping()
                pings.append(("ok", time.perf_counter() - started))
            except redis.RedisError as error:
                pings.append((type(error).__name__, time.perf_counter() - started))
            stop.wait(0.2)

    pinger = threading.Thread(target=ping)
    pinger.start()
    try:
        await asyncio.sleep(0.3)
        outcomes = {
            name: await asyncio.to_thread(_try, a)
            for name, a in b.rogue.script_attempts(busy_s=8).items()
        }
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        await asyncio.to_thread(pinger.join)
        admin.close()
    busy = sum(1 for kind, _s in pings if kind != "ok")
    return Outcome(
        "EVAL (and every other script)",
        "allowed" in outcomes.values() or busy > 0,
        f"{', '.join(outcomes)}: {dict(Counter(outcomes.values()))}; the operator's PINGs "
        f"meanwhile: slowest {max(s for _k, s in pings) * 1000:.1f} ms, {busy} answered BUSY",
    )


async def select(b: Bench) -> Outcome:
    own = int(b.rogue.sync.connection_pool.connection_kwargs.get("db", 0) or 0)
    other = (own + 1) % 16
    elsewhere = b.rogue.other_database(other)
    outcomes = {
        f"SELECT {other}": _try(lambda: b.rogue.select(other)),
        f"a connection to database {other}": _try(lambda: elsewhere.set("rogue:was:here", "1")),
    }
    elsewhere.close()
    return Outcome(
        "SELECT",
        "allowed" in outcomes.values(),
        ", ".join(f"{k}: {v}" for k, v in outcomes.items())
        + f" (SELECT {own}, its own, is allowed)",
    )


async def huge_capacity(b: Bench) -> Outcome:
    b.rogue.advertise(capacity=1_000_000_000, load=0)
    await b.net.dispatcher.workers.refresh()
    listed = await registry.get_worker(b.net.admin, b.rogue.worker_id)
    capacity = listed.capacity if listed is not None else 0
    picks = []
    for n in range(100):
        worker = await registry.pick_worker(
            b.net.admin, SERVED, job_id=f"cap-{n}", attested_only=True
        )
        picks.append(None if worker is None else worker.worker_id)
    for n, worker_id in enumerate(picks):
        if worker_id is not None:
            await registry.release_slot(b.net.admin, worker_id, f"cap-{n}")
    b.rogue.advertise()
    got = Counter("rogue" if p == b.rogue.worker_id else "honest" if p else "none" for p in picks)
    return Outcome(
        "advertising a huge capacity",
        got["rogue"] > capacity,
        f"capacity 1,000,000,000 and load 0 claimed; the backend uses {capacity}; "
        f"100 slot reservations: {dict(got)}",
    )


async def redis_restart(b: Bench, server: RedisServer, tally: Tally) -> Outcome:
    seen: list[tuple[float, int | str, float]] = []  # (started, status, seconds)
    t0 = time.monotonic()
    stop = asyncio.Event()

    async def load() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                reply = await b.net.chat(
                    f"under load {uuid.uuid4().hex[:6]}", api_key=b.bystander_key
                )
                status: int | str = reply.status
                who = reply.worker or f"{reply.status} {reply.error}"
            except Exception as error:  # the connection itself: counted, never hidden
                status = who = type(error).__name__
            seen.append((started - t0, status, time.monotonic() - started))
            tally.add(who)
            b.total.add(who)
            if status != 200:
                await asyncio.sleep(0.1)

    loads = [asyncio.create_task(load()) for _ in range(4)]
    await asyncio.sleep(3)
    down_at = time.monotonic() - t0
    await asyncio.to_thread(server.stop)
    await asyncio.sleep(3)
    await asyncio.to_thread(server.start)
    up_at = time.monotonic() - t0
    await asyncio.sleep(20)
    stop.set()
    await asyncio.gather(*loads)

    def count(xs: list[int | str]) -> dict[str, int]:
        return {str(k): v for k, v in sorted(Counter(xs).items(), key=lambda kv: str(kv[0]))}

    before = [st for t, st, _s in seen if t < down_at]
    during = [st for t, st, _s in seen if down_at <= t < up_at]
    after = [st for t, st, _s in seen if t >= up_at]
    first = next((t - up_at for t, st, _s in seen if t >= up_at and st == 200), None)
    slowest = max((s for t, _st, s in seen if t >= down_at - 1), default=0.0)
    running = b.net.node.poll() is None
    bad = [st for st in before + during + after if st not in (200, 503)]
    return Outcome(
        "a Redis restart mid-load",
        bool(bad) or not running or first is None,
        f"4 clients; statuses before {count(before)}, while down (3 s) {count(during)}, in the "
        f"20 s after {count(after)}; first 200 "
        f"{'never' if first is None else f'{first:.2f} s'} after Redis was back; the slowest "
        f"turn across the restart {slowest:.1f} s; the node "
        f"{'running' if running else 'exited'}",
    )


# -- the run -------------------------------------------------------------------------------------


async def main(flood_mb: int, bogus: int, trickle_s: float) -> int:
    # The network's own warnings (Redis unreachable during the restart, flags, cut-offs) are
    # what the figures count; only errors are printed as they happen.
    logging.basicConfig(level=logging.ERROR, format="%(name)s: %(message)s")
    if shutil.which("redis-server") is None:
        print("bench.rogue needs redis-server (Debian: apt install redis-server)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="cocoon-bench-rogue-") as tmp:
        server = RedisServer(Path(tmp) / "redis")
        server.start()
        try:
            settings = Settings(_env_file=None, data_dir=Path(tmp) / "data", redis_url=server.url())
            async with network(settings, Path(tmp) / "net") as net:
                return await run(net, server, flood_mb, bogus, trickle_s)
        finally:
            server.stop()


async def run(
    net: Network, server: RedisServer, flood_mb: int, bogus: int, trickle_s: float
) -> int:
    rogue = await net.rogue(capacity=64)  # what the honest node claims (cocoon up's default)
    _bystander, key = await net.user(9100)
    b = Bench(net, rogue, key)
    stop = asyncio.Event()
    serving = asyncio.create_task(rogue.serve(b.behaviour, stop))
    attacks: list[Callable[[], Awaitable[Outcome]]] = [
        lambda: inflated_counts(b),
        lambda: oversized_reply(b, flood_mb),
        lambda: endless_reply(b),
        lambda: trickle(b, trickle_s),
        lambda: off_machine_engine(b),
        lambda: unlisted_weights(b),
        lambda: edit_index(b),
        lambda: flood_index(b, bogus),
        lambda: scripts(b),
        lambda: select(b),
        lambda: huge_capacity(b),
    ]
    outcomes = []
    print(f"honest worker {net.honest_id}, rogue {rogue.worker_id} (both onboarded, dev TEE)")
    try:
        for attack in attacks:
            async with b.background() as tally:
                outcome = await attack()
            outcomes.append(await report(b, outcome, tally))
        tally = Tally()
        outcomes.append(await report(b, await redis_restart(b, server, tally), tally))
    finally:
        stop.set()
        await serving
    succeeded = [o.attack for o in outcomes if o.succeeded]
    print(f"\nattacks tried: {len(outcomes)}")
    print(
        f"attacks that succeeded: {len(succeeded)}"
        + (f" ({', '.join(succeeded)})" if succeeded else "")
    )
    print(
        "the honest worker's share of unrouted turns, all attacks: "
        + b.total.line(net.honest_id, rogue.worker_id)
        + " (two workers claiming the same capacity serve them: a fair share is about half)"
    )
    return 1 if succeeded else 0


async def report(b: Bench, outcome: Outcome, tally: Tally) -> Outcome:
    audit = await b.net.audit()
    if not audit.ok:
        outcome.succeeded = True
    verdict = "SUCCEEDED" if outcome.succeeded else "failed"
    print(f"\n{outcome.attack}: {verdict}\n  {outcome.figures}")
    print(f"  unrouted turns meanwhile: {tally.line(b.net.honest_id, b.rogue.worker_id)}")
    print(f"  ledger audit: {'clean' if audit.ok else audit}")
    sys.stdout.flush()
    return outcome


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flood-mb", type=int, default=300, help="the oversized reply, in MB")
    parser.add_argument("--bogus", type=int, default=300_000, help="bogus index ids")
    parser.add_argument("--trickle-s", type=float, default=30.0, help="how long it trickles")
    options = parser.parse_args()
    sys.exit(asyncio.run(main(options.flood_mb, options.bogus, options.trickle_s)))
