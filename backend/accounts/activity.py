"""A user's usage (settled turns and their totals) and history (deposits, turns and payouts,
one page at a time, newest first: by page number, or after a cursor, which new items never
shift)."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from sqlalchemy import ColumnElement, Select, and_, func, or_, select, true
from sqlalchemy.ext.asyncio import AsyncSession

from backend.accounts.errors import AccountError
from backend.db import Database
from backend.errors import ErrorCode
from backend.models import (
    Account,
    AccountKind,
    Entry,
    Payout,
    TonDeposit,
    Transaction,
    TurnRecord,
)

__all__ = [
    "HISTORY_KINDS",
    "MAX_PAGE_SIZE",
    "HistoryItem",
    "HistoryKind",
    "HistoryPage",
    "UsageRow",
    "UsageSummary",
    "history",
    "usage",
]

HistoryKind = Literal["deposit", "turn", "payout"]
HISTORY_KINDS: tuple[HistoryKind, ...] = ("deposit", "turn", "payout")
MAX_PAGE_SIZE = 100


@dataclass(frozen=True)
class UsageRow:
    turn_id: str
    model: str
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    cost: int
    worker_id: str | None
    tee: str | None
    finish_reason: str
    created_at: dt.datetime


@dataclass(frozen=True)
class UsageSummary:
    recent: list[UsageRow]
    turns: int
    prompt_tokens: int
    completion_tokens: int
    cost: int


def _usage_row(row: TurnRecord) -> UsageRow:
    return UsageRow(
        turn_id=row.turn_id,
        model=row.model,
        prompt_tokens=row.prompt_tokens,
        cached_prompt_tokens=row.cached_prompt_tokens,
        completion_tokens=row.completion_tokens,
        cost=row.cost,
        worker_id=row.worker_id,
        tee=row.tee,
        finish_reason=row.finish_reason,
        created_at=row.created_at,
    )


async def usage(db: Database, user_id: int, *, limit: int = 10) -> UsageSummary:
    """The user's most recent settled turns (newest first) and their all-time totals."""
    async with db.session() as session:
        rows = await session.scalars(
            select(TurnRecord)
            .where(TurnRecord.user_id == user_id)
            .order_by(TurnRecord.created_at.desc(), TurnRecord.id.desc())
            .limit(max(1, min(limit, MAX_PAGE_SIZE)))
        )
        recent = [_usage_row(row) for row in rows]
        totals = (
            await session.execute(
                select(
                    func.count(TurnRecord.id),
                    func.coalesce(func.sum(TurnRecord.prompt_tokens), 0),
                    func.coalesce(func.sum(TurnRecord.completion_tokens), 0),
                    func.coalesce(func.sum(TurnRecord.cost), 0),
                ).where(TurnRecord.user_id == user_id)
            )
        ).one()
    return UsageSummary(
        recent=recent,
        turns=int(totals[0]),
        prompt_tokens=int(totals[1]),
        completion_tokens=int(totals[2]),
        cost=int(totals[3]),
    )


@dataclass(frozen=True)
class HistoryItem:
    """One line of a user's history. ``amount`` is nanoTON, signed as seen from the user's
    balance: deposits positive, turns and payouts negative."""

    kind: HistoryKind
    at: dt.datetime
    amount: int
    details: dict[str, Any] = field(default_factory=dict)
    key: int = 0  # its row's id: with ``at`` and ``kind``, its place in the history

    @property
    def order(self) -> tuple[dt.datetime, int, int]:
        return self.at, HISTORY_KINDS.index(self.kind), self.key


@dataclass(frozen=True)
class HistoryPage:
    items: list[HistoryItem]
    page: int
    per_page: int
    has_more: bool
    next_cursor: str | None = None  # where the page after this one starts


Cursor = tuple[dt.datetime, int, int]  # (at, kind's index, key) of the last item seen


def _cursor_text(item: HistoryItem) -> str:
    at, kind, key = item.order
    raw = f"{at.astimezone(dt.UTC).isoformat()}|{kind}|{key}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def parse_cursor(text: str) -> Cursor:
    """A cursor from a request, or AccountError invalid_page (never an exception's text)."""
    try:
        if len(text) > 100:
            raise ValueError("too long")
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("ascii")
        at_text, kind_text, key_text = raw.split("|")
        at = dt.datetime.fromisoformat(at_text)
        kind, key = int(kind_text), int(key_text)
        if at.tzinfo is None or not 0 <= kind < len(HISTORY_KINDS) or not 0 <= key < 2**63:
            raise ValueError("out of range")
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise AccountError(ErrorCode.INVALID_PAGE, "not a history cursor") from None
    return at, kind, key


_Model = TypeVar("_Model")


def _window(
    query: Select[_Model],
    cursor: Cursor | None,
    kind: HistoryKind,
    at: Any,
    key: Any,
    limit: int,
) -> Select[_Model]:
    """``query``'s rows (of ``kind``, placed by their time ``at`` and ``key``) that come after
    ``cursor`` in the history, newest first, ``limit`` at most: the same order the cursor was
    taken in."""
    return query.where(_after(cursor, kind, at, key)).order_by(at.desc(), key.desc()).limit(limit)


def _after(cursor: Cursor | None, kind: HistoryKind, at: Any, key: Any) -> ColumnElement[bool]:
    """Rows of ``kind`` that come after ``cursor`` in the history (older, newest first)."""
    if cursor is None:
        return true()
    c_at, c_kind, c_key = cursor
    index = HISTORY_KINDS.index(kind)
    if index < c_kind:
        return at <= c_at  # type: ignore[no-any-return]
    if index > c_kind:
        return at < c_at  # type: ignore[no-any-return]
    return or_(at < c_at, and_(at == c_at, key < c_key))


