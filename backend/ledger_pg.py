"""The ledger's per-turn operations each in one statement, one round trip, on PostgreSQL: the
hold on a priced turn's way to its first token, and the hold's close (its settlement or its
release) at the turn's end.

Each statement writes exactly the rows :meth:`backend.ledger_write.LedgerWriter._run` writes
for the same operation, or nothing at all: a single statement is atomic, and a failed check
(a short balance, a missing account, a key already used, a CHECK or a 64-bit overflow) fails
it whole. The caller then takes the general path, which does it, replays it, or says why not,
as it always has. A statement that cannot apply returns None.

Exactly-once stays where it was: a hold's close claims the hold row (``state = 'open'``)
before it moves any money, so of a settlement, its replays and the sweeper's release, one
closes the hold and every other finds it closed. Accounts are locked in one order in every
statement (a user's balance, then their holds, then a provider's, then the platform's), so two
turns never wait on each other in a cycle.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Executable, Row, text
from sqlalchemy.exc import DBAPIError, InterfaceError

from backend.db import Database, insert_new
from backend.group_commit import GroupCommit
from backend.ledger_types import Leg, Receipt, TurnUsage
from backend.models import AccountKind, HoldState, TurnReceipt

__all__ = [
    "Close",
    "CloseBatcher",
    "close_in_one_statement",
    "hold_in_one_statement",
    "keep_in_one_statement",
]


async def _rows(
    db: Database, statement: Executable, params: Mapping[str, Any]
) -> Sequence[Row[*tuple[Any, ...]]] | None:
    """Run one statement in its own transaction (autocommit: the statement's end is its
    commit) on a connection checked out without the pool's ping: one round trip in all on a
    healthy connection. One the statement finds dead (or unusable) is dropped and the statement
    tried once more on a fresh, pinged one: safe, since a statement that did commit finds its
    key used or its hold closed the second time, and the caller's general path replays it.
    Its rows, or None when it failed as a whole."""
    for again in (False, True):
        try:
            async with db.autocommit(ping=again) as connection:
                try:
                    return (await connection.execute(statement, params)).all()
                except InterfaceError as error:  # the client's side: the connection is unusable
                    if not error.connection_invalidated:
                        await connection.invalidate()
                    raise
        except DBAPIError as error:  # a key already used, an overflow, a CHECK: nothing written
            if again or not (error.connection_invalidated or isinstance(error, InterfaceError)):
                return None
    return None


async def hold_in_one_statement(
    db: Database, user_id: int, amount: int, key: str, request_hash: str
) -> Receipt | None:
    """Set ``amount`` aside from the user's balance under ``key``; None when it did not apply
    (the balance short, the key already used, no such accounts, the hold account overflowing)."""
    found = await _rows(
        db,
        _HOLD,
        {
            "key": key,
            "hash": request_hash,
            "user_id": user_id,
            "amount": amount,
            "user_kind": str(AccountKind.USER),
            "hold_kind": str(AccountKind.HOLD),
            "now": dt.datetime.now(dt.UTC),
        },
    )
    if not found or found[0][0] is None:  # the balance is short: nothing was written
        return None
    legs = (Leg(AccountKind.USER, user_id, -amount), Leg(AccountKind.HOLD, user_id, amount))
    return Receipt(found[0][0], key, "hold", legs, found[0][1])


async def keep_in_one_statement(db: Database, rows: list[dict[str, Any]]) -> set[str] | None:
    """Keep turns' receipts (``turn_id``, ``user_id``, ``body``) in one statement, one round
    trip: the turn ids of those new (one kept already stays as it was); None when the statement
    failed as a whole (nothing was written)."""
    statement = insert_new(db.dialect, TurnReceipt).values(rows).returning(TurnReceipt.turn_id)
    found = await _rows(db, statement, {})
    return None if found is None else {row[0] for row in found}


@dataclass(frozen=True)
class Close:
    """One hold's close: ``kind`` "settle" (the user pays ``cost``, at most the hold, the
    provider its share rounded down, the platform the rest, the remainder goes back; ``usage``
    recorded as the turn's record) or "release" (cost 0: all of it goes back)."""

    hold_key: str
    key: str
    kind: str
    request_hash: str
    cost: int = 0
    provider_id: int | None = None
    share_bps: int = 0
    usage: TurnUsage | None = None


