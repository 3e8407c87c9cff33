"""The chain watcher: reads the deposit wallet's transactions and credits each deposit once.

For every transaction, in logical-time order, from a cursor kept in the database:

1. classify it (:func:`backend.ton.transactions.classify`): external, bounced and zero-value
   messages, and aborted transactions whose value really went back to the sender, are
   ignored, each row keeping its amount and the reason; a jetton transfer notification is
   recorded as one, never as TON, unless it is USDT from the deposit wallet's own USDT jetton
   wallet (:mod:`backend.ton.jettons`): then its memo's user is credited the USDT at the
   operator's rate; a text comment that is some user's deposit memo is credited; anything
   else with value is *unclaimed* (:mod:`backend.ton.unclaimed`);
2. credit the ledger under the key ``ton:<account>:<lt>:<hash>`` (the ledger applies a key
   once, so a crash between steps never credits twice);
3. in one database transaction: record the deposit (unique on account, lt, hash), queue the
   user's notification, and move the cursor past it.

A crash anywhere repeats at most steps 2 and 3 for one transaction, which changes nothing the
second time. API errors and rate limits back off (bounded) and retry the same page: the cursor
only moves past a transaction once it has been handled.

The indexer behind TON Center commits blocks in parallel and has no read watermark, so a
transaction can become visible after one with a higher ``lt`` was read. Every poll therefore
re-reads an overlap window below the cursor (the transactions of the last ``overlap_s``
seconds of chain time before the newest one read, at most ``overlap_max`` of them) and
handles any it has not recorded yet.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from backend import notifications
from backend.db import Database, rowcount
from backend.ledger import Ledger
from backend.models import AccountKind, TonCursor, TonDeposit, TonDepositStatus
from backend.notifications import NOTIFY_DEPOSIT
from backend.settings import MAX_NANO
from backend.ton.comment import raw_address
from backend.ton.jettons import UsdtWallet, usdt_credit
from backend.ton.polling import poll_until_stopped
from backend.ton.toncenter import TonCenter
from backend.ton.transactions import Classified, JettonNotification, classify, hash_hex
from backend.users import find_by_memo

log = logging.getLogger(__name__)

MAX_MEMO_LOOKUP = 64  # a memo is 12 characters; longer comments are nobody's memo
MEMO_CACHE_SIZE = 10_000
OVERLAP_S = 120  # chain seconds re-read below the cursor on every poll (late-indexed txs)
OVERLAP_MAX = 100  # at most this many transactions re-read per poll


@dataclass(frozen=True)
class DepositEvent:
    """What the notification hook receives when a deposit is credited."""

    user_id: int
    amount: int
    deposit_id: int
    tx_hash: str


Notify = Callable[[DepositEvent], Awaitable[None]]
Checkpoint = Callable[[str], None]


def deposit_key(account: str, lt: int, tx_hash: str) -> str:
    return f"ton:{account}:{lt}:{tx_hash}"


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
        overlap_s: int = OVERLAP_S,
        overlap_max: int = OVERLAP_MAX,
        notify: Notify | None = None,
        checkpoint: Checkpoint | None = None,
        usdt_master: str | None = None,
        usdt_nano_per_micro: int = 0,
    ) -> None:
        self.db = db
        self.ledger = ledger
        self.api = api
        self.account = raw_address(account)
        self.page_size = page_size
        self.poll_interval_s = poll_interval_s
        self.backoff_max_s = backoff_max_s
        self.overlap_s = overlap_s
        self.overlap_max = min(max(overlap_max, 0), 1000)  # TON Center's largest page
        self.notify = notify
        self._checkpoint = checkpoint or (lambda _name: None)
        self._memo_users: dict[str, int] = {}
        self.usdt = (
            UsdtWallet(api, raw_address(usdt_master), self.account)
            if usdt_master and 0 < usdt_nano_per_micro <= MAX_NANO
            else None
        )
        self.usdt_nano_per_micro = usdt_nano_per_micro

    async def cursor(self) -> int:
        async with self.db.session() as session:
            value = await session.scalar(
                select(TonCursor.last_lt).where(TonCursor.account == self.account)
            )
        return int(value or 0)

    async def poll_once(self) -> int:
        """Re-read the overlap window, then handle one page of new transactions; the number
        of transactions handled that had not been recorded yet. Raises TonCenterError."""
        cursor = await self.cursor()
        late = await self._reread(cursor) if cursor and self.overlap_max else 0
        start = cursor + 1
        page = await self.api.transactions(self.account, start_lt=start, limit=self.page_size)
        self._checkpoint("fetched")
        handled = 0
        for tx in sorted(page, key=lambda t: int(t["lt"])):
            if int(tx["lt"]) < start:
                continue  # an API that ignores start_lt must not make us go back
            await self.handle(tx)
            handled += 1
        return late + handled

    async def _reread(self, cursor: int) -> int:
        """Handle transactions at or below the cursor that became visible after it moved
        past them (the indexer commits in parallel); how many there were."""
        floor = await self._window_floor(cursor)
        page = await self.api.transactions(
            self.account,
            start_lt=floor + 1,
            end_lt=cursor,
            limit=self.overlap_max,
            newest_first=True,
        )
        window: dict[tuple[int, str], dict[str, Any]] = {}
        for tx in page:
            lt = int(tx["lt"])
            if floor < lt <= cursor:
                try:
                    window[(lt, hash_hex(str(tx["hash"])))] = tx
                except ValueError:
                    continue  # handle() would refuse it too; the forward read never saw it
        if not window:
            return 0
        async with self.db.session() as session:
            rows = await session.execute(
                select(TonDeposit.lt, TonDeposit.tx_hash).where(
                    TonDeposit.account == self.account,
                    TonDeposit.lt.in_(sorted({lt for lt, _hash in window})),
                )
            )
            seen = {(int(lt), tx_hash) for lt, tx_hash in rows}
        late = [window[key] for key in sorted(window) if key not in seen]
        for tx in late:
            log.warning(
                "deposit watcher: transaction lt %s became visible after the cursor passed it "
                "(lt %s); handling it now",
                tx["lt"],
                cursor,
            )
            await self.handle(tx)
        return len(late)

    async def _window_floor(self, cursor: int) -> int:
        """The lt below the overlap window: the newest recorded transaction older than
        ``overlap_s`` chain seconds before the cursor's (an account's lt and time grow
        together, so everything later than it is in the window)."""
        async with self.db.session() as session:
            newest = await session.scalar(
                select(func.max(TonDeposit.utime)).where(
                    TonDeposit.account == self.account, TonDeposit.lt == cursor
                )
            )
            if newest is None:
                return 0
            floor = await session.scalar(
                select(func.max(TonDeposit.lt)).where(
                    TonDeposit.account == self.account,
                    TonDeposit.lt < cursor,
                    TonDeposit.utime < int(newest) - self.overlap_s,
                )
            )
        return int(floor or 0)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Poll until ``stop`` is set; back off on API errors, never skip a transaction."""

        async def step() -> bool:  # a full page: more may wait behind it
            # Handling a transaction is safe to repeat: after an error, the same page again.
            return await self.poll_once() >= self.page_size

        await poll_until_stopped(
            stop,
            step,
            poll_interval_s=self.poll_interval_s,
            backoff_max_s=self.backoff_max_s,
            log=log,
            name="deposit watcher",
        )

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
        usdt: Usdt | None = None
        if status == TonDepositStatus.JETTON and self.usdt is not None:
            usdt = await self._usdt(found)
            status, note = usdt.status, usdt.note
            if status == TonDepositStatus.CREDITED:
                user_id = await self._user_for(found.jetton.memo if found.jetton else None)
                if user_id is None:
                    status, note = TonDepositStatus.UNCLAIMED, "USDT: memo matches no user"
                else:
                    await self.ledger.credit_deposit(
                        user_id,
                        usdt.credited or 0,
                        key,
                        source=AccountKind.USDT_IN,
                        reason=f"USDT deposit {tx_hash} (lt {lt})",
                    )
                    self._checkpoint("credited")
        elif status == TonDepositStatus.CREDITED:
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
        deposit, created = await self._record(
            tx, lt, tx_hash, key, found, status, note, user_id, usdt
        )
        self._checkpoint("recorded")
        if created:
            _log_recorded(deposit)
        if created and status == TonDepositStatus.CREDITED and self.notify is not None:
            amount = found.amount if usdt is None else usdt.credited or 0
            try:
                await self.notify(DepositEvent(deposit.user_id or 0, amount, deposit.id, tx_hash))
            except Exception:
                log.exception("deposit notification hook failed (the outbox still has it)")
        return deposit

    async def _usdt(self, found: Classified) -> Usdt:
        """What a jetton notification is worth: USDT to credit (CREDITED, to be matched to a
        memo) only from the deposit wallet's own USDT jetton wallet; anything else stays a
        refused jetton notification (JETTON), with the master its sender claims. Raises
        TonCenterError while the USDT wallet's address cannot be read (retried later)."""
        assert self.usdt is not None and found.source is not None
        jetton = found.jetton
        rate = self.usdt_nano_per_micro
        refused = await self.usdt.refusal(found.source)
        if refused is not None:
            why, claimed = refused
            return Usdt(TonDepositStatus.JETTON, f"refused: {why}", claimed, None, None)
        master = self.usdt.master
        if jetton is None or jetton.amount is None:
            unread = jetton.note if jetton is not None else None
            note = f"USDT: {unread or 'unreadable'}"
            return Usdt(TonDepositStatus.JETTON, note, master, None, None)
        credited = usdt_credit(jetton.amount, rate)
        if credited is None:
            note = f"USDT: {jetton.amount} micro-units at {rate} nanoTON each is out of range"
            return Usdt(TonDepositStatus.JETTON, note, master, rate, None)
        if jetton.memo is None:
            note = f"USDT: {jetton.note or 'no comment'}"
            return Usdt(TonDepositStatus.UNCLAIMED, note, master, rate, credited)
        return Usdt(TonDepositStatus.CREDITED, None, master, rate, credited)

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
        usdt: Usdt | None = None,
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
                            jetton_amount=_jetton_amount(found.jetton),
                            jetton_sender=found.jetton.sender if found.jetton else None,
                            jetton_master=usdt.master if usdt else None,
                            nano_per_unit=usdt.rate if usdt else None,
                            credited=usdt.credited if usdt else None,
                        )
                        session.add(existing)
                        await session.flush()
                        if status == TonDepositStatus.CREDITED and user_id is not None:
                            notifications.add(
                                session,
                                user_id,
                                NOTIFY_DEPOSIT,
                                f"deposit:{existing.id}",
                                amount=found.amount if usdt is None else usdt.credited or 0,
                            )
                    moved = await session.execute(
                        update(TonCursor)
                        .where(TonCursor.account == self.account, TonCursor.last_lt < lt)
                        .values(last_lt=lt, last_hash=tx_hash)
                        .execution_options(synchronize_session=False)
                    )
                    if rowcount(moved) == 0 and await session.get(TonCursor, self.account) is None:
                        session.add(TonCursor(account=self.account, last_lt=lt, last_hash=tx_hash))
                return existing, created
            except IntegrityError:
                continue  # a twin watcher recorded it first: read it back next time round
        raise RuntimeError(f"could not record deposit {key}")


