"""A page of deposits credited and recorded in one database transaction: steps 2 and 3 of
:mod:`backend.ton.watcher` for many transactions at once (a backlog of 10,000 in seconds).

Each credited deposit is still its own ledger transaction under its own idempotency key
(``ton:<account>:<lt>:<hash>``, with the fingerprint :class:`~backend.ledger.Ledger` gives a
deposit, so a later ``credit_deposit`` of the same key replays it); what is batched is the
database work: the ledger transactions, their entries, the deposit rows and the
notifications are each one statement (:func:`insert_many`: on PostgreSQL an INSERT from
arrays, one a column), every balance one UPDATE, and the cursor moves in the same commit.
So a crash anywhere leaves either the whole page or none of it, and the next poll reads it
again from the cursor.

The batch refuses (:class:`NotBatched`, nothing written) whatever the general path of
:meth:`~backend.ton.watcher.DepositWatcher.handle` decides better, one transaction at a time:
a ledger key already used (an older crash between crediting and recording), an account
missing, a balance that would overflow, a twin watcher's rows (a unique constraint). That
path records each transaction with :func:`record_one`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import BigInteger, Row, Table, bindparam, insert, select, text, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from backend import notifications
from backend.db import Database, rowcount
from backend.ledger_write import request_hash
from backend.models import (
    Account,
    AccountKind,
    Entry,
    Notification,
    TonCursor,
    TonDeposit,
    TonDepositStatus,
    Transaction,
    utcnow,
)
from backend.notifications import NOTIFY_DEPOSIT
from backend.settings import MAX_NANO

__all__ = [
    "Booking",
    "NotBatched",
    "insert_many",
    "log_recorded",
    "move_cursor",
    "record_one",
    "record_page",
]

log = logging.getLogger("backend.ton.watcher")  # what the watcher recorded, in its log


class NotBatched(Exception):
    """The page cannot be recorded in one go; nothing was written."""


@dataclass(frozen=True)
class Booking:
    """One transaction of the page as the watcher decided it: the ``ton_deposits`` row to
    write (without ``id``) and, for a credited deposit, the user and amount."""

    row: dict[str, Any]
    user_id: int | None  # credited to this user (status credited), else None
    reason: str


async def record_page(
    db: Database, account: str, bookings: Sequence[Booking], checkpoint: Callable[[str], None]
) -> list[tuple[dict[str, Any], bool]]:
    """Record ``bookings`` (in lt order), crediting the credited ones, in one transaction;
    each deposit's row as written (with its ``id``) and whether it is new (False: recorded
    before, left alone). Raises NotBatched, or IntegrityError when a twin wrote the same
    rows first."""
    async with db.session() as session, session.begin():
        lts = sorted({b.row["lt"] for b in bookings})
        seen = {
            (int(lt), tx_hash): deposit_id
            for lt, tx_hash, deposit_id in await session.execute(
                select(TonDeposit.lt, TonDeposit.tx_hash, TonDeposit.id).where(
                    TonDeposit.account == account, TonDeposit.lt.in_(lts)
                )
            )
        }
        new = [b for b in bookings if (b.row["lt"], b.row["tx_hash"]) not in seen]
        credits = [b for b in new if b.user_id is not None]
        await _credit(session, db.dialect, credits, checkpoint)
        ids: dict[str, int] = {}
        if new:
            written = await insert_many(
                session, db.dialect, TonDeposit, [b.row for b in new], ("id", "ledger_key")
            )
            ids = {key: deposit_id for deposit_id, key in written}
        if credits:
            await insert_many(
                session,
                db.dialect,
                Notification,
                [
                    {
                        "key": f"deposit:{ids[b.row['ledger_key']]}",
                        "user_id": b.user_id,
                        "kind": NOTIFY_DEPOSIT,
                        "amount": _credited(b),
                    }
                    for b in credits
                ],
            )
        if bookings:
            last = bookings[-1].row
            await move_cursor(session, account, last["lt"], last["tx_hash"])
    recorded = []
    for b in bookings:
        key = (b.row["lt"], b.row["tx_hash"])
        created = key not in seen
        deposit_id = ids[b.row["ledger_key"]] if created else seen[key]
        recorded.append(({**b.row, "id": deposit_id}, created))
    return recorded


def _table(model: type[object]) -> Table:
    return cast(Table, model.__table__)  # type: ignore[attr-defined]


async def insert_many(
    session: AsyncSession,
    dialect: str,
    model: type[object],
    rows: Sequence[Mapping[str, Any]],
    returning: Sequence[str] = (),
) -> Sequence[Row[*tuple[Any, ...]]]:
    """Insert ``rows`` (each with the same keys) into ``model``'s table in one statement; the
    ``returning`` columns of each row written. On PostgreSQL an ``INSERT ... SELECT FROM
    unnest(...)`` with one array a column (a page's thousands of values bound as a few
    arrays, the statement prepared once); elsewhere Core's executemany (a multi-row
    INSERT). A ``created_at`` not given is now, as the column's default would make it."""
    if not rows:
        return []
    table = _table(model)
    names = list(rows[0])
    now = utcnow()
    if "created_at" in table.c and "created_at" not in names:
        rows = [{**row, "created_at": now} for row in rows]
        names.append("created_at")
    if dialect != "postgresql":
        statement = insert(table)
        if not returning:
            await session.execute(statement, list(rows))
            return []
        written = await session.execute(
            statement.returning(*(table.c[name] for name in returning)), list(rows)
        )
        return written.all()
    pg = postgresql.dialect()
    arrays = ", ".join(
        f"CAST(:{name} AS {table.c[name].type.compile(dialect=pg)}[])" for name in names
    )
    sql = f"INSERT INTO {table.name} ({', '.join(names)}) SELECT * FROM unnest({arrays})"
    if returning:
        sql += f" RETURNING {', '.join(returning)}"
    written = await session.execute(
        text(sql), {name: [row[name] for row in rows] for name in names}
    )
    return written.all() if returning else []


