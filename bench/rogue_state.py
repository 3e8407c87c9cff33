"""The rogue-worker bench's attacks on shared state: the worker index edited or flooded, Redis
scripts and SELECT, a capacity over the attested one, a Redis restart. Run by ``bench.rogue``."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable

import redis

from bench.rogue_kit import Bench, Outcome, Tally
from tests.support.network import SERVED
from tests.support.redis_server import RedisServer
from workers import registry


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
