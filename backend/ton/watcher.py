"""The chain watcher: reads the deposit wallet's transactions and credits each deposit once.

For every transaction, in logical-time order, from a cursor kept in the database:

1. classify it: external, bounced, aborted or zero-value messages are ignored; a text comment
   that is some user's deposit memo is credited; anything else with value is *unclaimed*;
2. credit the ledger under the key ``ton:<account>:<lt>:<hash>`` (the ledger applies a key
   once, so a crash between steps never credits twice);
3. in one database transaction: record the deposit (unique on account, lt, hash), queue the
   user's notification, and move the cursor past it.

A crash anywhere repeats at most steps 2 and 3 for one transaction, which changes nothing the
second time. API errors and rate limits back off (bounded) and retry the same page: the cursor
only moves past a transaction once it has been handled, so none is ever skipped.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from backend.db import Database
from backend.ledger import Ledger
from backend.models import AccountKind, TonCursor, TonDeposit, TonDepositStatus, TonNotification
from backend.settings import MAX_NANO
from backend.ton.comment import decode_comment, raw_address
from backend.ton.toncenter import TonCenter, TonCenterError
from backend.users import find_by_memo

log = logging.getLogger(__name__)

MAX_MEMO_LOOKUP = 64  # a memo is 12 characters; longer comments are nobody's memo
NOTIFY_DEPOSIT = "deposit_credited"
MEMO_CACHE_SIZE = 10_000


@dataclass(frozen=True)
class DepositEvent:
    """What the notification hook receives when a deposit is credited."""

    user_id: int
    amount: int
    deposit_id: int
    tx_hash: str


Notify = Callable[[DepositEvent], Awaitable[None]]
Checkpoint = Callable[[str], None]


def hash_hex(value: str) -> str:
    """A transaction hash as lower-case hex, whether TON Center gave base64 or hex."""
    text = value.strip()
    if len(text) == 64:
        try:
            bytes.fromhex(text)
            return text.lower()
        except ValueError:
            pass
    padded = text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4)
    try:
        raw = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ValueError(f"not a transaction hash: {value!r}")
    return raw.hex()


def deposit_key(account: str, lt: int, tx_hash: str) -> str:
    return f"ton:{account}:{lt}:{tx_hash}"


@dataclass(frozen=True)
class Classified:
    status: TonDepositStatus
    amount: int
    source: str | None
    memo: str | None  # the comment, for matching a user
    note: str | None
    shown: str | None = None  # the comment made printable, for storing and showing


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def classify(tx: dict[str, Any], account: str) -> Classified:
    """What one transaction of the deposit wallet means. Never raises on odd input."""
    in_msg = _dict(tx.get("in_msg"))
    description = _dict(tx.get("description"))
    source = in_msg.get("source") or None
    if not isinstance(source, str):
        source = None if source is None else str(source)[:80]
    try:
        value = in_msg.get("value") or 0
        value = 0 if isinstance(value, bool | float) else int(value)
    except (TypeError, ValueError):
        value = 0

    def ignored(note: str) -> Classified:
        return Classified(TonDepositStatus.IGNORED, 0, source, None, note)

    if not in_msg:
        return ignored("no incoming message")
    if not source:
        return ignored("external message")
    if in_msg.get("bounced"):
        return ignored("bounced message")
    if description.get("aborted"):
        return ignored("aborted transaction")
    if value <= 0:
        return ignored("zero value")
    if value > MAX_NANO:  # more than all TON in existence: an admin looks at it
        return Classified(TonDepositStatus.UNCLAIMED, 0, source, None, f"value {value} too large")
    destination = in_msg.get("destination")
    if destination and _same_address(str(destination), account) is False:
        return ignored("message to another account")
    content = _dict(in_msg.get("message_content"))
    body = content.get("body")
    decoded = decode_comment(body if isinstance(body, str) else None)
    if decoded.memo is None:
        return Classified(
            TonDepositStatus.UNCLAIMED, value, source, None, decoded.note, decoded.shown
        )
    return Classified(TonDepositStatus.CREDITED, value, source, decoded.memo, None, decoded.shown)


def _same_address(a: str, b: str) -> bool | None:
    try:
        return raw_address(a) == raw_address(b)
    except ValueError:
        return None


class DepositWatcher:
    """Credits deposits to one account. ``run()`` forever, or ``poll_once()`` a page at a time."""

    def __init__(
        self,
        db: Database,
        ledger: Ledger,
        api: TonCenter,
        account: str,
        *,
        page_size: int = 100,
        poll_interval_s: float = 3.0,
        backoff_max_s: float = 60.0,
        notify: Notify | None = None,
        checkpoint: Checkpoint | None = None,
    ) -> None:
        self.db = db
        self.ledger = ledger
        self.api = api
        self.account = raw_address(account)
        self.page_size = page_size
        self.poll_interval_s = poll_interval_s
        self.backoff_max_s = backoff_max_s
        self.notify = notify
        self._checkpoint = checkpoint or (lambda _name: None)
        self._memo_users: dict[str, int] = {}

    async def cursor(self) -> int:
        async with self.db.session() as session:
            value = await session.scalar(
                select(TonCursor.last_lt).where(TonCursor.account == self.account)
            )
        return int(value or 0)

    async def poll_once(self) -> int:
        """Handle one page of new transactions; the number handled. Raises TonCenterError."""
        start = await self.cursor() + 1
        page = await self.api.transactions(self.account, start_lt=start, limit=self.page_size)
        self._checkpoint("fetched")
        handled = 0
        for tx in sorted(page, key=lambda t: int(t["lt"])):
            if int(tx["lt"]) < start:
                continue  # an API that ignores start_lt must not make us go back
            await self.handle(tx)
            handled += 1
        return handled

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Poll until ``stop`` is set; back off on API errors, never skip a transaction."""
        stop = stop or asyncio.Event()
        failures = 0
        while not stop.is_set():
            try:
                handled = await self.poll_once()
            except (TonCenterError, DBAPIError) as error:
                # Handling a transaction is safe to repeat: back off, then the same page again.
                failures += 1
                delay = min(self.backoff_max_s, self.poll_interval_s * 2 ** min(failures, 16))
                delay = random.uniform(delay / 2, delay)
                log.warning("deposit watcher: %s; retrying in %.1f s", error, delay)
                await _sleep_or_stop(stop, delay)
                continue
            failures = 0
            if handled < self.page_size:
                await _sleep_or_stop(stop, self.poll_interval_s)

    async def handle(self, tx: dict[str, Any]) -> TonDeposit:
        """Credit (or record) one transaction; safe to repeat. ValueError, before anything is
        changed, for a transaction without a usable ``lt`` and ``hash``."""
        try:
            lt = int(tx["lt"])
            tx_hash = hash_hex(str(tx["hash"]))
        except (KeyError, TypeError, ValueError):
            raise ValueError("not a transaction: no usable lt and hash") from None
        if isinstance(tx["lt"], bool) or not 0 < lt < 2**63:
            raise ValueError(f"not a transaction: lt {lt} out of range")
        key = deposit_key(self.account, lt, tx_hash)
        found = classify(tx, self.account)
        status, note, user_id = found.status, found.note, None
        if status == TonDepositStatus.CREDITED:
            user_id = await self._user_for(found.memo)
            if user_id is None:
                status, note = TonDepositStatus.UNCLAIMED, "memo matches no user"
            else:
                await self.ledger.credit_deposit(
                    user_id,
                    found.amount,
                    key,
                    source=AccountKind.TON_IN,
                    reason=f"TON deposit {tx_hash} (lt {lt})",
                )
                self._checkpoint("credited")
        deposit, created = await self._record(tx, lt, tx_hash, key, found, status, note, user_id)
        self._checkpoint("recorded")
        if created and status == TonDepositStatus.CREDITED and self.notify is not None:
            try:
                await self.notify(
                    DepositEvent(deposit.user_id or 0, found.amount, deposit.id, tx_hash)
                )
            except Exception:
                log.exception("deposit notification hook failed (the outbox still has it)")
        if status == TonDepositStatus.UNCLAIMED and created:
            log.warning(
                "unclaimed TON deposit #%s: %s nanoTON, lt %s (%s)",
                deposit.id,
                found.amount,
                lt,
                note,
            )
        return deposit

    async def _user_for(self, memo: str | None) -> int | None:
        """The user whose memo this is (memos never change, so found ones are remembered)."""
        if memo is None or len(memo.strip()) > MAX_MEMO_LOOKUP:
            return None
        key = memo.strip().upper()
        if key not in self._memo_users:
            user = await find_by_memo(self.db, key)
            if user is None:
                return None  # not remembered: the user may sign up before the next deposit
            if len(self._memo_users) >= MEMO_CACHE_SIZE:
                self._memo_users.clear()
            self._memo_users[key] = user.id
        return self._memo_users[key]

    async def _record(
        self,
        tx: dict[str, Any],
        lt: int,
        tx_hash: str,
        key: str,
        found: Classified,
        status: TonDepositStatus,
        note: str | None,
        user_id: int | None,
    ) -> tuple[TonDeposit, bool]:
        for _attempt in range(3):
            try:
                async with self.db.session() as session, session.begin():
                    existing = await session.scalar(
                        select(TonDeposit).where(
                            TonDeposit.account == self.account,
                            TonDeposit.lt == lt,
                            TonDeposit.tx_hash == tx_hash,
                        )
                    )
                    created = existing is None
                    if existing is None:
                        existing = TonDeposit(
                            account=self.account,
                            lt=lt,
                            tx_hash=tx_hash,
                            source=found.source and found.source[:80],
                            amount=found.amount,
                            memo=found.shown,
                            status=status,
                            note=note,
                            user_id=user_id,
                            ledger_key=key,
                            utime=_utime(tx.get("now")),
                        )
                        session.add(existing)
                        await session.flush()
                        if status == TonDepositStatus.CREDITED and user_id is not None:
                            session.add(
                                TonNotification(
                                    key=f"deposit:{existing.id}",
                                    user_id=user_id,
                                    kind=NOTIFY_DEPOSIT,
                                    amount=found.amount,
                                )
                            )
                    moved = await session.execute(
                        update(TonCursor)
                        .where(TonCursor.account == self.account, TonCursor.last_lt < lt)
                        .values(last_lt=lt, last_hash=tx_hash)
                        .execution_options(synchronize_session=False)
                    )
                    if moved.rowcount == 0 and await session.get(TonCursor, self.account) is None:
                        session.add(TonCursor(account=self.account, last_lt=lt, last_hash=tx_hash))
                return existing, created
            except IntegrityError:
                continue  # a twin watcher recorded it first: read it back next time round
        raise RuntimeError(f"could not record deposit {key}")


