"""A turn's receipt is kept in its settlement's own ledger transaction (issue 19: one commit a
turn), on SQLite and PostgreSQL: exactly once (a replayed settlement writes no second receipt and
changes none), a receipt kept already never fails the settlement, a receipt that fails its checks
is not kept while the turn is still charged, and a turn no settlement closes (a free one, one
whose hold the sweeper released first) keeps its receipt as before, with what it was charged
(free turns ending together: in one commit)."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace

import nacl.signing
import pytest
import redis.asyncio as aioredis
from sqlalchemy import event, func, select
from sqlalchemy.exc import IntegrityError

from backend.db import Database
from backend.ledger import Ledger, TurnUsage
from backend.ledger_pg import Close, close_in_one_statement
from backend.ledger_write import request_hash
from backend.models import TurnReceipt, TurnRecord
from backend.receipts import load_receipt
from backend.settings import ModelPrice, Settings
from backend.settlement import TurnSettlement
from backend.turns import TurnDone, TurnRequest
from backend.users import get_or_create_user
from workers import registry
from workers.receipts import Receipt, sha256_hex, sign_receipt
from workers.wire import ChatMessage, FinalRecord

TON = 1_000_000_000
PRICE = ModelPrice(prompt=TON, completion=2 * TON)  # per 1M tokens
SEALED = b"the sealed request"
REPLY = "the reply"


def usage(receipt: str | None) -> TurnUsage:
    return TurnUsage("m", 3, 0, 4, "stop", worker_id="w-1", tee="dev", receipt=receipt)


async def receipts(db: Database, turn_id: str) -> list[str]:
    async with db.session() as session:
        return list(
            await session.scalars(select(TurnReceipt.body).where(TurnReceipt.turn_id == turn_id))
        )


async def funded(db: Database, ledger: Ledger, telegram_id: int) -> int:
    user = (await get_or_create_user(db, telegram_id, "en")).id
    await ledger.credit_deposit(user, 5 * TON, f"deposit:{telegram_id}")
    return user


async def test_a_settlement_keeps_its_receipt_once(db: Database) -> None:
    ledger = Ledger(db)
    user = await funded(db, ledger, 9201)
    await ledger.hold(user, TON, "turn-r")
    first = await ledger.settle(
        "turn-r", 1000, provider_id=None, share_bps=0, usage=usage('{"a":1}')
    )
    again = await ledger.settle(
        "turn-r", 1000, provider_id=None, share_bps=0, usage=usage('{"b":2}')
    )
    assert again.replayed and again.transaction_id == first.transaction_id
    assert await receipts(db, "turn-r") == ['{"a":1}']  # one, the first, never overwritten
    async with db.session() as session:
        assert await session.scalar(select(func.count()).select_from(TurnRecord)) == 1

    # Settled without a receipt: the turn has none.
    await ledger.hold(user, TON, "turn-none")
    await ledger.settle("turn-none", 1000, provider_id=None, share_bps=0, usage=usage(None))
    assert await receipts(db, "turn-none") == []


async def test_a_receipt_kept_already_never_fails_the_settlement(db: Database) -> None:
    ledger = Ledger(db)
    user = await funded(db, ledger, 9202)
    await ledger.hold(user, TON, "turn-k")
    async with db.session() as session, session.begin():
        session.add(TurnReceipt(turn_id="turn-k", user_id=user, body='{"kept":1}'))
    done = await ledger.settle("turn-k", 2000, provider_id=None, share_bps=0, usage=usage("{}"))
    assert not done.replayed
    assert (await ledger.balances(user)).available == 5 * TON - 2000
    assert await receipts(db, "turn-k") == ['{"kept":1}']


async def test_one_statement_keeps_the_receipts_of_a_batch(postgres_url: str) -> None:
    db = Database(postgres_url)
    await db.upgrade()
    try:
        ledger = Ledger(db)
        user = await funded(db, ledger, 9203)
        keys = [f"turn-b{i}" for i in range(3)]
        for key in keys:
            await ledger.hold(user, TON, key)
        closes = [
            Close(
                key, f"settle:{key}", "settle", request_hash("settle", {"k": key}), 1000, None, 0, u
            )
            for key, u in zip(keys, [usage('{"n":0}'), usage(None), None], strict=True)
        ]
        done = await close_in_one_statement(db, closes)
        assert done is not None and all(done)  # one statement, no fallback
        assert [await receipts(db, key) for key in keys] == [['{"n":0}'], [], []]
    finally:
        await db.close()


# -- the settling turn ----------------------------------------------------------------------------


class Settling(TurnSettlement):
    """A turn at its end, as :class:`backend.dispatch.Turn` leaves it to its settlement."""

    def __init__(
        self, d: SimpleNamespace, user_id: int, turn_id: str, held: int, raw: bytes
    ) -> None:
        key = nacl.signing.SigningKey(b"k" * 32)
        self.d = d
        self.request = TurnRequest(user_id, "m", [ChatMessage(role="user", content="hello")])
        self.turn_id, self.price, self.max_tokens, self.held = turn_id, PRICE, 100, held
        self.job_id = f"{turn_id}-1"
        self.worker = registry.WorkerInfo(
            worker_id="w-1",
            model="m",
            engine="instant",
            engine_version="1",
            box_public_key=base64.b64encode(bytes(32)).decode(),
            verify_key=key.verify_key.encode(nacl.encoding.Base64Encoder).decode(),
            capacity=1,
        )
        self.end_outcome, self.started_at = "failed", time.monotonic()
        self._delivered_bytes = 1000
        self._closed = self._counted = self._first_token_seen = False
        self._keep_request(SEALED)
        self._reply_size(REPLY)
        receipt = Receipt(
            job_id=self.job_id,
            model="m",
            request_sha256=sha256_hex(SEALED),
            reply_sha256=sha256_hex(raw),
            prompt_tokens=3,
            cached_prompt_tokens=0,
            completion_tokens=4,
            finish_reason="stop",
        )
        signed = sign_receipt(receipt, key).model_dump_json()
        self._reader = SimpleNamespace(receipt=signed)  # type: ignore[assignment]

    async def end(self) -> TurnDone:
        final = FinalRecord(
            job_id=self.job_id,
            prompt_tokens=3,
            cached_prompt_tokens=0,
            completion_tokens=4,
            finish_reason="stop",
        )
        return await self._settle(final)


@pytest.fixture
async def dispatcher(
    db: Database, redis_url: str, settings: Settings
) -> AsyncIterator[SimpleNamespace]:
    client = aioredis.Redis.from_url(redis_url)
    yield SimpleNamespace(
        settings=settings,
        ledger=Ledger(db),
        redis=client,
        metrics=None,
        workers=registry.WorkerSnapshot(client),
    )
    await client.aclose()


COST = (3 * PRICE.prompt + 4 * PRICE.completion) // 1_000_000


async def test_a_settled_turn_keeps_its_checked_receipt_with_its_charge(
    db: Database, dispatcher: SimpleNamespace
) -> None:
    ledger: Ledger = dispatcher.ledger
    user = await funded(db, ledger, 9204)
    await ledger.hold(user, TON, "turn-s")
    checkouts: list[object] = []
    listen = (db.engine.sync_engine, "checkout", lambda *_: checkouts.append(1))
    event.listen(*listen)
    done = await Settling(dispatcher, user, "turn-s", TON, REPLY.encode()).end()
    event.remove(*listen)
    assert len(checkouts) == 1  # the charge, the turn's record and its receipt: one transaction
    assert done.receipt is not None and done.cost == COST > 0
    kept = await load_receipt(db, user, "turn-s")
    assert kept is not None and kept == done.receipt and kept.cost_nanoton == str(COST)

    # A receipt whose reply digest is not the reply's: refused, not kept; the turn still pays.
    await ledger.hold(user, TON, "turn-bad")
    done = await Settling(dispatcher, user, "turn-bad", TON, b"another reply").end()
    assert done.receipt is None and done.cost == COST
    assert await receipts(db, "turn-bad") == []
    assert (await ledger.balances(user)).available == 5 * TON - 2 * COST


async def test_a_turn_no_settlement_closes_keeps_its_receipt_as_charged(
    db: Database, dispatcher: SimpleNamespace
) -> None:
    ledger: Ledger = dispatcher.ledger
    user = await funded(db, ledger, 9205)
    # The sweeper gave the hold back first: no charge, and the receipt says so.
    await ledger.hold(user, TON, "turn-late")
    await ledger.release("turn-late")
    done = await Settling(dispatcher, user, "turn-late", TON, REPLY.encode()).end()
    assert done.cost == 0
    kept = await load_receipt(db, user, "turn-late")
    assert kept is not None and kept.cost_nanoton == "0"
    # A free turn holds nothing, settles nothing, and keeps its receipt.
    done = await Settling(dispatcher, user, "turn-free", 0, REPLY.encode()).end()
    kept = await load_receipt(db, user, "turn-free")
    assert kept is not None and kept.cost_nanoton == "0" and kept == done.receipt
    assert (await ledger.balances(user)).available == 5 * TON


async def test_the_receipts_of_free_turns_ending_together_share_one_commit(
    db: Database, dispatcher: SimpleNamespace
) -> None:
    """A free turn has no settlement to ride with: the receipts of free turns that end
    together are group-committed, one INSERT, one commit; a receipt kept already stays as it
    was, and one that cannot be kept fails no other."""
    ledger: Ledger = dispatcher.ledger
    user = await funded(db, ledger, 9206)
    turns = [Settling(dispatcher, user, f"turn-free-{i}", 0, REPLY.encode()) for i in range(20)]
    checkouts: list[object] = []
    listen = (db.engine.sync_engine, "checkout", lambda *_: checkouts.append(1))
    event.listen(*listen)
    done = await asyncio.gather(*(turn.end() for turn in turns))
    event.remove(*listen)
    assert len(checkouts) <= 2  # not one each: twenty turns, one commit (the first may go alone)
    for i, turn in enumerate(done):
        kept = await load_receipt(db, user, f"turn-free-{i}")
        assert kept is not None and kept == turn.receipt and kept.cost_nanoton == "0"

    results = await asyncio.gather(
        ledger.keep_receipt("turn-free-0", user, "{}"),  # kept already
        ledger.keep_receipt("turn-new", user, "{}"),
        ledger.keep_receipt("turn-nobody", 10**9, "{}"),  # no such user
        return_exceptions=True,
    )
    assert results[:2] == [False, True]
    assert isinstance(results[2], IntegrityError)
    assert await load_receipt(db, user, "turn-free-0") == done[0].receipt
    assert await receipts(db, "turn-new") == ["{}"]
    assert await receipts(db, "turn-nobody") == []
