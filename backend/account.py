"""What a user or provider sees of their account, shared by the bot, the Mini App and the CLI.

Usage and history, provider workers and earnings, withdrawals, Telegram Stars credits, admin
statistics and ``/forget`` (what to tell a user: ``backend.notifications``). Every function
takes the services it needs explicitly; none of them touches prompt or reply text (the
database never holds any).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import delete, func, select, update

from backend.db import Database
from backend.errors import CocoonError, ErrorCode
from backend.ledger import InsufficientFunds, InvalidAmount, Ledger, Receipt
from backend.models import (
    Account,
    AccountKind,
    ApiKey,
    Entry,
    Notification,
    Payout,
    PayoutState,
    TonWallet,
    Transaction,
    TurnRecord,
    User,
    WorkerFlag,
    WorkerRecord,
    WorkerState,
)
from backend.notifications import (
    NOTIFY_STARS,
    NOTIFY_WORKER_ATTESTED,
    NOTIFY_WORKER_FAILED,
    NOTIFY_WORKER_OFFLINE,
    notify,
)
from backend.settings import MAX_NANO, Settings

HistoryKind = Literal["deposit", "turn", "payout"]
HISTORY_KINDS: tuple[HistoryKind, ...] = ("deposit", "turn", "payout")
MAX_PAGE_SIZE = 100


class AccountError(CocoonError):
    """A request the account layer refuses. ``code`` is stable; ``str()`` is readable.

    Codes: ``not_provider``, ``no_payout_wallet``, ``below_minimum``, ``insufficient_funds``,
    ``invalid_amount``, ``invalid_page``.
    """


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


# ------------------------------------------------------------------ usage and history


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
        created_at=_aware(row.created_at),
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


async def _deposits(session: Any, user_id: int, limit: int) -> list[HistoryItem]:
    user_account = await session.scalar(
        select(Account.id).where(Account.kind == AccountKind.USER, Account.owner_id == user_id)
    )
    if user_account is None:
        return []
    txs = await session.scalars(
        select(Transaction)
        .join(Entry, Entry.transaction_id == Transaction.id)
        .where(Transaction.kind == "deposit", Entry.account_id == user_account)
        .order_by(Transaction.created_at.desc(), Transaction.id.desc())
        .limit(limit)
    )
    items = []
    txs = list(txs)
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
        items.append(
            HistoryItem("deposit", _aware(tx.created_at), amount, {"source": source, "id": tx.id})
        )
    return items


async def _turns(session: Any, user_id: int, limit: int) -> list[HistoryItem]:
    rows = await session.scalars(
        select(TurnRecord)
        .where(TurnRecord.user_id == user_id)
        .order_by(TurnRecord.created_at.desc(), TurnRecord.id.desc())
        .limit(limit)
    )
    return [
        HistoryItem(
            "turn",
            _aware(row.created_at),
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


async def _payouts(session: Any, user_id: int, limit: int) -> list[HistoryItem]:
    rows = await session.scalars(
        select(Payout)
        .where(Payout.provider_id == user_id)
        .order_by(Payout.created_at.desc(), Payout.id.desc())
        .limit(limit)
    )
    return [
        HistoryItem(
            "payout",
            _aware(row.created_at),
            -row.amount,
            {"id": row.id, "state": row.state, "destination": row.destination},
        )
        for row in rows
    ]


async def history(
    db: Database,
    user_id: int,
    *,
    kind: HistoryKind | None = None,
    page: int = 1,
    per_page: int = 20,
) -> HistoryPage:
    """Deposits, turns and payouts, newest first, one page at a time (pages count from 1)."""
    if kind is not None and kind not in HISTORY_KINDS:
        raise AccountError(ErrorCode.INVALID_PAGE, f"history kind must be one of {HISTORY_KINDS}")
    if isinstance(page, bool) or not isinstance(page, int) or page < 1 or page > 10_000:
        raise AccountError(ErrorCode.INVALID_PAGE, "page must be a whole number from 1 to 10000")
    if not 1 <= per_page <= MAX_PAGE_SIZE:
        raise AccountError(ErrorCode.INVALID_PAGE, f"per_page must be 1..{MAX_PAGE_SIZE}")
    # Enough of each kind to fill pages 1..page, plus one to know whether more follow.
    need = page * per_page + 1
    kinds = (kind,) if kind else HISTORY_KINDS
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


# ----------------------------------------------------------------------------- Stars


MAX_STARS = 10_000
"""The most Stars one invoice asks for."""


@dataclass(frozen=True)
class StarsInvoice:
    """What a Stars invoice of ours says: who pays, how many Stars, at which rate."""

    user_id: int
    stars: int
    nano_per_star: int | None  # None: an invoice made before the rate was written into it

    @property
    def payload(self) -> str:
        return f"stars:{self.user_id}:{self.stars}:{self.nano_per_star}"


def stars_invoice(user_id: int, stars: int, settings: Settings) -> StarsInvoice:
    """A new invoice at today's rate: the rate travels in the payload, so the user is credited
    what the invoice said even if the operator changes the rate before they pay."""
    return StarsInvoice(user_id, stars, settings.stars_nano_per_star)


def parse_stars_payload(payload: str) -> StarsInvoice | None:
    """The invoice behind a payload (``stars:<user id>:<stars>[:<nanoTON per star>]``), or None
    when it is not one of ours."""
    parts = payload.split(":")
    if len(parts) not in (3, 4) or parts[0] != "stars":
        return None
    if not all(part.isascii() and part.isdecimal() and len(part) <= 19 for part in parts[1:]):
        return None
    user_id, stars = int(parts[1]), int(parts[2])
    rate = int(parts[3]) if len(parts) == 4 else None
    if (
        not 0 < stars <= MAX_STARS
        or user_id <= 0
        or (rate is not None and not 0 < rate <= MAX_NANO)
    ):
        return None
    return StarsInvoice(user_id, stars, rate)


async def credit_stars(
    ledger: Ledger,
    settings: Settings,
    user_id: int,
    stars: int,
    charge_id: str,
    *,
    nano_per_star: int | None = None,
) -> Receipt:
    """Credit a Telegram Stars payment at the invoice's rate (``nano_per_star``; default the
    configured rate), once per ``charge_id`` (the ``telegram_payment_charge_id``): a second
    ``successful_payment`` replays the receipt."""
    if isinstance(stars, bool) or not isinstance(stars, int) or stars <= 0:
        raise AccountError(
            ErrorCode.INVALID_AMOUNT, f"a Stars payment is a positive count, got {stars!r}"
        )
    if not charge_id or len(charge_id) > 150:
        raise AccountError(ErrorCode.INVALID_AMOUNT, "a Stars payment needs its charge id")
    rate = settings.stars_nano_per_star if nano_per_star is None else nano_per_star
    if not 0 < rate <= MAX_NANO or stars * rate > MAX_NANO:
        raise AccountError(ErrorCode.INVALID_AMOUNT, "a Stars payment out of range")
    amount = stars * rate
    receipt = await ledger.credit_deposit(
        user_id,
        amount,
        f"stars:{charge_id}",
        source=AccountKind.STARS_IN,
        reason=f"{stars} Telegram Stars",
    )
    if not receipt.replayed:
        await notify(
            ledger.db,
            user_id,
            NOTIFY_STARS,
            f"stars:{charge_id}",
            amount=amount,
            data={"stars": stars},
        )
    return receipt


# ------------------------------------------------------------------------- providers


async def become_provider(db: Database, user_id: int) -> None:
    async with db.session() as session, session.begin():
        await session.execute(
            update(User)
            .where(User.id == user_id)
            .values(is_provider=True)
            .execution_options(synchronize_session=False)
        )


async def record_worker(
    db: Database,
    worker_id: str,
    state: WorkerState,
    *,
    provider_id: int | None = None,
    model: str | None = None,
    tee: str | None = None,
    image: str | None = None,
    mrtd: str | None = None,
    attested_at: dt.datetime | None = None,
    expires_at: dt.datetime | None = None,
    note: str | None = None,
) -> bool:
    """Remember a worker's latest state; tell its provider when the state changes (attested,
    attestation refused, offline, revoked). Returns whether the state changed."""
    async with db.session() as session, session.begin():
        row = await session.get(WorkerRecord, worker_id, with_for_update=True)
        previous = row.state if row is not None else None
        if row is None:
            row = WorkerRecord(worker_id=worker_id)
            session.add(row)
        row.state = state
        row.note = note
        for name, value in (
            ("provider_id", provider_id),
            ("model", model),
            ("tee", tee),
            ("image", image),
            ("mrtd", mrtd),
            ("attested_at", attested_at),
            ("expires_at", expires_at),
        ):
            if value is not None:
                setattr(row, name, value)
        provider = row.provider_id
    changed = previous != state
    if provider is not None and changed:
        kind = {
            WorkerState.ATTESTED: NOTIFY_WORKER_ATTESTED,
            WorkerState.FAILED: NOTIFY_WORKER_FAILED,
            WorkerState.OFFLINE: NOTIFY_WORKER_OFFLINE,
            WorkerState.REVOKED: NOTIFY_WORKER_OFFLINE,
        }[state]
        stamp = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
        await notify(
            db,
            provider,
            kind,
            f"worker:{worker_id}:{state}:{stamp}",
            data={"worker_id": worker_id, "model": model, "tee": tee, "note": note},
        )
    return changed


HEARTBEAT_GRACE_S = 60
"""A worker just attested has this long to send its first heartbeat."""


async def watch_workers(
    db: Database, redis: Any, *, grace_s: float = HEARTBEAT_GRACE_S
) -> list[str]:
    """Workers going offline: an attested worker whose heartbeat stopped is recorded offline
    (its provider is told through the outbox), and recorded attested again when it is back.
    Returns the workers whose state changed; safe to run from several processes."""
    from workers import registry

    live = {w.worker_id: w for w in await registry.list_workers(redis)}
    since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=grace_s)
    async with db.session() as session:
        rows = list(
            await session.execute(
                select(WorkerRecord.worker_id, WorkerRecord.state, WorkerRecord.attested_at).where(
                    WorkerRecord.state.in_([WorkerState.ATTESTED, WorkerState.OFFLINE])
                )
            )
        )
    changed = []
    for worker_id, state, attested_at in rows:
        info = live.get(worker_id)
        if state == WorkerState.ATTESTED and info is None:
            if attested_at is not None and _aware(attested_at) > since:
                continue
            if await record_worker(db, worker_id, WorkerState.OFFLINE, note="no heartbeat"):
                changed.append(worker_id)
        elif state == WorkerState.OFFLINE and info is not None and info.attested:
            if await record_worker(
                db, worker_id, WorkerState.ATTESTED, model=info.model, tee=info.tee
            ):
                changed.append(worker_id)
    return changed


@dataclass(frozen=True)
class WorkerView:
    worker_id: str
    model: str | None
    tee: str | None
    image: str | None
    mrtd: str | None
    state: str
    online: bool
    expires_at: dt.datetime | None
    jobs: int
    earned: int


async def provider_workers(db: Database, redis: Any, provider_id: int) -> list[WorkerView]:
    """The provider's workers: what the database remembers, whether each is online now (a live
    heartbeat in the registry), jobs served and nanoTON earned."""
    from workers import registry

    live = {w.worker_id: w for w in await registry.list_workers(redis)}
    async with db.session() as session:
        rows = list(
            await session.scalars(
                select(WorkerRecord)
                .where(WorkerRecord.provider_id == provider_id)
                .order_by(WorkerRecord.worker_id)
            )
        )
        totals = await session.execute(
            select(
                TurnRecord.worker_id,
                func.count(TurnRecord.id),
                func.coalesce(func.sum(TurnRecord.provider_earned), 0),
            )
            .where(TurnRecord.provider_id == provider_id)
            .group_by(TurnRecord.worker_id)
        )
        stats = {worker_id: (int(jobs), int(earned)) for worker_id, jobs, earned in totals}
    views = []
    for row in rows:
        jobs, earned = stats.get(row.worker_id, (0, 0))
        info = live.get(row.worker_id)
        views.append(
            WorkerView(
                worker_id=row.worker_id,
                model=row.model,
                tee=row.tee,
                image=row.image,
                mrtd=row.mrtd,
                state=row.state,
                online=info is not None and info.provider_id == provider_id,
                expires_at=_aware(row.expires_at) if row.expires_at else None,
                jobs=jobs,
                earned=earned,
            )
        )
    return views


@dataclass(frozen=True)
class Earnings:
    available: int  # withdrawable now
    pending: int  # in payouts on their way
    paid: int  # confirmed payouts, all time
    earned: int  # all time, from turns
    jobs: int


async def earnings(ledger: Ledger, provider_id: int) -> Earnings:
    async with ledger.db.session() as session:
        paid = await session.scalar(
            select(func.coalesce(func.sum(Payout.amount), 0)).where(
                Payout.provider_id == provider_id, Payout.state == PayoutState.CONFIRMED
            )
        )
        earned, jobs = (
            await session.execute(
                select(
                    func.coalesce(func.sum(TurnRecord.provider_earned), 0),
                    func.count(TurnRecord.id),
                ).where(TurnRecord.provider_id == provider_id)
            )
        ).one()
    return Earnings(
        available=await ledger.balance(AccountKind.PROVIDER, provider_id),
        pending=await ledger.balance(AccountKind.PROVIDER_PENDING, provider_id),
        paid=int(paid or 0),
        earned=int(earned),
        jobs=int(jobs),
    )


def withdrawal_refusal(settings: Settings, amount: int, available: int) -> AccountError | None:
    """Why ``amount`` nanoTON cannot be withdrawn from ``available`` earnings (None: it can):
    below the smallest withdrawal, or more than is available. The bot asks before it shows its
    confirmation button; :func:`withdraw` asks again when the payout is made."""
    if amount < settings.min_withdrawal_nano:
        return AccountError(
            ErrorCode.BELOW_MINIMUM,
            "below the smallest withdrawal",
            minimum=settings.min_withdrawal_nano,
            available=available,
        )
    if amount > available:
        return AccountError(
            ErrorCode.INSUFFICIENT_FUNDS, "more than your available earnings", available=available
        )
    return None


async def withdraw(
    ledger: Ledger,
    settings: Settings,
    provider_id: int,
    amount: int | Literal["all"],
    key: str,
) -> Payout:
    """Ask for a payout of ``amount`` nanoTON (or everything available) to the provider's
    linked payout wallet. ``key`` makes the request happen once (a confirmation button's id).
    The payout sender (``cocoon ton payouts``) then signs, sends and confirms it."""
    from backend.ton.proof import linked_wallet

    async with ledger.db.session() as session:
        done = await session.scalar(select(Payout).where(Payout.key == key))
    if done is not None and done.provider_id == provider_id:
        return done  # the same confirmation pressed twice
    wallet = await linked_wallet(ledger.db, provider_id, "payout")
    if wallet is None:
        raise AccountError(ErrorCode.NO_PAYOUT_WALLET, "link a payout wallet first (/provider)")
    available = await ledger.balance(AccountKind.PROVIDER, provider_id)
    if amount == "all":
        amount = available
    if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
        raise AccountError(ErrorCode.INVALID_AMOUNT, "the amount must be a positive number of TON")
    refusal = withdrawal_refusal(settings, amount, available)
    if refusal is not None:
        raise refusal
    try:
        receipt = await ledger.request_withdrawal(
            provider_id, amount, key, destination=wallet.address
        )
    except InsufficientFunds as error:
        raise AccountError(ErrorCode.INSUFFICIENT_FUNDS, str(error), available=available) from error
    except InvalidAmount as error:
        raise AccountError(
            ErrorCode.BELOW_MINIMUM,
            str(error),
            minimum=settings.min_withdrawal_nano,
            available=available,
        ) from error
    payout = await ledger.get_payout(receipt.subject_id)  # type: ignore[arg-type]
    assert payout is not None
    return payout


# ------------------------------------------------------------------------------ admin


@dataclass(frozen=True)
class Stats:
    users: int
    providers: int
    turns: int
    turns_24h: int
    revenue: int  # the platform's fees, all time (nanoTON)
    volume: int  # what users paid for turns, all time
    workers_online: int
    queue_depth: dict[str, int]
    flags: int = 0  # bounds crossed by workers (backend.flags), all time
    flagged_workers: tuple[str, ...] = ()  # the last few workers flagged, newest first


async def stats(db: Database, redis: Any) -> Stats:
    """Figures for the admin's ``/stats``: users, turns, revenue, workers, queue depth and the
    workers flagged for crossing a bound."""
    from workers import registry

    since = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    async with db.session() as session:
        users = await session.scalar(select(func.count(User.id)))
        providers = await session.scalar(select(func.count(User.id)).where(User.is_provider))
        turns, volume = (
            await session.execute(
                select(func.count(TurnRecord.id), func.coalesce(func.sum(TurnRecord.cost), 0))
            )
        ).one()
        turns_24h = await session.scalar(
            select(func.count(TurnRecord.id)).where(TurnRecord.created_at >= since)
        )
        revenue = await session.scalar(
            select(func.coalesce(func.sum(Account.balance), 0)).where(
                Account.kind == AccountKind.PLATFORM
            )
        )
        flags = await session.scalar(select(func.count(WorkerFlag.id)))
        recent = await session.scalars(
            select(WorkerFlag.worker_id)
            .group_by(WorkerFlag.worker_id)
            .order_by(func.max(WorkerFlag.id).desc())
            .limit(5)
        )
        flagged = tuple(recent)
    workers = await registry.list_workers(redis)
    depth: dict[str, int] = {}
    for worker, waiting in zip(workers, await registry.queued_jobs(redis, workers), strict=True):
        depth[worker.model] = depth.get(worker.model, 0) + waiting + worker.effective_load
    return Stats(
        users=int(users or 0),
        providers=int(providers or 0),
        turns=int(turns),
        turns_24h=int(turns_24h or 0),
        revenue=int(revenue or 0),
        volume=int(volume),
        workers_online=len(workers),
        queue_depth=depth,
        flags=int(flags or 0),
        flagged_workers=flagged,
    )


# ----------------------------------------------------------------------------- forget


async def forget_user(db: Database, user_id: int) -> None:
    """Delete what is personal and not needed for accounting: usage records, API keys, the
    top-up wallet link, the referral and language, delivered and pending notifications. The
    ledger (balances and its transactions) stays, as the law on accounting requires, and so
    does a provider's payout wallet while money is still owed to it. The chat context lives in
    Redis and is deleted by the caller (the bot owns it)."""
    async with db.session() as session, session.begin():
        await session.execute(delete(TurnRecord).where(TurnRecord.user_id == user_id))
        await session.execute(delete(ApiKey).where(ApiKey.user_id == user_id))
        await session.execute(
            delete(TonWallet).where(TonWallet.user_id == user_id, TonWallet.purpose == "user")
        )
        await session.execute(delete(Notification).where(Notification.user_id == user_id))
        owed = await session.scalar(
            select(func.coalesce(func.sum(Account.balance), 0)).where(
                Account.owner_id == user_id,
                Account.kind.in_([AccountKind.PROVIDER, AccountKind.PROVIDER_PENDING]),
            )
        )
        if not owed:
            await session.execute(
                delete(TonWallet).where(TonWallet.user_id == user_id, TonWallet.purpose == "payout")
            )
        await session.execute(
            update(User)
            .where(User.id == user_id)
            .values(referrer=None, language_code=None)
            .execution_options(synchronize_session=False)
        )


async def set_language(db: Database, user_id: int, language: str) -> None:
    async with db.session() as session, session.begin():
        await session.execute(
            update(User)
            .where(User.id == user_id)
            .values(language_code=language[:16])
            .execution_options(synchronize_session=False)
        )


async def set_model(db: Database, user_id: int, model: str) -> None:
    async with db.session() as session, session.begin():
        await session.execute(
            update(User)
            .where(User.id == user_id)
            .values(model=model[:100])
            .execution_options(synchronize_session=False)
        )


async def set_referrer(db: Database, user_id: int, referrer: str) -> bool:
    """Keep the first deep-link parameter a user arrived with; later ones are ignored."""
    async with db.session() as session, session.begin():
        done = await session.execute(
            update(User)
            .where(User.id == user_id, User.referrer.is_(None))
            .values(referrer=referrer[:64])
            .execution_options(synchronize_session=False)
        )
    return bool(done.rowcount)