async def close_in_one_statement(
    db: Database, closes: Sequence[Close]
) -> list[Receipt | None] | None:
    """Close holds, each its own ledger transaction, all in one statement (one commit); for
    each, its receipt, or None where its hold was not open (closed already, or never made).
    None when the statement failed as a whole (a key already used, an account missing or
    overflowing): nothing was written. Hold keys and keys must be distinct in ``closes``."""
    blank = TurnUsage("", 0, 0, 0, "")
    usages = [close.usage or blank for close in closes]
    found = await _rows(
        db,
        _CLOSE,
        {
            "hold_keys": [close.hold_key for close in closes],
            "keys": [close.key for close in closes],
            "kinds": [close.kind for close in closes],
            "states": [
                str(HoldState.SETTLED if close.kind == "settle" else HoldState.RELEASED)
                for close in closes
            ],
            "hashes": [close.request_hash for close in closes],
            "costs": [close.cost for close in closes],
            "shares": [close.share_bps if close.provider_id is not None else 0 for close in closes],
            "provider_ids": [close.provider_id for close in closes],
            "records": [close.usage is not None for close in closes],
            "models": [usage.model for usage in usages],
            "prompt_tokens": [usage.prompt_tokens for usage in usages],
            "cached_prompt_tokens": [usage.cached_prompt_tokens for usage in usages],
            "completion_tokens": [usage.completion_tokens for usage in usages],
            "worker_ids": [usage.worker_id for usage in usages],
            "tees": [usage.tee for usage in usages],
            "finish_reasons": [usage.finish_reason for usage in usages],
            "receipts": [usage.receipt for usage in usages],
            "now": dt.datetime.now(dt.UTC),
            "user_kind": str(AccountKind.USER),
            "hold_kind": str(AccountKind.HOLD),
            "provider_kind": str(AccountKind.PROVIDER),
            "platform_kind": str(AccountKind.PLATFORM),
        },
    )
    if found is None:
        return None
    receipts: list[Receipt | None] = [None] * len(closes)
    for transaction_id, i, hold_id, user_id, amount, charged, earned, *_ in found:
        close = closes[i - 1]
        legs = (
            Leg(AccountKind.HOLD, user_id, -amount),
            Leg(AccountKind.USER, user_id, amount - charged),
            Leg(AccountKind.PROVIDER, close.provider_id or 0, earned),
            Leg(AccountKind.PLATFORM, 0, charged - earned),
        )
        receipts[i - 1] = Receipt(
            transaction_id, close.key, close.kind, tuple(leg for leg in legs if leg.amount), hold_id
        )
    return receipts


class CloseBatcher(GroupCommit[Close, Receipt | None]):
    """Group commit of holds' closes on PostgreSQL (:class:`~backend.group_commit.GroupCommit`):
    closes asked while one is in flight go together, as one statement
    (:func:`close_in_one_statement`: one commit, one wait on the platform's and each provider's
    balance instead of one each). Each close is still its own idempotent ledger transaction
    under its own key (a twin, the same hold or key, waits for the next batch: it then
    replays); a batch is atomic, and a batch that fails as a whole is tried again one close at
    a time, so one bad close never fails another."""

    def __init__(self, db: Database, *, max_batch: int = 64) -> None:
        super().__init__(
            self._apply, max_batch=max_batch, keys=lambda close: (close.hold_key, close.key)
        )
        self.db = db

    async def close(self, close: Close) -> Receipt | None:
        """The close's receipt; None when it did not apply (the caller's general path then
        does it, replays it, or says why not)."""
        return await self.write(close)

    async def _apply(self, closes: list[Close]) -> list[Receipt | None]:
        receipts = await close_in_one_statement(self.db, closes)
        if receipts is not None:
            return receipts
        if len(closes) == 1:
            return [None]
        return [(await self._apply([close]))[0] for close in closes]