@dataclass(frozen=True)
class Usdt:
    """What the watcher made of a jetton notification when it takes USDT."""

    status: TonDepositStatus
    note: str | None
    master: str | None  # USDT's, or the one a refused sender claims
    rate: int | None  # nanoTON per micro-unit it is (or would be) credited at
    credited: int | None  # nanoTON it credits (or would, once an operator resolves it)


def _log_recorded(deposit: TonDeposit) -> None:
    """One line for every transaction that was not credited, with its amount and reason."""
    if deposit.status == TonDepositStatus.UNCLAIMED and deposit.credited is not None:
        log.warning(
            "unclaimed USDT deposit #%s: %s micro-units (%s nanoTON at its rate), lt %s (%s)",
            deposit.id,
            deposit.jetton_amount,
            deposit.credited,
            deposit.lt,
            deposit.note,
        )
    elif deposit.status == TonDepositStatus.UNCLAIMED:
        log.warning(
            "unclaimed TON deposit #%s: %s nanoTON, lt %s (%s)",
            deposit.id,
            deposit.amount,
            deposit.lt,
            deposit.note,
        )
    elif deposit.status == TonDepositStatus.JETTON:
        log.warning(
            "jetton notification #%s (%s): %s units of jetton %s from %s through %s, "
            "%s nanoTON, lt %s",
            deposit.id,
            deposit.note,
            deposit.jetton_amount,
            deposit.jetton_master or "unknown",
            deposit.jetton_sender,
            deposit.source,
            deposit.amount,
            deposit.lt,
        )
    elif deposit.status == TonDepositStatus.IGNORED:
        log.info(
            "ignored TON transaction #%s: %s nanoTON, lt %s (%s)",
            deposit.id,
            deposit.amount,
            deposit.lt,
            deposit.note,
        )


def _jetton_amount(jetton: JettonNotification | None) -> str | None:
    return None if jetton is None or jetton.amount is None else str(jetton.amount)


def _utime(value: object) -> int:
    """The transaction's time (unix seconds), or 0 when the API gave something else."""
    if not isinstance(value, int | str | float):  # what JSON gives a number as (None: 0)
        return 0
    try:
        now = int(value or 0)
    except (TypeError, ValueError, OverflowError):
        return 0
    return now if 0 <= now < 2**63 else 0
