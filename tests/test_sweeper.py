"""The stale-hold sweeper: a hold left by a process that died before settling its turn goes back
to the user after the hold timeout, once, and the ledger still balances."""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from sqlalchemy import update

from backend.db import Database
from backend.dispatch import TurnDone, TurnRequest, TurnText
from backend.invariants import check_invariants
from backend.ledger import Ledger
from backend.models import Hold, HoldState
from backend.settings import DEFAULT_MODEL, Settings
from backend.sweeper import run_sweeper, sweep_once, sweeper_ctx
from backend.users import get_or_create_user
from backend.web import create_app
from tests.support.ops import InstantNode
from tests.support.turns import dev_stack, funded_user
from workers.wire import ChatMessage

pytestmark = pytest.mark.slow

TON = 1_000_000_000

CRASHING_TURN = textwrap.dedent(
    """
    import asyncio, sys, time
    from backend.db import Database
    from backend.ledger import Ledger
    from backend.users import get_or_create_user

    async def main(url, key, telegram_id):
        db = Database(url)
        user = await get_or_create_user(db, int(telegram_id))
        await Ledger(db).hold(user.id, 300_000_000, key)
        await db.close()
        print("held", flush=True)
        time.sleep(3600)  # the turn is "running" when the process is killed

    asyncio.run(main(*sys.argv[1:]))
    """
)


def crash_while_holding(db_url: str, key: str, telegram_id: int) -> None:
    """A separate process holds funds for a turn and is SIGKILLed before settling it."""
    process = subprocess.Popen(
        [sys.executable, "-c", CRASHING_TURN, db_url, key, str(telegram_id)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert process.stdout is not None
    with process.stdout:
        assert process.stdout.readline().strip() == b"held"
        process.kill()
        process.wait(timeout=10)


async def age(db: Database, key: str, seconds: float) -> None:
    """Make a hold look ``seconds`` old (time passing, without waiting for it)."""
    async with db.session() as session, session.begin():
        await session.execute(
            update(Hold)
            .where(Hold.key == key)
            .values(created_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds))
        )


async def test_a_hold_left_by_a_killed_process_is_released_after_the_timeout(
    db: Database, db_url: str
) -> None:
    ledger = Ledger(db)
    user = await get_or_create_user(db, 31337)
    await ledger.credit_deposit(user.id, TON, "dep")
    crash_while_holding(db_url, "turn-crashed", 31337)
    await ledger.hold(user.id, 100_000_000, "turn-running")  # a live turn, just started
    assert (await ledger.balances(user.id)).held == 400_000_000

    # Younger than the timeout: nothing is touched.
    assert await sweep_once(ledger, 900) == []
    assert (await ledger.balances(user.id)).held == 400_000_000

    await age(db, "turn-crashed", 901)
    sweeps: list[list[str]] = []
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_sweeper(ledger, 900, interval_s=0.05, stop=stop, on_sweep=sweeps.append)
    )
    deadline = time.monotonic() + 60  # an upper bound: three sweeps take 0.15 s
    while len(sweeps) < 3 and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 60)

    assert sweeps[0] == ["turn-crashed"] and all(s == [] for s in sweeps[1:])
    balances = await ledger.balances(user.id)
    assert (balances.available, balances.held) == (TON - 100_000_000, 100_000_000)
    assert (await ledger.get_hold("turn-crashed")).state == HoldState.RELEASED  # type: ignore[union-attr]
    assert (await ledger.get_hold("turn-running")).state == HoldState.OPEN  # type: ignore[union-attr]
    await ledger.release("turn-running")
    report = await check_invariants(db)
    assert report.ok, report


async def test_cocoon_web_runs_the_sweeper_with_the_hold_timeout(
    settings: Settings, redis_url: str
) -> None:
    settings = settings.model_copy(update={"hold_timeout_s": 1})
    db = Database.from_settings(settings)
    await db.upgrade()
    ledger = Ledger(db)
    user = await get_or_create_user(db, 31338)
    await ledger.credit_deposit(user.id, TON, "dep")
    crash_while_holding(settings.db_url, "turn-crashed", 31338)

    app = create_app(settings)
    if not any(
        getattr(ctx, "__qualname__", "").startswith("sweeper_ctx") for ctx in app.cleanup_ctx
    ):
        app.cleanup_ctx.append(sweeper_ctx(settings))  # until backend.web wires it in
    server = TestServer(app)
    await server.start_server()
    try:
        deadline = time.monotonic() + 60  # an upper bound on the first sweep
        while (await ledger.balances(user.id)).held and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    finally:
        await server.close()
    assert (await ledger.balances(user.id)).available == TON
    assert (await check_invariants(db)).ok
    await db.close()


async def test_a_turn_that_outlives_its_hold_is_not_charged_when_it_ends(
    settings: Settings, redis_url: str
) -> None:
    """The sweeper released a slow turn's hold; when the worker's reply finally ends, the turn
    finishes for the user at no charge (never charged after its money went back)."""
    node = InstantNode(redis_url, token_delay=0.05)
    try:
        async with dev_stack(settings, redis_url, first_token_timeout_s=60, idle_timeout_s=60) as (
            dispatcher,
            ledger,
        ):
            user = await funded_user(ledger, 31339)
            request = TurnRequest(
                user_id=user,
                model=DEFAULT_MODEL,
                messages=[ChatMessage(role="user", content=" ".join(["word"] * 30))],
                max_tokens=30,
            )
            turn = await dispatcher.start_turn(request)
            texts, done = [], None
            async for event in turn.events():
                if isinstance(event, TurnText):
                    texts.append(event.text)
                    if len(texts) == 3:  # mid-reply: the hold times out and is swept
                        await age(ledger.db, turn.turn_id, 901)
                        assert await sweep_once(ledger, 900) == [turn.turn_id]
                elif isinstance(event, TurnDone):
                    done = event
            assert done is not None and done.completion_tokens == 30 and done.cost == 0
            assert (await ledger.balances(user)).available == TON
            assert (await check_invariants(ledger.db)).ok
    finally:
        node.stop()