def _credited(booking: Booking) -> int:
    credited = booking.row.get("credited")
    return int(credited if credited is not None else booking.row["amount"])


async def _credit(
    session: AsyncSession,
    dialect: str,
    credits: Sequence[Booking],
    checkpoint: Callable[[str], None],
) -> None:
    """The ledger transactions of ``credits``: TON_IN → each user, one key each."""
    if not credits:
        return
    keys = [b.row["ledger_key"] for b in credits]
    if await session.scalar(select(Transaction.id).where(Transaction.idempotency_key.in_(keys))):
        raise NotBatched("a ledger key of the page is used already")
    users = {b.user_id for b in credits}
    found = await session.execute(
        select(Account.id, Account.kind, Account.owner_id).where(
            ((Account.kind == AccountKind.USER) & Account.owner_id.in_(users))
            | ((Account.kind == AccountKind.TON_IN) & (Account.owner_id == 0))
        )
    )
    ids = {(str(kind), owner): account_id for account_id, kind, owner in found}
    source = ids.get((str(AccountKind.TON_IN), 0))
    if source is None or any((str(AccountKind.USER), user) not in ids for user in users):
        raise NotBatched("an account is missing")
    written = await insert_many(
        session,
        dialect,
        Transaction,
        [
            {
                "idempotency_key": b.row["ledger_key"],
                "kind": "deposit",
                "request_hash": request_hash(
                    "deposit",
                    {"user": b.user_id, "amount": _credited(b), "source": str(AccountKind.TON_IN)},
                ),
                "reason": b.reason,
            }
            for b in credits
        ],
        ("id", "idempotency_key"),
    )
    tx_ids = {key: tx_id for tx_id, key in written}
    entries: list[dict[str, int]] = []
    deltas: dict[int, int] = {}
    for b in credits:
        amount = _credited(b)
        if b.user_id is None or not 0 < amount <= MAX_NANO:
            raise NotBatched(f"amount {amount} out of range")
        target = ids[(str(AccountKind.USER), b.user_id)]
        tx_id = tx_ids[b.row["ledger_key"]]
        entries.append({"transaction_id": tx_id, "account_id": source, "amount": -amount})
        entries.append({"transaction_id": tx_id, "account_id": target, "amount": amount})
        deltas[target] = deltas.get(target, 0) + amount
        checkpoint("credited")
    total = sum(deltas.values())
    if total > MAX_NANO or any(d > MAX_NANO for d in deltas.values()):
        raise NotBatched("the page's credits overflow one statement")
    await insert_many(session, dialect, Entry, entries)
    if dialect == "postgresql":  # one statement for every balance
        moved = await session.execute(
            _CREDIT_ALL, {"ids": list(deltas), "deltas": list(deltas.values()), "max": MAX_NANO}
        )
    else:  # SQLite: the same guarded UPDATE for each balance, one compiled statement
        table = _table(Account)
        accounts = table.c
        moved = await session.execute(
            update(table)
            .where(
                accounts.id == bindparam("account"),
                accounts.balance <= MAX_NANO - bindparam("delta", type_=BigInteger),
            )
            .values(balance=accounts.balance + bindparam("delta", type_=BigInteger)),
            [{"account": k, "delta": v} for k, v in deltas.items()],
        )
    if rowcount(moved) != len(deltas):
        raise NotBatched("a balance would overflow 64 bits")
    moved = await session.execute(
        update(Account)
        .where(Account.id == source, Account.balance >= -MAX_NANO - 1 + total)
        .values(balance=Account.balance - total)
        .execution_options(synchronize_session=False)
    )
    if rowcount(moved) != 1:
        raise NotBatched("the TON_IN balance would overflow 64 bits")


