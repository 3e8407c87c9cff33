"""Chaos: the money stays right while processes die, connections drop and services restart.

``python -m bench.chaos`` runs every scenario (the package's docstring lists them) and prints
its figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

from backend.db import Database
from backend.settings import Settings
from bench.chaos.common import (
    Figures,
    scratch,
)
from bench.chaos.payout_kills import payout_kills
from bench.chaos.postgres_drops import postgres_drops
from bench.chaos.redis_restarts import redis_restarts
from bench.chaos.watcher_kills import watcher_kills
from bench.chaos.web_restarts import web_restarts
from bench.chaos.worker_kills import worker_kills
from tests.support.ops import admin_sql


@contextlib.asynccontextmanager
async def own_postgres(server_url: str) -> AsyncIterator[str]:
    """A database of this run's own on the server of ``server_url``, dropped at the end."""
    from sqlalchemy.engine import make_url

    name = f"cocoon_chaos_{os.getpid()}"
    await admin_sql(server_url, f"DROP DATABASE IF EXISTS {name}", f"CREATE DATABASE {name}")
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        await admin_sql(server_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def fresh_db(url: str) -> Database:
    db = Database(url)
    await db.upgrade()
    return db


async def main_async(args: argparse.Namespace) -> int:
    logging_off()
    all_figures: list[Figures] = []
    with scratch() as tmp:
        settings = Settings(_env_file=None, data_dir=tmp / "data", redis_url=args.redis_url)
        scenarios: list[tuple[str, Callable[[Database], Awaitable[Figures]]]] = [
            (
                "worker-kills",
                lambda db: worker_kills(settings, db, args.redis_url, turns=args.turns),
            ),
            ("watcher-kills", lambda db: watcher_kills(db, deposits=args.deposits)),
            (
                "payout-kills",
                lambda db: payout_kills(db, payouts=args.payouts, kills=args.payout_kills),
            ),
            (
                "payout-kills-highload",
                lambda db: payout_kills(
                    db, payouts=args.payouts, kills=args.payout_kills, highload=True
                ),
            ),
            (
                "redis-restart",
                lambda db: redis_restarts(
                    settings, db, turns=args.turns // 2, restarts=args.restarts
                ),
            ),
            ("postgres-drops", lambda db: postgres_drops(db, operations=args.pg_operations)),
            (
                "web-restart",
                lambda db: web_restarts(
                    settings.model_copy(update={"database_url": db.url}),
                    db,
                    args.redis_url,
                    turns=args.turns // 4,
                    restarts=args.restarts,
                ),
            ),
        ]
        for name, scenario in scenarios:
            if args.only and name not in args.only:
                continue
            async with contextlib.AsyncExitStack() as stack:
                if name == "postgres-drops" or args.postgres:
                    url = await stack.enter_async_context(own_postgres(args.postgres_url))
                else:
                    url = f"sqlite+aiosqlite:///{tmp / (name + '.db')}"
                db = await fresh_db(url)
                try:
                    figures = await scenario(db)
                finally:
                    await db.close()
            all_figures.append(figures)
            print(figures.line(), flush=True)
            if not figures.report.ok:
                print(str(figures.report), flush=True)
    faults = sum(f.faults for f in all_figures)
    violations = sum(f.violations for f in all_figures)
    print(
        f"\nscenarios run: {len(all_figures)}, operations: "
        f"{sum(f.operations for f in all_figures)}, faults injected: {faults}, "
        f"invariant violations: {violations}"
    )
    return 1 if violations else 0


def logging_off() -> None:
    """Faults make the code under test log errors by design (a cancelled watcher's connection
    reset, a lost Redis): the figures are the output here."""
    import logging

    logging.disable(logging.CRITICAL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--turns", type=int, default=200, help="turns of worker-kills (default 200)"
    )
    parser.add_argument("--deposits", type=int, default=1000, help="deposits in the backlog")
    parser.add_argument("--payouts", type=int, default=30, help="payouts to send")
    parser.add_argument("--payout-kills", type=int, default=50, help="sender kills")
    parser.add_argument("--restarts", type=int, default=3, help="Redis and web restarts")
    parser.add_argument("--pg-operations", type=int, default=300, help="ledger operations")
    parser.add_argument(
        "--redis-url", default=os.environ.get("COCOON_TEST_REDIS_URL", "redis://127.0.0.1:6379/13"),
        help="a Redis database this run may flush (default COCOON_TEST_REDIS_URL or DB 13)",
    )  # fmt: skip
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="run every scenario on PostgreSQL (default: SQLite; postgres-drops always on it)",
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("COCOON_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"),
        help="a PostgreSQL server (any database on it): the run makes a database of its own",
    )  # fmt: skip
    parser.add_argument("--only", nargs="*", help="run only these scenarios")
    parser.add_argument("--seed", type=int, help="random seed")
    args = parser.parse_args(argv)
    if args.seed is not None:
        random.seed(args.seed)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
