"""Payouts from the hot wallet, paid exactly once through crashes and a flaky API.

A payout moves ``requested → signed → sent → confirmed | failed``:

- **signed**: the hot wallet's seqno is read, the transfer is signed with a ``valid_until``,
  and the message (seqno, valid_until, BOC, normalized hash) is stored *before* anything is
  sent. A partial unique index allows one live (signed or sent) message per wallet, so two live
  signatures for one payout, or two payouts racing for one seqno, cannot exist.
- **sent**: the stored BOC is handed to TON Center, and handed again (the same bytes) on every
  poll while it is valid and not found: a transient error or a lost message costs nothing, and a
  seqno executes at most once.
- **confirmed / failed**: the message is found on chain by its normalized hash (or, for an
  indexer that does not normalize, its raw hash). Not aborted and
  an outgoing message to the payout's address with the payout's value: confirmed (the ledger
  moves the money to TON out). Otherwise failed: the funds return to the provider.
- A message is given up and a new one signed only when its ``valid_until`` has passed (plus a
  grace for clock skew), it is not on chain, and the wallet's seqno shows it never executed:
  still at the message's seqno, or that seqno was used by another of our messages.

Crash anywhere: the next run finds the live message and carries on from the chain's state.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.exc import IntegrityError

from backend.db import Database, rowcount
from backend.ledger import Ledger
from backend.models import (
    Payout,
    PayoutState,
    TonMessageState,
    TonPayoutMessage,
)
from backend.ton.comment import AddressError, raw_address
from backend.ton.sending import (
    LIVE,
    Moved,
    Sender,
    Step,
    json_int,
    payout_comment,
)
from backend.ton.toncenter import TonCenter
from backend.ton.wallet import HotWallet, parse_external

log = logging.getLogger(__name__)


class PayoutSender(Sender[TonPayoutMessage]):
    """Pays requested payouts one at a time from one hot wallet."""

    def __init__(
        self,
        db: Database,
        ledger: Ledger,
        api: TonCenter,
        wallet: HotWallet,
        *,
        ttl_s: int = 120,
        **options: Any,
    ) -> None:
        super().__init__(db, ledger, api, **options)
        self.wallet = wallet
        self.ttl_s = ttl_s

    async def _pay(self, payouts: list[Payout]) -> None:
        (payout,) = payouts
        destination = await self._destination(payout)
        if destination is None:
            return
        seqno = await self._next_seqno()
        await self._sign(payout, destination, seqno, replacing=None)

    # ------------------------------------------------------------- the steps

    async def _drive(self, message: TonPayoutMessage) -> Step:
        found = await self._find(message.msg_hash, message.boc)
        if found:
            await self._settle(message, found[0])
            return Step.PROGRESS
        payout = await self.ledger.get_payout(message.payout_id)
        assert payout is not None
        # Closed by hand (``fail_payout``) while its message was out: never resend it, never
        # sign it again; only wait for the message to expire.
        closed = payout.state in (PayoutState.CONFIRMED, PayoutState.FAILED)
        if await self._waiting_to_expire(message, message.valid_until, resend=not closed):
            return Step.WAITING
        seqno = await self.api.wallet_seqno(self.wallet.raw)
        if seqno > message.seqno and not await self._seqno_used_by_other(message):
            # It may have landed and the index not caught up: never sign again on a guess.
            log.warning(
                "payout #%s: seqno moved past %s but message %s is not found yet; waiting",
                message.payout_id,
                message.seqno,
                message.msg_hash,
            )
            return Step.WAITING
        if closed:
            await self._close_expired(message)
            return Step.PROGRESS
        destination = payout.destination or await self._linked_wallet(payout.provider_id)
        assert destination is not None
        log.info("payout #%s: message expired unseen at seqno %s; signing again", payout.id, seqno)
        await self._sign(
            payout, destination, max(seqno, await self._next_seqno_floor()), replacing=message
        )
        return Step.PROGRESS

    async def _sign(
        self,
        payout: Payout,
        destination: str,
        seqno: int,
        *,
        replacing: TonPayoutMessage | None,
    ) -> None:
        valid_until = int(self.clock()) + self.ttl_s
        signed = self.wallet.sign_transfer(
            destination,
            payout.amount,
            seqno=seqno,
            valid_until=valid_until,
            comment=payout_comment(payout.id),
        )
        try:
            async with self.db.session() as session, session.begin():
                await self._mark_signed(session, [payout], dt.datetime.now(dt.UTC))
                if replacing is not None:
                    expired = await session.execute(
                        update(TonPayoutMessage)
                        .where(
                            TonPayoutMessage.id == replacing.id,
                            TonPayoutMessage.state.in_(LIVE),
                        )
                        .values(state=TonMessageState.EXPIRED, closed_at=dt.datetime.now(dt.UTC))
                        .execution_options(synchronize_session=False)
                    )
                    if rowcount(expired) != 1:
                        raise Moved  # a twin sender moved first
                session.add(
                    TonPayoutMessage(
                        payout_id=payout.id,
                        wallet=self.wallet.raw,
                        seqno=signed.seqno,
                        valid_until=signed.valid_until,
                        boc=signed.boc,
                        msg_hash=signed.msg_hash,
                        state=TonMessageState.SIGNED,
                        send_count=0,
                    )
                )
        except Moved:
            return
        except IntegrityError:
            log.info("payout #%s: another message of this wallet is live; not signing", payout.id)
            return
        self._checkpoint("signed")
        message = await self._live()
        if message is not None and message.msg_hash == signed.msg_hash:
            await self._send(message)

    def _label(self, live: TonPayoutMessage) -> str:
        return f"payout #{live.payout_id}"

    def _payouts_of(self, live: TonPayoutMessage) -> ColumnElement[bool]:
        return Payout.id == live.payout_id

    async def _settle(self, message: TonPayoutMessage, tx: dict[str, Any]) -> None:
        payout = await self.ledger.get_payout(message.payout_id)
        assert payout is not None
        # Where this very message pays (a wallet relinked since then changes nothing).
        (signed,) = parse_external(message.boc).transfers
        aborted = bool((tx.get("description") or {}).get("aborted"))
        paid = not aborted and any(
            _same(out.get("destination"), signed.destination)
            and json_int(out.get("value")) == payout.amount
            for out in tx.get("out_msgs") or []
        )
        self._checkpoint("before_confirm")
        # The ledger first (idempotent by key), then the message: a crash in between finds the
        # message live again, finds it on chain again, and the ledger replays.
        reason = "aborted on chain" if aborted else "no transfer in the transaction"
        await self._record_outcome(
            payout, paid=paid, by=f"its message {message.msg_hash}", reason=reason
        )
        await self._landed(message, tx)

    # -------------------------------------------------------------- queries

    async def _live(self) -> TonPayoutMessage | None:
        async with self.db.session() as session:
            return await session.scalar(
                select(TonPayoutMessage).where(
                    TonPayoutMessage.wallet == self.wallet.raw,
                    TonPayoutMessage.state.in_(LIVE),
                )
            )

    async def _next_seqno_floor(self) -> int:
        """One past the highest seqno of ours that landed (the API's seqno may lag)."""
        async with self.db.session() as session:
            top = await session.scalar(
                select(func.max(TonPayoutMessage.seqno)).where(
                    TonPayoutMessage.wallet == self.wallet.raw,
                    TonPayoutMessage.state == TonMessageState.LANDED,
                )
            )
        return 0 if top is None else int(top) + 1

    async def _next_seqno(self) -> int:
        return max(await self.api.wallet_seqno(self.wallet.raw), await self._next_seqno_floor())

    async def _seqno_used_by_other(self, message: TonPayoutMessage) -> bool:
        async with self.db.session() as session:
            other = await session.scalar(
                select(TonPayoutMessage.id).where(
                    TonPayoutMessage.wallet == message.wallet,
                    TonPayoutMessage.seqno == message.seqno,
                    TonPayoutMessage.state == TonMessageState.LANDED,
                    TonPayoutMessage.id != message.id,
                )
            )
        return other is not None


def _same(a: object, b: str | None) -> bool:
    if not isinstance(a, str) or not b:
        return False
    try:
        return raw_address(a) == raw_address(b)
    except AddressError:
        return False