# Every user's credit of a page on PostgreSQL, each balance guarded against overflowing 64 bits
# (a balance that would is left alone, and the row count says so).
_CREDIT_ALL = text(
    """
UPDATE accounts SET balance = accounts.balance + d.delta
FROM (SELECT unnest(CAST(:ids AS BIGINT[])) AS id, unnest(CAST(:deltas AS BIGINT[])) AS delta) AS d
WHERE accounts.id = d.id AND accounts.balance <= CAST(:max AS BIGINT) - d.delta
"""
)


async def record_one(db: Database, account: str, row: dict[str, Any]) -> tuple[TonDeposit, bool]:
    """Record one transaction (its deposit credited before, under its key), queue its user's
    notification and move the cursor past it, in one database transaction; the row and
    whether it is new (False: recorded before, left alone)."""
    lt, tx_hash, user_id = row["lt"], row["tx_hash"], row["user_id"]
    for _attempt in range(3):
        try:
            async with db.session() as session, session.begin():
                existing = await session.scalar(
                    select(TonDeposit).where(
                        TonDeposit.account == account,
                        TonDeposit.lt == lt,
                        TonDeposit.tx_hash == tx_hash,
                    )
                )
                created = existing is None
                if existing is None:
                    existing = TonDeposit(**row)
                    session.add(existing)
                    await session.flush()
                    if row["status"] == TonDepositStatus.CREDITED and user_id is not None:
                        credited = row["credited"]
                        notifications.add(
                            session,
                            user_id,
                            NOTIFY_DEPOSIT,
                            f"deposit:{existing.id}",
                            amount=row["amount"] if credited is None else credited,
                        )
                await move_cursor(session, account, lt, tx_hash)
            return existing, created
        except IntegrityError:
            continue  # a twin watcher recorded it first: read it back next time round
    raise RuntimeError(f"could not record deposit {row['ledger_key']}")


async def move_cursor(session: AsyncSession, account: str, lt: int, tx_hash: str) -> None:
    """Move ``account``'s cursor up to ``lt`` (never back), in the caller's transaction."""
    moved = await session.execute(
        update(TonCursor)
        .where(TonCursor.account == account, TonCursor.last_lt < lt)
        .values(last_lt=lt, last_hash=tx_hash)
        .execution_options(synchronize_session=False)
    )
    if rowcount(moved) == 0 and await session.get(TonCursor, account) is None:
        session.add(TonCursor(account=account, last_lt=lt, last_hash=tx_hash))


def log_recorded(deposit: Mapping[str, Any]) -> None:
    """One line for every transaction that was not credited, with its amount and reason."""
    if deposit["status"] == TonDepositStatus.UNCLAIMED and deposit["credited"] is not None:
        log.warning(
            "unclaimed USDT deposit #%s: %s micro-units (%s nanoTON at its rate), lt %s (%s)",
            deposit["id"],
            deposit["jetton_amount"],
            deposit["credited"],
            deposit["lt"],
            deposit["note"],
        )
    elif deposit["status"] == TonDepositStatus.UNCLAIMED:
        log.warning(
            "unclaimed TON deposit #%s: %s nanoTON, lt %s (%s)",
            deposit["id"],
            deposit["amount"],
            deposit["lt"],
            deposit["note"],
        )
    elif deposit["status"] == TonDepositStatus.JETTON:
        log.warning(
            "jetton notification #%s (%s): %s units of jetton %s from %s through %s, "
            "%s nanoTON, lt %s",
            deposit["id"],
            deposit["note"],
            deposit["jetton_amount"],
            deposit["jetton_master"] or "unknown",
            deposit["jetton_sender"],
            deposit["source"],
            deposit["amount"],
            deposit["lt"],
        )
    elif deposit["status"] == TonDepositStatus.IGNORED:
        log.info(
            "ignored TON transaction #%s: %s nanoTON, lt %s (%s)",
            deposit["id"],
            deposit["amount"],
            deposit["lt"],
            deposit["note"],
        )