def _utime(value: object) -> int:
    """The transaction's time (unix seconds), or 0 when the API gave something else."""
    try:
        now = int(value or 0)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        return 0
    return now if 0 <= now < 2**63 else 0


async def _sleep_or_stop(stop: asyncio.Event, delay: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=delay)
    except TimeoutError:
        pass


# ------------------------------------------------------------------ admin and bot helpers


async def unclaimed_deposits(db: Database) -> list[TonDeposit]:
    """Deposits that matched nobody and that no ledger transaction has resolved yet."""
    from backend.models import Transaction

    async with db.session() as session:
        resolved = select(Transaction.idempotency_key)
        rows = await session.scalars(
            select(TonDeposit)
            .where(
                TonDeposit.status == TonDepositStatus.UNCLAIMED,
                TonDeposit.ledger_key.not_in(resolved),
            )
            .order_by(TonDeposit.lt)
        )
        return list(rows)


async def resolve_unclaimed(
    db: Database, ledger: Ledger, deposit_id: int, user_id: int, *, by: str
) -> TonDeposit:
    """Credit an unclaimed deposit to a user, under the deposit's own key (so, once)."""
    async with db.session() as session:
        deposit = await session.get(TonDeposit, deposit_id)
    if deposit is None or deposit.status != TonDepositStatus.UNCLAIMED:
        raise LookupError(f"no unclaimed deposit #{deposit_id}")
    await ledger.credit_deposit(
        user_id,
        deposit.amount,
        deposit.ledger_key,
        source=AccountKind.TON_IN,
        reason=f"unclaimed TON deposit {deposit.tx_hash} (lt {deposit.lt}) resolved by {by}",
    )
    async with db.session() as session, session.begin():
        row = await session.get(TonDeposit, deposit_id)
        assert row is not None
        row.note = f"{row.note or ''}; resolved to user {user_id} by {by}".lstrip("; ")
        row.user_id = user_id
        told = await session.scalar(
            select(TonNotification.id).where(TonNotification.key == f"deposit:{deposit_id}")
        )
        if told is None:
            session.add(
                TonNotification(
                    key=f"deposit:{deposit_id}",
                    user_id=user_id,
                    kind=NOTIFY_DEPOSIT,
                    amount=deposit.amount,
                )
            )
    return deposit


async def pending_notifications(db: Database, limit: int = 100) -> list[TonNotification]:
    """What the bot still has to tell users, oldest first."""
    async with db.session() as session:
        rows = await session.scalars(
            select(TonNotification)
            .where(TonNotification.delivered_at.is_(None))
            .order_by(TonNotification.id)
            .limit(limit)
        )
        return list(rows)


async def mark_delivered(db: Database, notification_id: int) -> bool:
    """Mark one notification told; False if it already was (another bot replica told it)."""
    import datetime as dt

    async with db.session() as session, session.begin():
        result = await session.execute(
            update(TonNotification)
            .where(TonNotification.id == notification_id, TonNotification.delivered_at.is_(None))
            .values(delivered_at=dt.datetime.now(dt.UTC))
            .execution_options(synchronize_session=False)
        )
        return result.rowcount == 1