_DEPOSIT_SOURCES = {
    AccountKind.TON_IN.value: "ton",
    AccountKind.STARS_IN.value: "stars",
    AccountKind.USDT_IN.value: "usdt",
    AccountKind.OPERATOR.value: "operator",
}


async def _deposits(
    session: AsyncSession, user_id: int, limit: int, after: Cursor | None
) -> list[HistoryItem]:
    user_account = await session.scalar(
        select(Account.id).where(Account.kind == AccountKind.USER, Account.owner_id == user_id)
    )
    if user_account is None:
        return []
    txs = list(
        await session.scalars(
            _window(
                select(Transaction)
                .join(Entry, Entry.transaction_id == Transaction.id)
                .where(Transaction.kind == "deposit", Entry.account_id == user_account),
                after,
                "deposit",
                Transaction.created_at,
                Transaction.id,
                limit,
            )
        )
    )
    items = []
    account_ids = {entry.account_id for tx in txs for entry in tx.entries}
    rows = await session.execute(
        select(Account.id, Account.kind).where(Account.id.in_(account_ids))
    )
    kinds = {account_id: kind for account_id, kind in rows}
    sources = {
        tx.id: next(
            (_DEPOSIT_SOURCES[kinds[e.account_id]] for e in tx.entries if e.amount < 0), "ton"
        )
        for tx in txs
    }
    usdt_keys = [tx.idempotency_key for tx in txs if sources[tx.id] == "usdt"]
    usdt = (
        {
            key: (units, rate)
            for key, units, rate in await session.execute(
                select(
                    TonDeposit.ledger_key, TonDeposit.jetton_amount, TonDeposit.nano_per_unit
                ).where(TonDeposit.ledger_key.in_(usdt_keys))
            )
        }
        if usdt_keys
        else {}
    )
    for tx in txs:
        amount = sum(e.amount for e in tx.entries if e.account_id == user_account)
        source = sources[tx.id]
        details: dict[str, Any] = {"source": source, "id": tx.id}
        if source in ("ton", "usdt") and tx.idempotency_key.startswith("ton:"):
            details["tx_hash"] = tx.idempotency_key.rsplit(":", 1)[1]  # ton:<account>:<lt>:<hash>
        if tx.idempotency_key in usdt:  # the USDT paid (micro-units) and the rate it got
            units, rate = usdt[tx.idempotency_key]
            details["usdt_micro"] = int(units or 0)
            details["nano_per_micro"] = rate
        items.append(HistoryItem("deposit", tx.created_at, amount, details, tx.id))
    return items


async def _turns(
    session: AsyncSession, user_id: int, limit: int, after: Cursor | None
) -> list[HistoryItem]:
    query = select(TurnRecord).where(TurnRecord.user_id == user_id)
    rows = await session.scalars(
        _window(query, after, "turn", TurnRecord.created_at, TurnRecord.id, limit)
    )
    return [
        HistoryItem(
            "turn",
            row.created_at,
            -row.cost,
            {
                "model": row.model,
                "prompt_tokens": row.prompt_tokens,
                "completion_tokens": row.completion_tokens,
                "finish_reason": row.finish_reason,
            },
            row.id,
        )
        for row in rows
    ]


async def _payouts(
    session: AsyncSession, user_id: int, limit: int, after: Cursor | None
) -> list[HistoryItem]:
    query = select(Payout).where(Payout.provider_id == user_id)
    rows = await session.scalars(
        _window(query, after, "payout", Payout.created_at, Payout.id, limit)
    )
    return [
        HistoryItem(
            "payout",
            row.created_at,
            -row.amount,
            {"id": row.id, "state": row.state, "destination": row.destination},
            row.id,
        )
        for row in rows
    ]


async def history(
    db: Database,
    user_id: int,
    *,
    kind: str | None = None,
    page: int = 1,
    per_page: int = 20,
    cursor: str | None = None,
) -> HistoryPage:
    """Deposits, turns and payouts, newest first, one page at a time: page ``page`` (from 1),
    or the page after ``cursor`` (a page's ``next_cursor``: items that arrive meanwhile never
    repeat a row). ``kind`` (one of :data:`HISTORY_KINDS`, or None for all) and ``cursor`` may
    come from a request as is."""
    if kind is not None and kind not in HISTORY_KINDS:
        raise AccountError(ErrorCode.INVALID_PAGE, f"history kind must be one of {HISTORY_KINDS}")
    if isinstance(page, bool) or not isinstance(page, int) or page < 1 or page > 10_000:
        raise AccountError(ErrorCode.INVALID_PAGE, "page must be a whole number from 1 to 10000")
    if not 1 <= per_page <= MAX_PAGE_SIZE:
        raise AccountError(ErrorCode.INVALID_PAGE, f"per_page must be 1..{MAX_PAGE_SIZE}")
    after = parse_cursor(cursor) if cursor is not None else None
    if after is not None:
        page = 1
    # Enough of each kind to fill pages 1..page, plus one to know whether more follow.
    need = page * per_page + 1
    kinds = tuple(k for k in HISTORY_KINDS if k == kind) if kind else HISTORY_KINDS
    fetch = {"deposit": _deposits, "turn": _turns, "payout": _payouts}
    items: list[HistoryItem] = []
    async with db.session() as session:
        for name in kinds:
            items.extend(await fetch[name](session, user_id, need, after))
    items.sort(key=lambda item: item.order, reverse=True)
    start = (page - 1) * per_page
    shown = items[start : start + per_page]
    more = len(items) > start + per_page
    return HistoryPage(
        items=shown,
        page=page,
        per_page=per_page,
        has_more=more,
        next_cursor=_cursor_text(shown[-1]) if more and shown else None,
    )