# The hold: take the amount off the user's balance (only if it covers it), put it on the hold
# account (a bigint overflow fails the whole statement), and write the hold, the transaction
# about it and its two entries, in the legs' order; NULLs when the balance is short.
# Data-modifying CTEs run once each, to completion, as one atomic statement.
_HOLD = text(
    """
WITH debit AS (
  UPDATE accounts SET balance = balance - CAST(:amount AS BIGINT)
  WHERE kind = CAST(:user_kind AS VARCHAR) AND owner_id = CAST(:user_id AS BIGINT)
    AND balance >= CAST(:amount AS BIGINT)
  RETURNING id
), credit AS (
  UPDATE accounts SET balance = balance + CAST(:amount AS BIGINT)
  WHERE kind = CAST(:hold_kind AS VARCHAR) AND owner_id = CAST(:user_id AS BIGINT)
    AND EXISTS (SELECT 1 FROM debit)
  RETURNING id
), new_hold AS (
  INSERT INTO holds (key, user_id, amount, state, charged, created_at)
  SELECT CAST(:key AS VARCHAR), CAST(:user_id AS BIGINT), CAST(:amount AS BIGINT), 'open', 0,
         CAST(:now AS TIMESTAMPTZ)
  FROM credit
  RETURNING id
), tx AS (
  INSERT INTO ledger_transactions (idempotency_key, kind, request_hash, reason, subject_id,
                                   created_at)
  SELECT CAST(:key AS VARCHAR), 'hold', CAST(:hash AS VARCHAR), NULL, new_hold.id,
         CAST(:now AS TIMESTAMPTZ)
  FROM new_hold
  RETURNING id, subject_id
), entries AS (
  INSERT INTO ledger_entries (transaction_id, account_id, amount)
  SELECT tx.id, leg.account_id, leg.amount
  FROM tx, (SELECT 1, id, -CAST(:amount AS BIGINT) FROM debit
            UNION ALL SELECT 2, id, CAST(:amount AS BIGINT) FROM credit)
           AS leg (n, account_id, amount)
  ORDER BY leg.n
  RETURNING id
)
SELECT (SELECT id FROM tx), (SELECT subject_id FROM tx),
       -- a debit without its credit (no hold account) divides by zero: nothing is written
       (SELECT count(*) FROM debit)
         / ((SELECT count(*) FROM credit) + 1 - (SELECT count(*) FROM debit))
"""
)

