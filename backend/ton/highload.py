"""Payouts in batches from a Highload Wallet v3 hot wallet, each paid exactly once.

A batch is one external message paying up to 253 payouts (one transaction of the wallet
runs them all: an ``internal_transfer`` to itself whose action list holds the transfers),
under its own query id. It moves ``signed → sent → landed | expired``:

- **signed**: the batch (query id, ``created_at``, BOC, hash) and its items are stored, and its
  payouts move to ``signed``, in one database transaction *before* anything is sent. Query ids
  come from the wallet's batch sequence (unique per wallet), so one is never given twice. One
  batch per wallet is live at a time (a partial unique index): no other external message of
  ours cleans the contract's query dictionaries while a batch's fate is open.
- **sent**: the same bytes are handed to TON Center on every poll while the message is valid
  (``created_at > now - timeout``, the contract's replay window) and not found.
- **landed**: the external message's transaction is found (by its normalized, then raw hash);
  the ``internal_transfer`` it sent to the wallet is followed to the transaction that ran the
  transfers. Each payout is confirmed when an outgoing message pays its address its amount
  with its comment; otherwise it failed and the money returns to the provider.
- **expired**: only after ``created_at + timeout`` (plus a grace for clock skew) has passed,
  the message is not found, and the contract's ``processed?`` get-method says its query id
  was never used: then the message can never execute (the contract refuses an old
  ``created_at``), and its payouts go into a new batch under a new query id. A query id the
  contract says is used while the index has no transaction: wait, never sign again.

Crash anywhere: the next run finds the live batch and carries on from the chain's state.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.exc import IntegrityError

from backend.db import Database
from backend.ledger import Ledger
from backend.models import (
    Payout,
    TonMessageState,
    TonPayoutBatch,
    TonPayoutBatchItem,
)
from backend.ton.comment import AddressError, decode_comment, raw_address
from backend.ton.sending import (
    LIVE,
    Moved,
    Sender,
    Step,
    json_int,
    payout_comment,
)
from backend.ton.toncenter import TonCenter, TonCenterError
from backend.ton.wallet import (
    HIGHLOAD_MAX_MESSAGES,
    BatchTransfer,
    HighloadHotWallet,
    highload_query_id,
)

log = logging.getLogger(__name__)

CREATED_AT_LAG_S = 30  # created_at this far back: a node whose clock is behind still accepts it


class HighloadPayoutSender(Sender[TonPayoutBatch]):
    """Pays requested payouts in batches of up to ``batch_size`` from one highload wallet."""

    name = "highload payout sender"

    def __init__(
        self,
        db: Database,
        ledger: Ledger,
        api: TonCenter,
        wallet: HighloadHotWallet,
        *,
        batch_size: int = HIGHLOAD_MAX_MESSAGES,
        **options: Any,
    ) -> None:
        if not 1 <= batch_size <= HIGHLOAD_MAX_MESSAGES:
            raise ValueError(f"a batch pays 1..{HIGHLOAD_MAX_MESSAGES} payouts")
        super().__init__(db, ledger, api, **options)
        self.wallet = wallet
        self.batch_size = batch_size

    async def _pay(self, payouts: list[Payout]) -> None:
        ready: list[tuple[Payout, str]] = []
        for payout in payouts:
            destination = await self._destination(payout)
            if destination is not None:
                ready.append((payout, raw_address(destination)))
        if ready:
            await self._sign(ready)

    # ------------------------------------------------------------- the steps

    async def _sign(self, payouts: list[tuple[Payout, str]]) -> None:
        async with self.db.session() as session:
            top = await session.scalar(
                select(func.max(TonPayoutBatch.sequence)).where(
                    TonPayoutBatch.wallet == self.wallet.raw
                )
            )
            landed = await session.scalar(
                select(TonPayoutBatch.id)
                .where(
                    TonPayoutBatch.wallet == self.wallet.raw,
                    TonPayoutBatch.state == TonMessageState.LANDED,
                )
                .limit(1)
            )
        sequence = 0 if top is None else int(top) + 1
        signed = await self.wallet.sign_batch(
            [BatchTransfer(dest, p.amount, payout_comment(p.id)) for p, dest in payouts],
            query_id=highload_query_id(sequence),
            created_at=int(self.clock()) - CREATED_AT_LAG_S,
            deploy=landed is None,  # until a batch landed, the wallet may not be deployed
        )
        now = dt.datetime.now(dt.UTC)
        try:
            async with self.db.session() as session, session.begin():
                await self._mark_signed(session, [payout for payout, _dest in payouts], now)
                batch = TonPayoutBatch(
                    wallet=self.wallet.raw,
                    sequence=sequence,
                    query_id=signed.query_id,
                    created_at_chain=signed.created_at,
                    timeout=signed.timeout,
                    boc=signed.boc,
                    msg_hash=signed.msg_hash,
                    state=TonMessageState.SIGNED,
                    send_count=0,
                )
                session.add(batch)
                await session.flush()
                for payout, dest in payouts:
                    session.add(
                        TonPayoutBatchItem(
                            batch_id=batch.id, payout_id=payout.id, destination=dest,
                            amount=payout.amount,
                        )
                    )  # fmt: skip
        except Moved:
            return
        except IntegrityError:
            log.info("another batch of this wallet is live (or took the sequence); not signing")
            return
        self._checkpoint("signed")
        live = await self._live()
        if live is not None and live.msg_hash == signed.msg_hash:
            await self._send(live)

    async def _drive(self, batch: TonPayoutBatch) -> Step:
        found = await self._find(batch.msg_hash, batch.boc)
        if found:
            return await self._settle(batch, found[0])
        valid_until = batch.created_at_chain + batch.timeout  # created_at > now - timeout
        if await self._waiting_to_expire(batch, valid_until):
            return Step.WAITING
        if await self._processed(batch.query_id):
            # It executed and the index has not caught up: never sign again on a guess.
            log.warning(
                "batch %s: query id %s is used on chain but the message is not found yet; waiting",
                batch.id,
                batch.query_id,
            )
            return Step.WAITING
        await self._expire(batch)
        return Step.PROGRESS

    def _label(self, live: TonPayoutBatch) -> str:
        return f"batch {live.id}"

    def _payouts_of(self, live: TonPayoutBatch) -> ColumnElement[bool]:
        return Payout.id.in_(
            select(TonPayoutBatchItem.payout_id).where(TonPayoutBatchItem.batch_id == live.id)
        )

    async def _expire(self, batch: TonPayoutBatch) -> None:
        """The batch can never execute: close it; its open payouts wait for the next batch."""
        if await self._close_expired(batch):
            log.info("batch %s (query id %s) expired unseen; its payouts go again", batch.id,
                     batch.query_id)  # fmt: skip

    async def _settle(self, batch: TonPayoutBatch, tx: dict[str, Any]) -> Step:
        """The batch landed: each payout is paid or failed by the transfers that left."""
        sent = await self._transfers(batch, tx)
        if sent is None:
            return Step.WAITING  # the internal transfer's transaction is not indexed yet
        async with self.db.session() as session:
            items = list(
                await session.scalars(
                    select(TonPayoutBatchItem)
                    .where(TonPayoutBatchItem.batch_id == batch.id)
                    .order_by(TonPayoutBatchItem.payout_id)
                )
            )
        self._checkpoint("before_confirm")
        # The ledger first (idempotent by key), then the batch: a crash in between finds the
        # batch live again, finds it on chain again, and the ledger replays.
        for item in items:
            wanted = (item.destination, item.amount, payout_comment(item.payout_id))
            paid = wanted in sent
            if paid:
                sent.remove(wanted)
            payout = await self.ledger.get_payout(item.payout_id)
            assert payout is not None
            await self._record_outcome(
                payout, paid=paid, by=f"batch {batch.id}", reason="not sent on chain"
            )
        await self._landed(batch, tx)
        return Step.PROGRESS

    async def _transfers(
        self, batch: TonPayoutBatch, tx: dict[str, Any]
    ) -> list[tuple[str, int, str | None]] | None:
        """(destination, amount, comment) of every transfer the batch made; None while the
        transaction of its ``internal_transfer`` is not indexed yet."""
        if _aborted(tx):
            return []
        sent: list[tuple[str, int, str | None]] = []
        pending = [tx]
        for _ in range(HIGHLOAD_MAX_MESSAGES + 2):  # links to further action lists, bounded
            if not pending:
                return sent
            current = pending.pop()
            for out in current.get("out_msgs") or []:
                if _raw(out.get("destination")) != self.wallet.raw:
                    sent.append(_transfer(out))
                    continue
                follow = out.get("hash")
                if not isinstance(follow, str) or not follow:
                    return None
                found = await self.api.transactions_by_message(follow)
                if not found:
                    return None
                inner = found[0]
                if _raw(inner.get("account")) in (None, self.wallet.raw) and not _aborted(inner):
                    pending.append(inner)
        return sent

    # -------------------------------------------------------------- queries

    async def _processed(self, query_id: int) -> bool:
        """The contract's ``processed?(query_id, need_clean = 0)``: its stored dictionaries,
        which only an accepted external message of ours cleans."""
        result = await self.api.run_get_method(
            self.wallet.raw,
            "processed?",
            [{"type": "num", "value": hex(query_id)}, {"type": "num", "value": "0x0"}],
        )
        if result.exit_code == -13:
            return False  # no code: the wallet was never deployed, it ran no message
        answer = result.number(0)
        if result.exit_code != 0 or answer is None:
            raise TonCenterError(f"processed? answered exit code {result.exit_code}")
        return answer != 0

    async def _live(self) -> TonPayoutBatch | None:
        async with self.db.session() as session:
            return await session.scalar(
                select(TonPayoutBatch).where(
                    TonPayoutBatch.wallet == self.wallet.raw, TonPayoutBatch.state.in_(LIVE)
                )
            )


def _aborted(tx: dict[str, Any]) -> bool:
    return bool((tx.get("description") or {}).get("aborted"))


def _raw(value: object) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return raw_address(value)
    except AddressError:
        return None


def _transfer(out: dict[str, Any]) -> tuple[str, int, str | None]:
    """(destination, amount, comment) of an outgoing message as TON Center shows it."""
    content = out.get("message_content") or {}
    decoded = content.get("decoded") if isinstance(content, dict) else None
    comment = decoded.get("comment") if isinstance(decoded, dict) else None
    body = content.get("body") if isinstance(content, dict) else None
    if comment is None and isinstance(body, str) and body:
        try:
            comment = decode_comment(body).memo
        except Exception:  # a body that is no comment pays no payout
            comment = None
    return _raw(out.get("destination")) or "", json_int(out.get("value")), comment


__all__ = ["HighloadPayoutSender"]
