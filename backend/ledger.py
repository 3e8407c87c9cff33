"""The double-entry ledger, in integer nanoTON.

Every movement of money is one :class:`~backend.models.Transaction` whose entries sum to zero,
written in one database transaction together with the balances it changes, under a unique
idempotency key (a deposit's chain transaction, a job id, a payout id). Applying a key a second
time changes nothing and returns the first result; a key reused for a *different* request is
refused.

Balances are kept on the accounts, so reading one is a single indexed row. A balance that may
not go negative is changed only by a conditional ``UPDATE ... WHERE balance >= amount``: two
racing holds on one balance cannot both pass, on SQLite or PostgreSQL. A CHECK constraint in the
schema backs this up. On PostgreSQL, the per-turn operations (a hold, its settlement or
release) are each one statement, one round trip (:mod:`backend.ledger_pg`), writing the same
rows; the general path (:mod:`backend.ledger_write`) does every other operation, and those when
the statement did not apply.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Mapping

from sqlalchemy import func, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from backend.db import insert_new, rowcount
from backend.group_commit import GroupCommit
from backend.ledger_pg import Close, CloseBatcher, hold_in_one_statement, keep_in_one_statement
from backend.ledger_types import (
    USER_SIDE_KINDS,
    Audit,
    Balances,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidAmount,
    InvalidState,
    LedgerError,
    Leg,
    NotFound,
    Receipt,
    TurnUsage,
    validate_amount,
    validate_key,
)
from backend.ledger_write import LedgerWriter, request_hash
from backend.models import (
    Account,
    AccountKind,
    Entry,
    Hold,
    HoldState,
    Payout,
    PayoutState,
    Transaction,
    TurnReceipt,
    TurnRecord,
)
from backend.settings import MAX_NANO

BPS = 10_000


def provider_cut(charged: int, share_bps: int) -> int:
    """The provider's share of a turn's price: rounded down, once per turn (the platform keeps
    the rest, so nothing is lost)."""
    return charged * share_bps // BPS


__all__ = [
    "USER_SIDE_KINDS",
    "Audit",
    "Balances",
    "IdempotencyConflict",
    "InsufficientFunds",
    "InvalidAmount",
    "InvalidState",
    "Ledger",
    "LedgerError",
    "NotFound",
    "Receipt",
    "TurnUsage",
    "validate_amount",
]


class Ledger(LedgerWriter):
    """Money operations over one :class:`Database` (their general path: :class:`LedgerWriter`)."""

    _closes: CloseBatcher | None = None
    _receipts: GroupCommit[tuple[str, int, str], bool | DBAPIError] | None = None

    # ------------------------------------------------------------------ reads

    async def balances(self, user_id: int) -> Balances:
        async with self.db.read_session() as session:
            rows = await session.execute(
                select(Account.kind, Account.balance).where(
                    Account.owner_id == user_id, Account.kind.in_(USER_SIDE_KINDS)
                )
            )
            found = {kind: balance for kind, balance in rows}
        return Balances(
            available=found.get(AccountKind.USER, 0),
            held=found.get(AccountKind.HOLD, 0),
            earned=found.get(AccountKind.PROVIDER, 0),
            pending_payout=found.get(AccountKind.PROVIDER_PENDING, 0),
        )

    async def available_after(self, user_id: int, key: str) -> int | None:
        """The user's available balance right after the transaction ``key`` (what a notice of
        that deposit shows, whatever moved since); None when there is no such transaction."""
        async with self.db.session() as session:
            transaction_id = await session.scalar(
                select(Transaction.id).where(Transaction.idempotency_key == key)
            )
            if transaction_id is None:
                return None
            account = (
                select(Account.id)
                .where(Account.kind == AccountKind.USER, Account.owner_id == user_id)
                .scalar_subquery()
            )
            total = await session.scalar(
                select(func.coalesce(func.sum(Entry.amount), 0)).where(
                    Entry.account_id == account, Entry.transaction_id <= transaction_id
                )
            )
        return int(total or 0)

    async def balance(self, kind: AccountKind, owner_id: int = 0) -> int:
        async with self.db.session() as session:
            value = await session.scalar(
                select(Account.balance).where(Account.kind == kind, Account.owner_id == owner_id)
            )
        return value or 0

    async def audit(self) -> Audit:
        """Check the invariants over the whole ledger (for tests, operators and monitoring)."""
        async with self.db.session() as session:
            balance_sum = (
                await session.execute(select(func.coalesce(func.sum(Account.balance), 0)))
            ).scalar_one()
            entry_sum = (
                await session.execute(select(func.coalesce(func.sum(Entry.amount), 0)))
            ).scalar_one()
            unbalanced = await session.scalars(
                select(Entry.transaction_id)
                .group_by(Entry.transaction_id)
                .having(func.sum(Entry.amount) != 0)
            )
            entry_totals = (
                select(Entry.account_id, func.sum(Entry.amount).label("total"))
                .group_by(Entry.account_id)
                .subquery()
            )
            drifted = await session.scalars(
                select(Account.id)
                .outerjoin(entry_totals, entry_totals.c.account_id == Account.id)
                .where(func.coalesce(entry_totals.c.total, 0) != Account.balance)
            )
            negative = await session.scalars(
                select(Account.id).where(Account.kind.in_(USER_SIDE_KINDS), Account.balance < 0)
            )
            return Audit(
                balance_sum=int(balance_sum),
                entry_sum=int(entry_sum),
                unbalanced_transactions=list(unbalanced),
                drifted_accounts=list(drifted),
                negative_accounts=list(negative),
            )

    async def get_hold(self, key: str) -> Hold | None:
        async with self.db.session() as session:
            return await session.scalar(select(Hold).where(Hold.key == key))

    async def get_payout(self, payout_id: int) -> Payout | None:
        async with self.db.session() as session:
            return await session.get(Payout, payout_id)

    # ------------------------------------------------------------ operations

    async def credit_deposit(
        self,
        user_id: int,
        amount: int,
        key: str,
        *,
        source: AccountKind = AccountKind.TON_IN,
        reason: str | None = None,
    ) -> Receipt:
        """Money from outside (TON, Stars, an operator's manual credit) onto a user's balance."""
        validate_amount(amount)
        if source not in (
            AccountKind.TON_IN,
            AccountKind.STARS_IN,
            AccountKind.USDT_IN,
            AccountKind.OPERATOR,
        ):
            raise LedgerError(f"a deposit cannot come from a {source} account")

        async def body(_session: AsyncSession, _tx: Transaction) -> tuple[list[Leg], None]:
            return [Leg(source, 0, -amount), Leg(AccountKind.USER, user_id, amount)], None

        request = {"user": user_id, "amount": amount, "source": str(source)}
        return await self._run(key, "deposit", request, body, reason)

    async def hold(self, user_id: int, amount: int, key: str) -> Receipt:
        """Set ``amount`` aside from the user's balance for one job. ``key`` names the hold."""
        validate_amount(amount)
        validate_key(key)
        if (fast := await self._hold_in_one_statement(user_id, amount, key)) is not None:
            return fast

        async def body(session: AsyncSession, _tx: Transaction) -> tuple[list[Leg], int]:
            hold = Hold(key=key, user_id=user_id, amount=amount, state=HoldState.OPEN)
            session.add(hold)
            await session.flush()
            legs = [Leg(AccountKind.USER, user_id, -amount), Leg(AccountKind.HOLD, user_id, amount)]
            return legs, hold.id

        return await self._run(key, "hold", {"user": user_id, "amount": amount}, body, None)

    async def _hold_in_one_statement(self, user_id: int, amount: int, key: str) -> Receipt | None:
        """The hold as one statement, one round trip on PostgreSQL (it is on every priced
        turn's way to its first token); None when it did not apply (:mod:`backend.ledger_pg`):
        :meth:`_run` then does it, or says why not, as it always has."""
        if not self.one_statement:
            return None
        fingerprint = request_hash("hold", {"user": user_id, "amount": amount})
        return await hold_in_one_statement(self.db, user_id, amount, key, fingerprint)

    async def settle(
        self,
        hold_key: str,
        cost: int,
        *,
        provider_id: int | None,
        share_bps: int,
        key: str | None = None,
        usage: TurnUsage | None = None,
    ) -> Receipt:
        """Close a hold: the user pays ``cost`` (at most the hold), the provider gets its share
        (rounded down), the platform the rest, and what is left of the hold goes back.
        ``usage``, when given, is recorded as the turn's :class:`TurnRecord` in the same
        transaction (``/usage``, history, provider dashboards), and its receipt, if it has one,
        as the turn's :class:`TurnReceipt` (one commit a turn; a replay writes neither)."""
        if isinstance(cost, bool) or not isinstance(cost, int) or cost < 0 or cost > MAX_NANO:
            raise InvalidAmount(f"cost must be a whole number of nanoTON >= 0, got {cost!r}")
        if not 0 <= share_bps <= BPS:
            raise LedgerError(f"provider share must be 0..{BPS} basis points, got {share_bps}")
        key = key or f"settle:{hold_key}"
        request = {"hold": hold_key, "cost": cost, "provider": provider_id, "share": share_bps}
        closed = await self._close_in_one_statement(
            hold_key, key, "settle", request, cost, provider_id, share_bps, usage
        )
        if closed is not None:
            return closed

        async def body(session: AsyncSession, _tx: Transaction) -> tuple[list[Leg], int]:
            hold = await self._close_hold(session, hold_key, HoldState.SETTLED)
            charged = min(cost, hold.amount)
            hold.charged = charged
            to_provider = provider_cut(charged, share_bps) if provider_id is not None else 0
            legs = [
                Leg(AccountKind.HOLD, hold.user_id, -hold.amount),
                Leg(AccountKind.USER, hold.user_id, hold.amount - charged),
                Leg(AccountKind.PROVIDER, provider_id or 0, to_provider),
                Leg(AccountKind.PLATFORM, 0, charged - to_provider),
            ]
            if usage is not None:
                session.add(
                    TurnRecord(
                        turn_id=hold_key,
                        user_id=hold.user_id,
                        model=usage.model,
                        prompt_tokens=usage.prompt_tokens,
                        cached_prompt_tokens=usage.cached_prompt_tokens,
                        completion_tokens=usage.completion_tokens,
                        cost=charged,
                        provider_id=provider_id,
                        provider_earned=to_provider,
                        worker_id=usage.worker_id,
                        tee=usage.tee,
                        finish_reason=usage.finish_reason,
                    )
                )
                if usage.receipt is not None:  # a receipt kept already stays as it was
                    await session.execute(
                        insert_new(self.db.dialect, TurnReceipt).values(
                            turn_id=hold_key, user_id=hold.user_id, body=usage.receipt
                        )
                    )
            return legs, hold.id

        return await self._run(key, "settle", request, body, None)

    async def release(self, hold_key: str, *, key: str | None = None) -> Receipt:
        """Give a whole hold back to the user (the job never ran, or failed before output)."""
        key = key or f"release:{hold_key}"
        request = {"hold": hold_key}
        closed = await self._close_in_one_statement(hold_key, key, "release", request, 0, None, 0)
        if closed is not None:
            return closed

        async def body(session: AsyncSession, _tx: Transaction) -> tuple[list[Leg], int]:
            hold = await self._close_hold(session, hold_key, HoldState.RELEASED)
            legs = [
                Leg(AccountKind.HOLD, hold.user_id, -hold.amount),
                Leg(AccountKind.USER, hold.user_id, hold.amount),
            ]
            return legs, hold.id

        return await self._run(key, "release", request, body, None)

    async def _close_in_one_statement(
        self,
        hold_key: str,
        key: str,
        kind: str,
        request: Mapping[str, object],
        cost: int,
        provider_id: int | None,
        share_bps: int,
        usage: TurnUsage | None = None,
    ) -> Receipt | None:
        """A hold's settlement or release as one statement, one round trip on PostgreSQL,
        group-committed with the closes asked meanwhile (:class:`CloseBatcher`); None when it
        did not apply (the hold not open, the key used): :meth:`_run` then does it, replays
        it, or says why not, as it always has."""
        if not self.one_statement:
            return None
        validate_key(key)
        if self._closes is None or self._closes.loop is not asyncio.get_running_loop():
            self._closes = CloseBatcher(self.db, max_batch=self.close_batch)
        fingerprint = request_hash(kind, request)
        close = Close(hold_key, key, kind, fingerprint, cost, provider_id, share_bps, usage)
        return await self._closes.close(close)

    async def keep_receipt(self, turn_id: str, user_id: int, body: str) -> bool:
        """Keep the receipt of a turn no settlement wrote (a free turn's, or one whose hold
        was released first), group-committed with the receipts asked meanwhile (one INSERT,
        one commit; a load of one turn at a time waits for nothing); False when the turn's
        receipt was kept already (it stays as it was)."""
        if self._receipts is None or self._receipts.loop is not asyncio.get_running_loop():
            self._receipts = GroupCommit(
                self._keep_receipts, max_batch=self.close_batch, keys=lambda r: (r[0],)
            )
        kept = await self._receipts.write((turn_id, user_id, body))
        if isinstance(kept, DBAPIError):
            raise kept
        return kept

    async def _keep_receipts(self, receipts: list[tuple[str, int, str]]) -> list[bool | DBAPIError]:
        """Write receipts in one commit (on PostgreSQL one statement, one round trip, first; a
        batch refused as a whole, one by one: one bad receipt never fails another); for each,
        whether it is new, or why it was refused."""
        rows = [{"turn_id": turn, "user_id": user, "body": body} for turn, user, body in receipts]
        if self.one_statement and (fast := await keep_in_one_statement(self.db, rows)) is not None:
            return [turn in fast for turn, _user, _body in receipts]
        try:
            async with self.db.session() as session, session.begin():
                kept = set(
                    await session.scalars(
                        insert_new(self.db.dialect, TurnReceipt)
                        .values(rows)
                        .returning(TurnReceipt.turn_id)
                    )
                )
        except DBAPIError as error:
            if len(receipts) == 1:
                return [error]
            return [(await self._keep_receipts([receipt]))[0] for receipt in receipts]
        return [turn in kept for turn, _user, _body in receipts]

    async def release_stale_holds(self, older_than: dt.timedelta) -> list[str]:
        """Release every hold still open after ``older_than``: its turn's process died before
        settling. Returns the keys released. Safe to run from several processes at once."""
        cutoff = dt.datetime.now(dt.UTC) - older_than
        async with self.db.session() as session:
            keys = list(
                await session.scalars(
                    select(Hold.key).where(Hold.state == HoldState.OPEN, Hold.created_at < cutoff)
                )
            )
        released = []
        for key in keys:
            try:
                await self.release(key)
            except InvalidState:
                continue  # settled or released meanwhile
            released.append(key)
        return released

    async def request_withdrawal(
        self, provider_id: int, amount: int, key: str, *, destination: str | None = None
    ) -> Receipt:
        """Move a provider's earnings to pending and create the payout (``subject_id``)."""
        validate_amount(amount)
        if amount < self.min_withdrawal:
            raise InvalidAmount(
                f"the smallest withdrawal is {self.min_withdrawal} nanoTON, got {amount}"
            )

        async def body(session: AsyncSession, _tx: Transaction) -> tuple[list[Leg], int]:
            payout = Payout(
                key=key, provider_id=provider_id, amount=amount, destination=destination
            )
            session.add(payout)
            await session.flush()
            legs = [
                Leg(AccountKind.PROVIDER, provider_id, -amount),
                Leg(AccountKind.PROVIDER_PENDING, provider_id, amount),
            ]
            return legs, payout.id

        request = {"provider": provider_id, "amount": amount, "to": destination}
        return await self._run(key, "withdrawal", request, body, None)

    async def confirm_payout(self, payout_id: int, *, key: str | None = None) -> Receipt:
        """The payout landed on chain: pending funds leave for the outside world."""
        return await self._finish_payout(payout_id, PayoutState.CONFIRMED, key)

    async def fail_payout(
        self, payout_id: int, *, key: str | None = None, reason: str | None = None
    ) -> Receipt:
        """The payout will never land: pending funds return to the provider."""
        return await self._finish_payout(payout_id, PayoutState.FAILED, key, reason)

    # -------------------------------------------------------------- internals

    async def _finish_payout(
        self, payout_id: int, state: PayoutState, key: str | None, reason: str | None = None
    ) -> Receipt:
        key = key or f"payout:{payout_id}:{state}"

        async def body(session: AsyncSession, _tx: Transaction) -> tuple[list[Leg], int]:
            payout = await session.get(Payout, payout_id)
            if payout is None:
                raise NotFound(f"no payout #{payout_id}")
            closed = await session.execute(
                update(Payout)
                .where(
                    Payout.id == payout_id,
                    Payout.state.not_in((PayoutState.CONFIRMED, PayoutState.FAILED)),
                )
                .values(state=state, updated_at=dt.datetime.now(dt.UTC))
                .execution_options(synchronize_session=False)
            )
            if rowcount(closed) != 1:
                raise InvalidState(f"payout #{payout_id} is already {payout.state}")
            owner = payout.provider_id
            if state == PayoutState.CONFIRMED:
                to = Leg(AccountKind.TON_OUT, 0, payout.amount)
            else:
                to = Leg(AccountKind.PROVIDER, owner, payout.amount)
            return [Leg(AccountKind.PROVIDER_PENDING, owner, -payout.amount), to], payout.id

        return await self._run(key, f"payout_{state}", {"payout": payout_id}, body, reason)