# Holds' closes, any number in one statement (a batch of one for a single close): claim each
# open hold (the exactly-once gate: a racing close waits on its row, then finds it closed and
# writes nothing for it), work out each one's four legs (n: the general path's order, kept in
# the entries), lock the accounts the legs move money on, in one order for every statement
# (rank: a user's balance, their holds, providers', the platform's; then id), move each
# account's sum, and write each close's own transaction (its key, its fingerprint), its
# entries, its turn's record and its receipt (a receipt kept already stays as it was). The
# last column divides by zero when an account is missing: nothing at all is written. One row
# per hold closed, in the batch's order.
_CLOSE = text(
    """
WITH batch AS (
  SELECT * FROM unnest(
    CAST(:hold_keys AS VARCHAR[]), CAST(:keys AS VARCHAR[]), CAST(:kinds AS VARCHAR[]),
    CAST(:states AS VARCHAR[]), CAST(:hashes AS VARCHAR[]), CAST(:costs AS BIGINT[]),
    CAST(:shares AS INTEGER[]), CAST(:provider_ids AS INTEGER[]), CAST(:records AS BOOLEAN[]),
    CAST(:models AS VARCHAR[]), CAST(:prompt_tokens AS INTEGER[]),
    CAST(:cached_prompt_tokens AS INTEGER[]), CAST(:completion_tokens AS INTEGER[]),
    CAST(:worker_ids AS VARCHAR[]), CAST(:tees AS VARCHAR[]), CAST(:finish_reasons AS VARCHAR[]),
    CAST(:receipts AS TEXT[])
  ) WITH ORDINALITY AS b (hold_key, key, kind, state, hash, cost, share, provider_id, record,
                          model, prompt_tokens, cached_prompt_tokens, completion_tokens,
                          worker_id, tee, finish_reason, receipt, i)
), closed AS (
  UPDATE holds SET state = batch.state, charged = LEAST(holds.amount, batch.cost),
                   closed_at = CAST(:now AS TIMESTAMPTZ)
  FROM batch
  WHERE holds.key = batch.hold_key AND holds.state = 'open'
  RETURNING holds.id, holds.user_id, holds.amount, holds.charged, batch.*
), cut AS (
  SELECT closed.*,
         CAST(div(CAST(charged AS NUMERIC) * share, 10000) AS BIGINT) AS earned
  FROM closed
), legs AS (
  SELECT cut.key, leg.n, leg.rank, leg.kind, leg.owner_id, leg.amount
  FROM cut, LATERAL (VALUES
    (1, 2, CAST(:hold_kind AS VARCHAR), CAST(cut.user_id AS BIGINT), -cut.amount),
    (2, 1, CAST(:user_kind AS VARCHAR), CAST(cut.user_id AS BIGINT), cut.amount - cut.charged),
    (3, 3, CAST(:provider_kind AS VARCHAR), CAST(coalesce(cut.provider_id, 0) AS BIGINT),
     cut.earned),
    (4, 4, CAST(:platform_kind AS VARCHAR), CAST(0 AS BIGINT), cut.charged - cut.earned)
  ) AS leg (n, rank, kind, owner_id, amount)
  WHERE leg.amount <> 0
), locked AS (
  SELECT accounts.id, accounts.kind, accounts.owner_id
  FROM accounts JOIN (SELECT DISTINCT rank, kind, owner_id FROM legs) AS needed
    ON accounts.kind = needed.kind AND accounts.owner_id = needed.owner_id
  ORDER BY needed.rank, accounts.id
  FOR UPDATE OF accounts
), moved AS (
  UPDATE accounts SET balance = accounts.balance + sums.total
  FROM (SELECT locked.id, sum(legs.amount) AS total
        FROM locked JOIN legs ON legs.kind = locked.kind AND legs.owner_id = locked.owner_id
        GROUP BY locked.id) AS sums
  WHERE accounts.id = sums.id
  RETURNING accounts.id
), tx AS (
  INSERT INTO ledger_transactions (idempotency_key, kind, request_hash, reason, subject_id,
                                   created_at)
  SELECT closed.key, closed.kind, closed.hash, NULL, closed.id, CAST(:now AS TIMESTAMPTZ)
  FROM closed ORDER BY closed.i
  RETURNING id, idempotency_key
), entries AS (
  INSERT INTO ledger_entries (transaction_id, account_id, amount)
  SELECT tx.id, locked.id, legs.amount
  FROM legs JOIN tx ON tx.idempotency_key = legs.key
            JOIN locked ON locked.kind = legs.kind AND locked.owner_id = legs.owner_id
  ORDER BY tx.id, legs.n
  RETURNING id
), turn AS (
  INSERT INTO turns (turn_id, user_id, model, prompt_tokens, cached_prompt_tokens,
                     completion_tokens, cost, provider_id, provider_earned, worker_id, tee,
                     finish_reason, created_at)
  SELECT hold_key, user_id, model, prompt_tokens, cached_prompt_tokens, completion_tokens,
         charged, provider_id, earned, worker_id, tee, finish_reason, CAST(:now AS TIMESTAMPTZ)
  FROM cut WHERE record
  ORDER BY cut.i
  RETURNING id
), kept AS (
  INSERT INTO receipts (turn_id, user_id, body, created_at)
  SELECT hold_key, user_id, receipt, CAST(:now AS TIMESTAMPTZ)
  FROM cut WHERE record AND receipt IS NOT NULL
  ORDER BY cut.i
  ON CONFLICT (turn_id) DO NOTHING
  RETURNING turn_id
)
SELECT tx.id, cut.i, cut.id, cut.user_id, cut.amount, cut.charged, cut.earned,
       (SELECT count(*) FROM entries) + (SELECT count(*) FROM turn) + (SELECT count(*) FROM kept),
       (SELECT count(*) FROM legs)
         / CASE WHEN (SELECT count(*) FROM moved)
                     = (SELECT count(*) FROM (SELECT DISTINCT kind, owner_id FROM legs) AS d)
                THEN 1 ELSE 0 END
FROM cut JOIN tx ON tx.idempotency_key = cut.key
ORDER BY cut.i
"""
)
