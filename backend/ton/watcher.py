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

A page (up to ``page_size`` transactions, 1,000 at most, as TON Center allows) goes through
steps 2 and 3 in one database transaction (:mod:`backend.ton.crediting`): its users found by
memo in one query, each credit still its own ledger transaction under its own key, all
written together with the deposit rows, the notifications and the cursor. A crash leaves the
whole page or none of it. A USDT notification (checked over the API) and a page the batch
refuses (a key already used, a twin watcher's rows) go one transaction at a time as above.
While ``run()`` credits a full page, it reads the next one (the page the next poll asks for).

A crash anywhere repeats at most steps 2 and 3 for one page, which changes nothing the
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

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from backend.db import Database
from backend.ledger import Ledger
from backend.models import AccountKind, TonCursor, TonDeposit, TonDepositStatus, User
from backend.settings import MAX_NANO
from backend.ton.comment import raw_address
from backend.ton.crediting import Booking, NotBatched, log_recorded, record_one, record_page
from backend.ton.jettons import UsdtWallet, usdt_credit
from backend.ton.polling import poll_until_stopped
from backend.ton.toncenter import TonCenter
from backend.ton.transactions import Classified, JettonNotification, classify, hash_hex

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

    # run() reads a backlog's next page while it credits one: (its start, the read).
    _reading_ahead = False
    _ahead: tuple[int, asyncio.Task[list[dict[str, Any]]]] | None = None

    def __init__(
        self,
        db: Database,
        ledger: Ledger,
        api: TonCenter,
        account: str,
        *,
        page_size: int = 1000,
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
        page = await self._page(start)
        self._checkpoint("fetched")
        # An API that ignores start_lt must not make us go back.
        fresh = sorted((tx for tx in page if int(tx["lt"]) >= start), key=lambda t: int(t["lt"]))
        if self._reading_ahead and len(page) >= self.page_size and fresh:
            # A full page: the next one is read while this one is credited. It is the page the
            # next poll asks for once the cursor is past this one (else it is dropped), read a
            # little earlier: what became visible since, below its end, the overlap re-reads.
            after = int(fresh[-1]["lt"]) + 1
            read = self.api.transactions(self.account, start_lt=after, limit=self.page_size)
            self._ahead = (after, asyncio.create_task(read))
        await self.handle_many(fresh)
        return late + len(fresh)

    async def _page(self, start: int) -> list[dict[str, Any]]:
        """The page of transactions from ``start``: the one read ahead when it is that page
        and was read; else read now."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            after, task = ahead
            if after == start:
                await asyncio.wait([task])
                if not task.cancelled() and task.exception() is None:
                    return task.result()
            await _discard(task)  # another page, or it failed (a 429): read it again now
        return await self.api.transactions(self.account, start_lt=start, limit=self.page_size)

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
        await self.handle_many(late)
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

        self._reading_ahead = True  # a backlog's next page is read while one is credited
        try:
            await poll_until_stopped(
                stop,
                step,
                poll_interval_s=self.poll_interval_s,
                backoff_max_s=self.backoff_max_s,
                log=log,
                name="deposit watcher",
            )
        finally:
            self._reading_ahead = False
            ahead, self._ahead = self._ahead, None
            if ahead is not None:
                await _discard(ahead[1])

    async def handle_many(self, txs: list[dict[str, Any]]) -> None:
        """Credit (or record) transactions in lt order, a page in one database transaction
        (:mod:`backend.ton.crediting`); safe to repeat. A USDT notification (its jetton
        wallet is checked over the API) and a page the batch refuses go one at a time."""
        batch: list[tuple[dict[str, Any], int, str, Classified]] = []
        for tx in txs:
            try:
                lt, tx_hash = _identity(tx)
            except ValueError:
                await self._handle_batch(batch)  # what came before it is done, as one by one
                raise
            found = classify(tx, self.account)
            if found.status == TonDepositStatus.JETTON and self.usdt is not None:
                await self._handle_batch(batch)
                batch = []
                await self.handle(tx)
            else:
                batch.append((tx, lt, tx_hash, found))
        await self._handle_batch(batch)

    async def _handle_batch(self, batch: list[tuple[dict[str, Any], int, str, Classified]]) -> None:
        if not batch:
            return
        users = await self._users_for([found.memo for _tx, _lt, _hash, found in batch])
        bookings = []
        for tx, lt, tx_hash, found in batch:
            status, note, user_id = found.status, found.note, None
            if status == TonDepositStatus.CREDITED:
                memo = _memo_key(found.memo)
                user_id = users.get(memo) if memo else None
                if user_id is None:
                    status, note = TonDepositStatus.UNCLAIMED, "memo matches no user"
            key = deposit_key(self.account, lt, tx_hash)
            row = self._row(tx, lt, tx_hash, key, found, status, note, user_id, None)
            reason = f"TON deposit {tx_hash} (lt {lt})"
            bookings.append(Booking(row, user_id, reason))
        try:
            recorded = await record_page(self.db, self.account, bookings, self._checkpoint)
        except (NotBatched, IntegrityError) as why:
            log.info("deposit watcher: a page one transaction at a time (%s)", why)
            for tx, _lt, _hash, _found in batch:
                await self.handle(tx)
            return
        for deposit, created in recorded:
            await self._done(deposit, created, deposit["amount"])

    async def handle(self, tx: dict[str, Any]) -> TonDeposit:
        """Credit (or record) one transaction; safe to repeat. ValueError, before anything is
        changed, for a transaction without a usable ``lt`` and ``hash``."""
        lt, tx_hash = _identity(tx)
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
        row = self._row(tx, lt, tx_hash, key, found, status, note, user_id, usdt)
        deposit, created = await record_one(self.db, self.account, row)
        amount = found.amount if usdt is None else usdt.credited or 0
        await self._done({**row, "id": deposit.id}, created, amount)
        return deposit

    async def _done(self, deposit: dict[str, Any], created: bool, amount: int) -> None:
        """After the commit: say what was recorded (its row, with its id); tell the hook of a
        new credit."""
        self._checkpoint("recorded")
        if not created:
            return
        log_recorded(deposit)
        if deposit["status"] == TonDepositStatus.CREDITED and self.notify is not None:
            event = DepositEvent(deposit["user_id"] or 0, amount, deposit["id"], deposit["tx_hash"])
            try:
                await self.notify(event)
            except Exception:
                log.exception("deposit notification hook failed (the outbox still has it)")

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
        """The user whose memo this is."""
        key = _memo_key(memo)
        return (await self._users_for([key])).get(key) if key else None

    async def _users_for(self, memos: list[str | None]) -> dict[str, int]:
        """The users whose memos these are, by :func:`_memo_key`, in one query at most (memos
        never change, so found ones are remembered; unknown ones are not: the user may sign
        up before the next deposit)."""
        keys = {key for key in map(_memo_key, memos) if key}
        missing = sorted(keys - self._memo_users.keys())
        if missing:
            async with self.db.session() as session:
                found = await session.execute(
                    select(User.deposit_memo, User.id).where(User.deposit_memo.in_(missing))
                )
                if len(self._memo_users) + len(missing) > MEMO_CACHE_SIZE:
                    self._memo_users.clear()
                self._memo_users.update({memo: user_id for memo, user_id in found})
        return {key: self._memo_users[key] for key in keys if key in self._memo_users}

    def _row(
        self,
        tx: dict[str, Any],
        lt: int,
        tx_hash: str,
        key: str,
        found: Classified,
        status: TonDepositStatus,
        note: str | None,
        user_id: int | None,
        usdt: Usdt | None,
    ) -> dict[str, Any]:
        """The ``ton_deposits`` row of one transaction (without its id)."""
        return {
            "account": self.account,
            "lt": lt,
            "tx_hash": tx_hash,
            "source": found.source and found.source[:80],
            "amount": found.amount,
            "memo": found.shown,
            "status": status,
            "note": note,
            "user_id": user_id,
            "ledger_key": key,
            "utime": _utime(tx.get("now")),
            "jetton_amount": _jetton_amount(found.jetton),
            "jetton_sender": found.jetton.sender if found.jetton else None,
            "jetton_master": usdt.master if usdt else None,
            "nano_per_unit": usdt.rate if usdt else None,
            "credited": usdt.credited if usdt else None,
        }


@dataclass(frozen=True)
class Usdt:
    """What the watcher made of a jetton notification when it takes USDT."""

    status: TonDepositStatus
    note: str | None
    master: str | None  # USDT's, or the one a refused sender claims
    rate: int | None  # nanoTON per micro-unit it is (or would be) credited at
    credited: int | None  # nanoTON it credits (or would, once an operator resolves it)


async def _discard(task: asyncio.Task[Any]) -> None:
    """Stop a read ahead that is not wanted, its outcome taken (never logged as lost)."""
    task.cancel()
    await asyncio.wait([task])
    if not task.cancelled():
        task.exception()


def _identity(tx: dict[str, Any]) -> tuple[int, str]:
    """A transaction's lt and hash (hex); ValueError when it has no usable ones."""
    try:
        lt = int(tx["lt"])
        tx_hash = hash_hex(str(tx["hash"]))
    except (KeyError, TypeError, ValueError):
        raise ValueError("not a transaction: no usable lt and hash") from None
    if isinstance(tx["lt"], bool) or not 0 < lt < 2**63:
        raise ValueError(f"not a transaction: lt {lt} out of range")
    return lt, tx_hash


def _memo_key(memo: str | None) -> str | None:
    """How a comment is looked up as a memo; None for one that is nobody's (too long)."""
    if memo is None or len(memo.strip()) > MAX_MEMO_LOOKUP:
        return None
    return memo.strip().upper()


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
