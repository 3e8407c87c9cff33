"""Benchmarks of the money path, run by hand: settlements per second, and the queue's
throughput with hold and settlement, each figure beside its baseline measured in the same run,
and the goal of issue 19.

    .venv/bin/python -m bench.money                              # SQLite and PostgreSQL
    .venv/bin/python -m bench.money --db postgresql --settlements 2000 --jobs 1000

1. **Settlements per second** (holds closed, each its own idempotent ledger transaction with
   its turn record), one at a time and 64 at once, by the ledger as it is (on PostgreSQL: one
   statement, group-committed by ``backend.ledger_pg.CloseBatcher``) against its general path
   (one database transaction of several round trips each, what every settlement took before),
   the one statement without group commit (``close_batch=1``), and the database's own rate of
   bare one-row commits at the same concurrency. On SQLite all three ledgers take the general
   path: their differences there are the machine's noise.
2. **Queue throughput with hold and settlement** (``bench.inference``'s section 3, run here on
   the chosen databases): turns/s through the stack with the instant engine against one bare
   RQ SimpleWorker, for a free and a priced model.

Needs Redis (``COCOON_BENCH_REDIS_URL``) and, for PostgreSQL, ``COCOON_BENCH_POSTGRES_URL``'s
server (a database of the bench's own, dropped at the end), as ``bench.inference``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

from sqlalchemy import text

from backend.ledger import Ledger
from bench.inference import Bench, bench_queue, row
from bench.inference_stack import USAGE, run_sections

ROUNDS = 5


async def timed(count: int, at_once: int, one: Callable[[int], Awaitable[object]]) -> float:
    """Seconds for ``count`` calls of ``one``, ``at_once`` in flight."""
    semaphore = asyncio.Semaphore(at_once)

    async def limited(i: int) -> None:
        async with semaphore:
            await one(i)

    started = time.perf_counter()
    await asyncio.gather(*(limited(i) for i in range(count)))
    return time.perf_counter() - started


async def bench_settlements(bench: Bench, count: int) -> None:
    """Each way in turn, a fifth of the holds at a time, five rounds: the machine's load
    falls on every way alike (rates are the holds of all rounds over their summed time)."""
    db = bench.db_name
    engine = bench.db.engine
    async with engine.begin() as connection:
        await connection.execute(text("CREATE TABLE IF NOT EXISTS bench_commit (id INTEGER)"))

    async def commit(i: int) -> None:
        async with engine.begin() as connection:
            await connection.execute(text("INSERT INTO bench_commit (id) VALUES (:i)"), {"i": i})

    ledgers = {
        "general path": Ledger(bench.db, one_statement=False),
        "one statement each, no group commit": Ledger(bench.db, close_batch=1),
        "ledger": bench.ledger,
    }
    size = max(1, count // ROUNDS)
    for at_once in (1, 64):
        print(f"\n== settlements per second, {size * ROUNDS} holds, {at_once} at once ({db})")
        spent = dict.fromkeys(["bare one-row commits", *ledgers], 0.0)
        for _ in range(ROUNDS):
            spent["bare one-row commits"] += await timed(size, at_once, commit)
            for name, ledger in ledgers.items():
                keys = [f"bench-{uuid.uuid4().hex}" for _ in range(size)]
                for key in keys:
                    await ledger.hold(bench.user, 10_000, key)

                async def settle(i: int, ledger: Ledger = ledger, keys: list[str] = keys) -> None:
                    await ledger.settle(
                        keys[i], 7_000, provider_id=bench.user, share_bps=7000, usage=USAGE
                    )

                spent[name] += await timed(size, at_once, settle)
        rates = {name: size * ROUNDS / seconds for name, seconds in spent.items()}
        print("; ".join(f"{name} {value:7.1f}/s" for name, value in rates.items()))
        now, before, bare = rates["ledger"], rates["general path"], rates["bare one-row commits"]
        row(
            f"settlements per second, {at_once} at once (each its own ledger transaction)",
            db,
            f"{now:.0f}/s ({now / before:.2f}x the general path, {now / bare:.2f}x bare commits)",
            "; ".join(f"{name} {value:.0f}/s" for name, value in rates.items() if name != "ledger"),
            "keeps up with the queue; batched on PostgreSQL",
        )
    audit = await bench.ledger.audit()
    assert audit.ok, audit


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settlements", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=1000, help="queue benchmark turns")
    await run_sections(
        parser,
        {
            "settlements": lambda bench, args: bench_settlements(bench, args.settlements),
            "queue": lambda bench, args: bench_queue(bench, args.jobs),
        },
    )


if __name__ == "__main__":
    asyncio.run(main())
