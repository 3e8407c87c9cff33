"""How one ledger transaction is written, on any database (the general path): its key
claimed, its legs applied under their guards, each balance changed by a conditional ``UPDATE``
that refuses an overdraft and a 64-bit overflow, all in one database transaction; a key used
again answered with the first receipt (a replay), a key reused for another request refused.
:class:`backend.ledger.Ledger` builds every operation on it; on PostgreSQL the per-turn ones
take one statement first (:mod:`backend.ledger_pg`) and come here when it did not apply."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping

from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from backend.db import Database, rowcount
from backend.ledger_types import (
    IdempotencyConflict,
    InsufficientFunds,
    InvalidAmount,
    InvalidState,
    LedgerError,
    Leg,
    NotFound,
    Receipt,
    validate_amount,
    validate_key,
)
from backend.models import Account, AccountKind, Entry, Hold, HoldState, Transaction
from backend.settings import MAX_NANO

__all__ = ["Body", "LedgerWriter", "request_hash"]

Body = Callable[[AsyncSession, Transaction], Awaitable[tuple[list[Leg], int | None]]]


class LedgerWriter:
    """The general path of every ledger operation over one :class:`Database`."""

    def __init__(
        self,
        db: Database,
        *,
        min_withdrawal: int = 1,
        one_statement: bool = True,
        close_batch: int = 64,
    ) -> None:
        self.db = db
        # On PostgreSQL, a hold and a hold's close each in one statement (backend.ledger_pg);
        # False: always the general path (the baseline of tests and benchmarks).
        self.one_statement = one_statement and db.dialect == "postgresql"
        # The most holds' closes committed together (1: each its own commit).
        self.close_batch = max(1, close_batch)
        self.min_withdrawal = validate_amount(min_withdrawal, "minimum withdrawal")
        self._account_ids: dict[tuple[str, int], int] = {}

    async def _close_hold(self, session: AsyncSession, hold_key: str, state: HoldState) -> Hold:
        hold = await session.scalar(select(Hold).where(Hold.key == hold_key))
        if hold is None:
            raise NotFound(f"no hold {hold_key!r}")
        closed = await session.execute(
            update(Hold)
            .where(Hold.id == hold.id, Hold.state == HoldState.OPEN)
            .values(state=state, closed_at=dt.datetime.now(dt.UTC))
            .execution_options(synchronize_session=False)
        )
        if rowcount(closed) != 1:
            await session.refresh(hold)
            raise InvalidState(f"hold {hold_key!r} is already {hold.state}")
        return hold

    async def _run(
        self, key: str, kind: str, request: Mapping[str, object], body: Body, reason: str | None
    ) -> Receipt:
        validate_key(key)
        fingerprint = request_hash(kind, request)
        dropped = False
        for attempt in range(3):
            try:
                async with self.db.session() as session, session.begin():
                    # The first attempt claims the key without looking (one round trip less on
                    # every operation); a key already used fails its INSERT, and the next
                    # attempt replays it.
                    existing = (
                        await session.scalar(
                            select(Transaction).where(Transaction.idempotency_key == key)
                        )
                        if attempt
                        else None
                    )
                    if existing is not None:
                        return await self._replay(session, existing, fingerprint)
                    tx = Transaction(
                        idempotency_key=key, kind=kind, request_hash=fingerprint, reason=reason
                    )
                    session.add(tx)
                    await session.flush()  # claims the key: a racing twin waits or fails here
                    legs, subject_id = await body(session, tx)
                    tx.subject_id = subject_id
                    legs = [leg for leg in legs if leg.amount != 0]
                    if sum(leg.amount for leg in legs) != 0:
                        raise AssertionError(f"unbalanced {kind} transaction")  # a bug, not input
                    for leg in legs:
                        account_id = await self._account_id(session, leg.kind, leg.owner_id)
                        await self._apply(session, account_id, leg)
                        session.add(
                            Entry(transaction_id=tx.id, account_id=account_id, amount=leg.amount)
                        )
                    await session.flush()
                    return Receipt(tx.id, key, kind, tuple(legs), subject_id)
            except IntegrityError:
                # Either a twin with the same key committed first (the next attempt replays
                # it), or a unique constraint of the body failed (the next attempt fails again
                # with the same error, which we then let through).
                async with self.db.session() as session:
                    if await session.scalar(
                        select(Transaction.id).where(Transaction.idempotency_key == key)
                    ):
                        continue
                raise
            except DBAPIError as error:
                # The connection died under the operation (a restart, a failover, a pooled
                # connection that died after its ping). Once more, on a
                # fresh one: it looks the key up first, so what did commit is replayed.
                if dropped or not error.connection_invalidated:
                    raise
                dropped = True
        raise LedgerError(f"could not apply {key!r}: it kept conflicting")

    async def _replay(self, session: AsyncSession, tx: Transaction, fingerprint: str) -> Receipt:
        if tx.request_hash != fingerprint:
            raise IdempotencyConflict(
                f"key {tx.idempotency_key!r} was already used for a different {tx.kind} request"
            )
        accounts = {
            account.id: account
            for account in await session.scalars(
                select(Account).where(Account.id.in_([e.account_id for e in tx.entries]))
            )
        }
        legs = tuple(
            Leg(
                AccountKind(accounts[e.account_id].kind),
                accounts[e.account_id].owner_id,
                e.amount,
            )
            for e in tx.entries
        )
        return Receipt(tx.id, tx.idempotency_key, tx.kind, legs, tx.subject_id, replayed=True)

    async def _account_id(self, session: AsyncSession, kind: AccountKind, owner_id: int) -> int:
        cache_key = (str(kind), owner_id)
        account_id = self._account_ids.get(cache_key)
        if account_id is None:
            account_id = await session.scalar(
                select(Account.id).where(Account.kind == kind, Account.owner_id == owner_id)
            )
            if account_id is None:
                raise NotFound(f"no {kind} account for owner {owner_id}")
            self._account_ids[cache_key] = account_id
        return account_id

    async def _apply(self, session: AsyncSession, account_id: int, leg: Leg) -> None:
        """Change one balance atomically, refusing overdraft and 64-bit overflow."""
        amount = leg.amount
        guard = (
            Account.balance <= MAX_NANO - amount
            if amount > 0
            else (
                Account.balance >= -MAX_NANO - 1 - amount
                if leg.kind.may_go_negative
                else Account.balance >= -amount
            )
        )
        result = await session.execute(
            update(Account)
            .where(Account.id == account_id, guard)
            .values(balance=Account.balance + amount)
            .execution_options(synchronize_session=False)
        )
        if rowcount(result) == 1:
            return
        if amount < 0 and not leg.kind.may_go_negative:
            raise InsufficientFunds(
                f"{leg.kind} balance of owner {leg.owner_id} is below {-amount} nanoTON"
            )
        raise InvalidAmount(f"{leg.kind} balance of owner {leg.owner_id} would overflow 64 bits")


def request_hash(kind: str, request: Mapping[str, object]) -> str:
    return hashlib.sha256(
        json.dumps({"kind": kind, **request}, sort_keys=True).encode()
    ).hexdigest()
