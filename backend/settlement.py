"""How a turn ends with money: the settlement from the worker's signed usage, held to the
turn's bounds, or the release of the whole hold; once either way (:class:`TurnSettlement`).

The user pays the actual cost out of the hold (at most the hold), the provider gets its share,
the rest goes back; the worker's crossed bounds are flagged; the turn's end is counted once.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

import redis
import redis.asyncio as aioredis

from backend import bounds
from backend.bounds import Bill, Flag
from backend.flags import record_flags
from backend.ledger import InvalidState, Ledger, LedgerError, TurnUsage
from backend.pricing import turn_cost
from backend.receipts import BilledUsage, ReceiptRecord, open_receipt
from backend.serverkeys import route_id, route_secret
from backend.settings import ModelPrice, Settings
from backend.turns import TurnCounter, TurnDone, TurnRequest, WorkerProof
from workers import registry, streams
from workers.wire import FinalRecord, key_fingerprint

log = logging.getLogger("cocoon.dispatch")

ROUTE_TTL_S = 3600


class SettlingDispatcher(Protocol):
    """What a settling turn uses of its dispatcher (:class:`backend.dispatch.Dispatcher`)."""

    settings: Settings
    ledger: Ledger
    redis: aioredis.Redis
    metrics: TurnCounter | None
    workers: registry.WorkerSnapshot


class TurnSettlement:
    """The settling half of :class:`backend.dispatch.Turn`: its charge, its release, the flags
    of the bounds its worker crossed, its metrics. The turn holds the state declared here."""

    d: SettlingDispatcher
    request: TurnRequest
    turn_id: str
    price: ModelPrice
    max_tokens: int
    held: int
    job_id: str
    worker: registry.WorkerInfo | None
    end_outcome: str
    started_at: float
    _delivered_bytes: int
    _reader: streams.StreamReader | None
    _closed: bool
    _counted: bool
    _first_token_seen: bool

    # What the receipt's digests are checked against (backend.receipts): the sealed request
    # as enqueued, and the reply text as read (a sealed turn reads neither: its client checks).
    sealed_request_sha256: str | None = None
    prompt_bound: int | None = None  # a sealed turn's: from the ciphertext's length
    _reply_sha256: hashlib._Hash | None = None

    def _route_id(self) -> str | None:
        """The conversation's route name in Redis: keyed with the server's route secret
        (backend.serverkeys), never a hash of what the user wrote that anyone can recompute."""
        conversation = self.request.conversation_id
        if not conversation:
            return None
        return route_id(route_secret(self.d.settings), conversation)

    def _keep_request(self, sealed: bytes) -> bytes:
        self.sealed_request_sha256 = hashlib.sha256(sealed).hexdigest()
        self._reply_sha256 = hashlib.sha256()
        return sealed

    def _reply_size(self, text: str) -> int:
        """The UTF-8 bytes of a chunk of the reply, taken into the reply's digest."""
        data = text.encode("utf-8", "surrogatepass")
        if self._reply_sha256 is not None:
            self._reply_sha256.update(data)
        return len(data)

    async def _settle(self, final: FinalRecord) -> TurnDone:
        """Bill the worker's signed usage, each count at most its bound (backend.bounds)."""
        assert self.worker is not None
        billed = bounds.bill(
            final,
            messages=self.request.messages,
            stop=self.request.sampling.stop,
            max_tokens=self.max_tokens,
            context_length=self.price.context_length,
            delivered_bytes=self._delivered_bytes,
            prompt_bound=self.prompt_bound,
            tools=self.request.tools,
        )
        outcome = "cancelled" if final.finish_reason == "cancelled" else "settled"
        cost = turn_cost(
            self.price,
            prompt_tokens=billed.prompt_tokens,
            cached_prompt_tokens=billed.cached_prompt_tokens,
            completion_tokens=billed.completion_tokens,
        )
        # The ledger caps the charge at the hold the same way.
        receipt = self._receipt(billed, min(cost, self.held))
        charged, kept = await self._charge(
            billed, final.finish_reason, cost, outcome=outcome, receipt=receipt
        )
        await self._flag(billed.flags)
        if receipt is not None and not kept:
            receipt = await self._keep_receipt(receipt, charged)
        if (route := self._route_id()) is not None:
            # A hint for the next turn: Redis away now (a failover) must not lose this turn's
            # answer, which is billed already (the client would be told 503, nothing charged).
            with contextlib.suppress(redis.RedisError):
                await registry.remember_route(
                    self.d.redis, route, self.worker.worker_id, ROUTE_TTL_S
                )
        log.info(
            "turn %s settled: %d+%d tokens, %d nanoTON, %s",
            self.turn_id,
            billed.prompt_tokens,
            billed.completion_tokens,
            charged,
            final.finish_reason,
        )
        return TurnDone(
            turn_id=self.turn_id,
            model=self.request.model,
            prompt_tokens=billed.prompt_tokens,
            cached_prompt_tokens=billed.cached_prompt_tokens,
            completion_tokens=billed.completion_tokens,
            finish_reason=final.finish_reason,
            cost=charged,
            worker=replace(self.proof(), receipt_id=receipt.id if receipt else None),
            receipt=receipt,
        )

    def _receipt(self, billed: Bill, charged: int) -> ReceiptRecord | None:
        """The worker's receipt of this turn, checked, to keep for the user with the turn's
        settlement (never fails the turn: a worker without a valid receipt is logged, and its
        turn has none)."""
        assert self.worker is not None
        raw = self._reader.receipt if self._reader is not None else None
        signed = open_receipt(raw, self.worker.verify_key, self.job_id)
        if signed is None:
            return None
        problems = []
        if signed.receipt.model != self.request.model:
            problems.append("the receipt names another model")
        if self.sealed_request_sha256 and self._reply_sha256 is not None:
            if signed.receipt.request_sha256 != self.sealed_request_sha256:
                problems.append("the receipt's request digest is not the sealed request's")
            if signed.receipt.reply_sha256 != self._reply_sha256.hexdigest():
                problems.append("the receipt's reply digest is not the reply's")
        if problems:
            log.warning("turn %s: refused the worker's receipt: %s", self.turn_id, problems)
            return None
        return ReceiptRecord(
            id=self.turn_id,
            signed=signed,
            worker_id=self.worker.worker_id,
            tee=self.worker.tee,
            verify_key=self.worker.verify_key,
            box_public_key=self.worker.box_public_key,
            billed=BilledUsage(
                prompt_tokens=billed.prompt_tokens,
                cached_prompt_tokens=billed.cached_prompt_tokens,
                completion_tokens=billed.completion_tokens,
            ),
            cost_nanoton=str(charged),
            sealed=self.prompt_bound is not None,
        )

    async def _keep_receipt(self, record: ReceiptRecord, charged: int) -> ReceiptRecord:
        """Keep the receipt of a turn that no settlement wrote (a free turn, a hold released
        before it settled), with what was charged: group-committed with the other turns'
        (:meth:`~backend.ledger.Ledger.keep_receipt`), as settlements are on PostgreSQL."""
        if record.cost_nanoton != str(charged):
            record = record.model_copy(update={"cost_nanoton": str(charged)})
        try:
            body = record.model_dump_json()
            if not await self.d.ledger.keep_receipt(record.id, self.request.user_id, body):
                log.info("turn %s: its receipt was kept already", record.id)
        except Exception as error:  # the turn stands; the database's trouble is logged
            log.error("turn %s: could not keep its receipt: %r", self.turn_id, error)
        return record

    async def _charge(
        self,
        billed: Bill,
        finish_reason: str,
        cost: int | None = None,
        *,
        outcome: str,
        receipt: ReceiptRecord | None = None,
    ) -> tuple[int, bool]:
        """Close the turn: the user pays ``cost`` (by default, ``billed`` at the turn's price)
        out of the hold (at most the hold), the rest goes back, and the receipt is kept in the
        same ledger transaction. Returns the nanoTON charged, and whether the settlement kept
        the receipt."""
        if cost is None:
            cost = turn_cost(
                self.price,
                prompt_tokens=billed.prompt_tokens,
                cached_prompt_tokens=billed.cached_prompt_tokens,
                completion_tokens=billed.completion_tokens,
            )
        charged = min(cost, self.held)
        kept = False
        if self.held:
            try:
                await self._settle_hold(billed, finish_reason, cost, receipt)
                kept = receipt is not None
            except InvalidState:
                # The stale-hold sweeper gave the hold back first (the turn outlived the hold
                # timeout): the user keeps it; a turn is never charged twice.
                log.warning("turn %s: hold released before it settled; no charge", self.turn_id)
                charged = 0
        self._closed = True
        self._count_end(
            outcome,
            prompt_tokens=billed.prompt_tokens,
            completion_tokens=billed.completion_tokens,
            charged=charged,
        )
        await self._after_job()
        return charged, kept

    async def _settle_hold(
        self, billed: Bill, finish_reason: str, cost: int, receipt: ReceiptRecord | None
    ) -> None:
        assert self.worker is not None
        await self.d.ledger.settle(
            self.turn_id,
            cost,
            provider_id=self.worker.provider_id,
            share_bps=self.d.settings.provider_share_bps,
            usage=TurnUsage(
                model=self.request.model,
                prompt_tokens=billed.prompt_tokens,
                cached_prompt_tokens=billed.cached_prompt_tokens,
                completion_tokens=billed.completion_tokens,
                finish_reason=finish_reason,
                worker_id=self.worker.worker_id,
                tee=self.worker.tee,
                receipt=None if receipt is None else receipt.model_dump_json(),
            ),
        )

    async def _flag(self, found: Sequence[Flag]) -> None:
        """Count, record and tell the bounds the worker crossed (never fails the turn)."""
        if not found:
            return
        assert self.worker is not None
        if self.d.metrics is not None:
            for flag in found:
                self.d.metrics.flagged(self.request.model, flag.kind.value)
        try:
            await record_flags(
                self.d.ledger.db,
                found,
                worker_id=self.worker.worker_id,
                provider_id=self.worker.provider_id,
                turn_id=self.turn_id,
                model=self.request.model,
            )
        except Exception as error:  # the bill stands; the database's trouble is logged
            log.error("turn %s: could not record the worker's flags: %r", self.turn_id, error)

    def proof(self) -> WorkerProof:
        assert self.worker is not None
        return WorkerProof(
            worker_id=self.worker.worker_id,
            tee=self.worker.tee,
            engine=self.worker.engine,
            engine_version=self.worker.engine_version,
            key_fingerprint=key_fingerprint(self.worker.box_public_key, self.worker.verify_key),
        )

    async def release(self) -> None:
        """Give the whole hold back (once); the turn is over without a charge."""
        if self._closed:
            return
        self._closed = True
        if self.held:
            try:
                await self.d.ledger.release(self.turn_id)
            except LedgerError as error:
                log.error("turn %s: could not release its hold: %s", self.turn_id, error)
        self._count_end(self.end_outcome)
        await self._after_job()

    async def _after_job(self) -> None:
        if self.worker is not None:
            with contextlib.suppress(redis.RedisError):
                # The slot back and the stream gone, in one round trip.
                async with self.d.redis.pipeline(transaction=False) as pipe:
                    pipe.zrem(registry.slots_key(self.worker.worker_id), self.job_id)
                    pipe.delete(streams.stream_key(self.job_id))
                    await pipe.execute()
                self.d.workers.released(self.worker.worker_id)

    def _count_first_token(self) -> None:
        if not self._first_token_seen:
            self._first_token_seen = True
            if self.d.metrics is not None:
                self.d.metrics.first_token_after(
                    self.request.model, time.monotonic() - self.started_at
                )

    def _count_end(self, outcome: str, **usage: int) -> None:
        """Count the turn's end once (a settlement or a release closes it once too)."""
        if self._counted or self.d.metrics is None:
            return
        self._counted = True
        self.d.metrics.ended(
            self.request.model, outcome, time.monotonic() - self.started_at, **usage
        )
