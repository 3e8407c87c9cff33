"""What both payout senders share (:class:`backend.ton.payouts.PayoutSender`, one v4r2 message
per payout, and :class:`backend.ton.highload.HighloadPayoutSender`, batches from a Highload
Wallet v3): the states that count as live or open, the step's outcome, the polling loop, the
provider's linked wallet and a payout's checked destination, when a live message goes again,
a payout's outcome in the ledger and the outbox, the lookup of a sent message on chain and its
landing, and reading TON Center's numbers and hashes."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import enum
import logging
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from ton_core import Cell

from backend import notifications
from backend.db import Database, rowcount
from backend.ledger import Ledger
from backend.models import (
    Payout,
    PayoutState,
    TonMessageState,
    TonPayoutBatch,
    TonPayoutBatchItem,
    TonPayoutMessage,
    TonPayoutStage,
    TonWallet,
)
from backend.ton.comment import AddressError, parse_address
from backend.ton.polling import poll_until_stopped
from backend.ton.toncenter import TonCenter, TonCenterError

log = logging.getLogger(__name__)

LIVE = (TonMessageState.SIGNED, TonMessageState.SENT)
OPEN_PAYOUT = (PayoutState.REQUESTED, TonPayoutStage.SIGNED, TonPayoutStage.SENT)
EXPIRY_GRACE_S = 30
RESEND_EVERY_S = 10


class Moved(Exception):
    """Another sender changed a payout first: roll back and look again."""


class Step(enum.Enum):
    IDLE = "idle"  # nothing to pay
    WAITING = "waiting"  # a message is in flight: poll again later
    PROGRESS = "progress"  # something changed: go on at once


def payout_comment(payout_id: int) -> str:
    return f"Cocoon payout #{payout_id}"


Live = TypeVar("Live", TonPayoutMessage, TonPayoutBatch)  # what a sender signs and sends


class Sender(Generic[Live]):
    """The loop and the queries of a payout sender. Subclasses find their live message
    (``_live``), drive it (``_drive``), sign the next one for up to ``batch_size`` open payouts
    (``_pay``), and name what a message pays (``_payouts_of``) and how the log calls it
    (``_label``)."""

    name = "payout sender"
    batch_size = 1

    def __init__(
        self,
        db: Database,
        ledger: Ledger,
        api: TonCenter,
        *,
        poll_interval_s: float = 3.0,
        backoff_max_s: float = 60.0,
        expiry_grace_s: float = EXPIRY_GRACE_S,
        resend_every_s: float = RESEND_EVERY_S,
        clock: Callable[[], float] = time.time,
        checkpoint: Callable[[str], None] | None = None,
    ) -> None:
        self.db = db
        self.ledger = ledger
        self.api = api
        self.poll_interval_s = poll_interval_s
        self.backoff_max_s = backoff_max_s
        self.expiry_grace_s = expiry_grace_s
        self.resend_every_s = resend_every_s
        self.clock = clock
        self._checkpoint = checkpoint or (lambda _name: None)

    async def step(self) -> Step:
        """One move of the state machine. Raises TonCenterError when the API fails."""
        live = await self._live()
        if live is not None:
            return await self._drive(live)
        payouts = await self._open_payouts(self.batch_size)
        if not payouts:
            return Step.IDLE
        await self._pay(payouts)
        return Step.PROGRESS

    async def _live(self) -> Live | None:  # pragma: no cover - each sender has its own
        """This wallet's live (signed or sent) message, if any."""
        raise NotImplementedError

    async def _drive(self, live: Live) -> Step:  # pragma: no cover
        """Carry ``live`` on: settle it when found on chain, resend it, or expire it."""
        raise NotImplementedError

    async def _pay(self, payouts: list[Payout]) -> None:  # pragma: no cover
        """Sign (and send) a message paying ``payouts``, the oldest open ones."""
        raise NotImplementedError

    def _label(self, live: Live) -> str:  # pragma: no cover
        """How the log names ``live``."""
        raise NotImplementedError

    def _payouts_of(self, live: Live) -> ColumnElement[bool]:  # pragma: no cover
        """The payouts ``live`` pays, as a condition on :class:`Payout`."""
        raise NotImplementedError

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Step until ``stop`` is set; on errors back off and carry on from the stored state."""

        async def step() -> bool:
            return await self.step() == Step.PROGRESS

        await poll_until_stopped(
            stop,
            step,
            poll_interval_s=self.poll_interval_s,
            backoff_max_s=self.backoff_max_s,
            log=logging.getLogger(type(self).__module__),
            name=self.name,
        )

    async def _find(self, msg_hash: str, boc: str) -> list[dict[str, Any]]:
        """A sent message's transaction, looked up by its normalized hash (what TON Center
        indexes), then by its raw hash (what an indexer without normalization knows)."""
        found = await self.api.transactions_by_message(msg_hash)
        raw = raw_hash(boc)
        if not found and raw is not None and raw != msg_hash:
            found = await self.api.transactions_by_message(raw)
        return found

    async def _open_payouts(self, limit: int) -> list[Payout]:
        """The oldest payouts still to pay, at most ``limit``: never one with a live message or
        a live batch on any wallet (not signed twice, whichever kind of wallet signed it)."""
        live_batch = (
            select(TonPayoutBatchItem.payout_id)
            .join(TonPayoutBatch, TonPayoutBatch.id == TonPayoutBatchItem.batch_id)
            .where(TonPayoutBatch.state.in_(LIVE))
        )
        live_message = select(TonPayoutMessage.payout_id).where(TonPayoutMessage.state.in_(LIVE))
        async with self.db.session() as session:
            return list(
                await session.scalars(
                    select(Payout)
                    .where(
                        Payout.state.in_(OPEN_PAYOUT),
                        Payout.id.not_in(live_message),
                        Payout.id.not_in(live_batch),
                    )
                    .order_by(Payout.id)
                    .limit(limit)
                )
            )

    async def _linked_wallet(self, provider_id: int) -> str | None:
        async with self.db.session() as session:
            return await session.scalar(
                select(TonWallet.address).where(
                    TonWallet.user_id == provider_id, TonWallet.purpose == "payout"
                )
            )

    async def _destination(self, payout: Payout) -> str | None:
        """Where ``payout`` goes: its own address, else the provider's linked payout wallet.
        None when there is none or it is not a TON address: the payout is then failed (the
        money back with the provider) and the provider told."""
        destination = payout.destination or await self._linked_wallet(payout.provider_id)
        try:
            if destination is None:
                raise AddressError("no payout wallet is linked")
            parse_address(destination)
        except AddressError as error:
            await self.ledger.fail_payout(payout.id, reason=f"cannot pay: {error}")
            log.warning("payout #%s failed: %s", payout.id, error)
            await self._tell(payout, paid=False)
            return None
        return destination

    async def _waiting_to_expire(
        self, live: Live, valid_until: float, *, resend: bool = True
    ) -> bool:
        """True while ``live`` may still execute (valid until ``valid_until``, plus the grace for
        clock skew): it goes again when due (unless ``resend`` is false) and the sender waits."""
        now = self.clock()
        if now < valid_until:
            if resend and self._send_due(live):
                await self._send(live)
            return True
        return now < valid_until + self.expiry_grace_s

    @staticmethod
    async def _mark_signed(session: AsyncSession, payouts: list[Payout], now: dt.datetime) -> None:
        """Move ``payouts`` to signed in ``session``'s transaction; :class:`Moved` when one was
        closed meanwhile. Lock order everywhere: the payout rows, then their message or batch."""
        for payout in payouts:
            moved = await session.execute(
                update(Payout)
                .where(Payout.id == payout.id, Payout.state.in_(OPEN_PAYOUT))
                .values(state=TonPayoutStage.SIGNED, updated_at=now)
                .execution_options(synchronize_session=False)
            )
            if rowcount(moved) != 1:
                raise Moved  # closed meanwhile

    async def _send(self, live: Live) -> None:
        """Hand ``live``'s stored bytes to TON Center and mark it (and its payouts) sent."""
        error: TonCenterError | None = None
        try:
            await self.api.send_message(live.boc)
        except TonCenterError as exc:
            # Maybe not delivered, maybe already executed (a resend after it landed is refused):
            # either way the chain decides; the same bytes go again next time while valid.
            error = exc
            log.info("%s: send failed (%s); will check and resend", self._label(live), exc)
        self._checkpoint("sent")
        table = type(live)
        now = dt.datetime.now(dt.UTC)
        async with self.db.session() as session, session.begin():
            await session.execute(
                update(Payout)
                .where(self._payouts_of(live), Payout.state == TonPayoutStage.SIGNED)
                .values(state=TonPayoutStage.SENT, updated_at=now)
                .execution_options(synchronize_session=False)
            )
            await session.execute(
                update(table)
                .where(table.id == live.id, table.state.in_(LIVE))
                .values(state=TonMessageState.SENT, send_count=table.send_count + 1, sent_at=now)
                .execution_options(synchronize_session=False)
            )
        if error is not None and not error.transient:
            log.warning("%s: TON Center refused the message: %s", self._label(live), error)

    async def _close_expired(self, live: Live) -> bool:
        """Close ``live`` as expired; False when it was no longer live."""
        table = type(live)
        async with self.db.session() as session, session.begin():
            closed = await session.execute(
                update(table)
                .where(table.id == live.id, table.state.in_(LIVE))
                .values(state=TonMessageState.EXPIRED, closed_at=dt.datetime.now(dt.UTC))
                .execution_options(synchronize_session=False)
            )
        return rowcount(closed) == 1

    def _send_due(self, live: TonPayoutMessage | TonPayoutBatch) -> bool:
        """A live message, still valid, goes (again): signed but never sent, or sent
        ``resend_every_s`` ago or more."""
        if live.state == TonMessageState.SIGNED or live.sent_at is None:
            return True
        return (dt.datetime.now(dt.UTC) - live.sent_at).total_seconds() >= self.resend_every_s

    async def _record_outcome(self, payout: Payout, *, paid: bool, by: str, reason: str) -> None:
        """What the chain did with ``payout`` (sent ``by`` a message or a batch), in the ledger
        (idempotent by key: a replay after a crash changes nothing) and the provider's outbox.
        ``reason`` says why it failed when it did not pay."""
        if payout.state == PayoutState.FAILED and paid:
            log.error(
                "payout #%s was failed by hand but %s paid it on chain: the provider "
                "was refunded AND paid; recover %s nanoTON by hand",
                payout.id,
                by,
                payout.amount,
            )
        if payout.state not in (PayoutState.CONFIRMED, PayoutState.FAILED):
            if paid:
                await self.ledger.confirm_payout(payout.id)
            else:
                await self.ledger.fail_payout(payout.id, reason=f"payout {reason}")
                log.warning("payout #%s failed on chain (%s): %s", payout.id, by, reason)
        await self._tell(payout, paid=paid)

    async def _landed(self, live: TonPayoutMessage | TonPayoutBatch, tx: dict[str, Any]) -> None:
        """Close a live message or batch as landed in transaction ``tx``."""
        table = type(live)
        async with self.db.session() as session, session.begin():
            await session.execute(
                update(table)
                .where(table.id == live.id, table.state.in_(LIVE))
                .values(
                    state=TonMessageState.LANDED,
                    tx_hash=hash_or_none(tx.get("hash")),
                    tx_lt=json_int(tx.get("lt")),
                    closed_at=dt.datetime.now(dt.UTC),
                )
                .execution_options(synchronize_session=False)
            )

    async def _tell(self, payout: Payout, *, paid: bool) -> None:
        """Put the outcome in the provider's outbox (the bot tells it, and edits the status
        message /withdraw left); once per payout, a replay after a crash included."""
        outcome = "confirmed" if paid else "failed"
        await notifications.notify(
            self.db,
            payout.provider_id,
            notifications.NOTIFY_PAYOUT_CONFIRMED if paid else notifications.NOTIFY_PAYOUT_FAILED,
            f"payout:{payout.id}:{outcome}",
            amount=payout.amount,
            data={"payout_id": payout.id, "destination": payout.destination},
        )


def json_int(value: object) -> int:
    """A number as TON Center's JSON gives it (int or string); -1 for anything else."""
    if not isinstance(value, int | str | float) or isinstance(value, bool):
        return -1
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def hash_or_none(value: object) -> str | None:
    """A transaction hash (base64 or hex) as hex; None when absent or unreadable."""
    from backend.ton.transactions import hash_hex

    try:
        return hash_hex(str(value)) if value else None
    except ValueError:
        return None


def raw_hash(boc: str) -> str | None:
    """The hash of the external message itself (hex), as stored in its BOC."""
    try:
        return Cell.one_from_boc(base64.b64decode(boc)).hash.hex()
    except Exception:  # a stored BOC always parses; never let a bad one stop the sender
        return None
