"""Deposits the watcher could not credit by itself, for the operator: those whose comment is
nobody's memo (``cocoon ton unclaimed``, then ``cocoon ton resolve`` credits one, once) and the
jetton transfer notifications (recorded, never credited as TON). An unclaimed USDT deposit
(from the deposit wallet's own USDT jetton wallet, with no user's memo) is resolved at the rate
stored with it; a refused jetton notification (a fake wallet, another jetton) never is."""

from __future__ import annotations

from sqlalchemy import select

from backend import notifications
from backend.db import Database
from backend.ledger import Ledger
from backend.models import AccountKind, Notification, TonDeposit, TonDepositStatus, Transaction
from backend.notifications import NOTIFY_DEPOSIT

__all__ = ["jetton_notifications", "resolve_unclaimed", "unclaimed_deposits"]


async def unclaimed_deposits(db: Database) -> list[TonDeposit]:
    """Deposits that matched nobody and that no ledger transaction has resolved yet."""
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


async def jetton_notifications(db: Database) -> list[TonDeposit]:
    """Jetton transfer notifications the deposit wallet received that credit nothing, oldest
    first: refused senders (``jetton_master`` is the master they claim) and unreadable ones."""
    async with db.session() as session:
        rows = await session.scalars(
            select(TonDeposit)
            .where(TonDeposit.status == TonDepositStatus.JETTON)
            .order_by(TonDeposit.lt)
        )
        return list(rows)


async def resolve_unclaimed(
    db: Database, ledger: Ledger, deposit_id: int, user_id: int, *, by: str
) -> TonDeposit:
    """Credit an unclaimed deposit to a user, under the deposit's own key (so, once)."""
    async with db.session() as session:
        deposit = await session.get(TonDeposit, deposit_id)
    if deposit is not None and deposit.status == TonDepositStatus.JETTON:
        raise LookupError(
            f"deposit #{deposit_id} is a jetton transfer notification, not TON: "
            "it cannot be credited as TON"
        )
    if deposit is None or deposit.status != TonDepositStatus.UNCLAIMED:
        why = "" if deposit is None else f" (#{deposit_id} is {deposit.status}: {deposit.note})"
        raise LookupError(f"no unclaimed deposit #{deposit_id}{why}")
    usdt = deposit.credited is not None
    amount = deposit.credited if deposit.credited is not None else deposit.amount
    await ledger.credit_deposit(
        user_id,
        amount,
        deposit.ledger_key,
        source=AccountKind.USDT_IN if usdt else AccountKind.TON_IN,
        reason=f"unclaimed {'USDT' if usdt else 'TON'} deposit {deposit.tx_hash} "
        f"(lt {deposit.lt}) resolved by {by}",
    )
    async with db.session() as session, session.begin():
        row = await session.get(TonDeposit, deposit_id)
        assert row is not None
        row.note = f"{row.note or ''}; resolved to user {user_id} by {by}".lstrip("; ")
        row.user_id = user_id
        told = await session.scalar(
            select(Notification.id).where(Notification.key == f"deposit:{deposit_id}")
        )
        if told is None:
            notifications.add(
                session, user_id, NOTIFY_DEPOSIT, f"deposit:{deposit_id}", amount=amount
            )
    return deposit
