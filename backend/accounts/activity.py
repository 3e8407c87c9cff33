"""A user's usage (settled turns and their totals) and history (deposits, turns and payouts,
one page at a time, newest first)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.accounts.errors import AccountError
from backend.db import Database
from backend.errors import ErrorCode
from backend.models import Account, AccountKind, Entry, Payout, Transaction, TurnRecord

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


@dataclass(frozen=True)
class HistoryPage:
    items: list[HistoryItem]
    page: int
    per_page: int
    has_more: bool


_DEPOSIT_SOURCES = {
    AccountKind.TON_IN.value: "ton",
    AccountKind.STARS_IN.value: "stars",
    AccountKind.OPERATOR.value: "operator",
}


async def _deposits(session: AsyncSession, user_id: int, limit: int) -> list[HistoryItem]:
    user_account = await session.scalar(
        select(Account.id).where(Account.kind == AccountKind.USER, Account.owner_id == user_id)
    )
    if user_account is None:
        return []
    txs = list(
        await session.scalars(
            select(Transaction)
            .join(Entry, Entry.transaction_id == Transaction.id)
            .where(Transaction.kind == "deposit", Entry.account_id == user_account)
            .order_by(Transaction.created_at.desc(), Transaction.id.desc())
            .limit(limit)
        )
    )
    items = []
    account_ids = {entry.account_id for tx in txs for entry in tx.entries}
    rows = await session.execute(
        select(Account.id, Account.kind).where(Account.id.in_(account_ids))
    )
    kinds = {account_id: kind for account_id, kind in rows}
    for tx in txs:
        amount = sum(e.amount for e in tx.entries if e.account_id == user_account)
        source = next(
            (_DEPOSIT_SOURCES[kinds[e.account_id]] for e in tx.entries if e.amount < 0), "ton"
        )
        items.append(HistoryItem("deposit", tx.created_at, amount, {"source": source, "id": tx.id}))
    return items


async def _turns(session: AsyncSession, user_id: int, limit: int) -> list[HistoryItem]:
    rows = await session.scalars(
        select(TurnRecord)
        .where(TurnRecord.user_id == user_id)
        .order_by(TurnRecord.created_at.desc(), TurnRecord.id.desc())
        .limit(limit)
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
        )
        for row in rows
    ]


async def _payouts(session: AsyncSession, user_id: int, limit: int) -> list[HistoryItem]:
    rows = await session.scalars(
        select(Payout)
        .where(Payout.provider_id == user_id)
        .order_by(Payout.created_at.desc(), Payout.id.desc())
        .limit(limit)
    )
    return [
        HistoryItem(
            "payout",
            row.created_at,
            -row.amount,
            {"id": row.id, "state": row.state, "destination": row.destination},
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
) -> HistoryPage:
    """Deposits, turns and payouts, newest first, one page at a time (pages count from 1).
    ``kind`` (one of :data:`HISTORY_KINDS`, or None for all) may come from a request as is."""
    if kind is not None and kind not in HISTORY_KINDS:
        raise AccountError(ErrorCode.INVALID_PAGE, f"history kind must be one of {HISTORY_KINDS}")
    if isinstance(page, bool) or not isinstance(page, int) or page < 1 or page > 10_000:
        raise AccountError(ErrorCode.INVALID_PAGE, "page must be a whole number from 1 to 10000")
    if not 1 <= per_page <= MAX_PAGE_SIZE:
        raise AccountError(ErrorCode.INVALID_PAGE, f"per_page must be 1..{MAX_PAGE_SIZE}")
    # Enough of each kind to fill pages 1..page, plus one to know whether more follow.
    need = page * per_page + 1
    kinds = tuple(k for k in HISTORY_KINDS if k == kind) if kind else HISTORY_KINDS
    fetch = {"deposit": _deposits, "turn": _turns, "payout": _payouts}
    items: list[HistoryItem] = []
    async with db.session() as session:
        for name in kinds:
            items.extend(await fetch[name](session, user_id, need))
    items.sort(key=lambda item: item.at, reverse=True)
    start = (page - 1) * per_page
    return HistoryPage(
        items=items[start : start + per_page],
        page=page,
        per_page=per_page,
        has_more=len(items) > start + per_page,
    )
