"""One chat turn from any client (bot, Mini App, HTTP API) to a worker and back, billed once.

``Dispatcher.start_turn`` checks the model and the balance, holds the worst case, picks a
worker, seals the request to it, enqueues it on the worker's own RQ queue, and returns a
:class:`Turn` whose ``events()`` yields the reply as it streams, decrypted, then one
:class:`TurnDone`. The turn settles exactly once from the worker's signed final record; every
failure ends either retried on another worker (re-sealed, before the first token) or with the
whole hold released. The hold's ledger key is the turn id, so a settlement can never repeat.
What a turn is to its clients: :mod:`backend.turns`; how it settles: :mod:`backend.settlement`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis

from backend import admission, bounds
from backend.bounds import prompt_token_bound
from backend.errors import ErrorCode
from backend.ledger import InsufficientFunds, Ledger
from backend.pricing import default_max_tokens, worst_case_cost
from backend.settings import ModelPrice, Settings
from backend.turn_reading import TurnReading
from backend.turns import (
    TurnCounter,
    TurnDone,
    TurnError,
    TurnEvent,
    TurnRequest,
    TurnText,
    WorkerProof,
)
from workers import redisconn, registry, streams
from workers.jobs import aenqueue_job, job_id_for
from workers.logcontext import bind as bind_log_context
from workers.stream_bell import StreamBell
from workers.wire import (
    ErrorRecord,
    FinalRecord,
    JobRequest,
    StreamChunk,
    new_reply_keypair,
    public_b64,
    seal_request,
)

__all__ = [
    "Dispatcher",
    "Turn",
    "TurnCounter",
    "TurnDone",
    "TurnError",
    "TurnEvent",
    "TurnRequest",
    "TurnText",
    "WorkerProof",
    "prompt_token_bound",
]

log = logging.getLogger("cocoon.dispatch")

RETRYABLE_WORKER_ERRORS = frozenset({"worker_shutdown", "busy", "worker_unavailable"})
# Errors of a worker that may serve the retry itself when no other can (a passing fault).
TRANSIENT_WORKER_ERRORS = frozenset({"worker_unavailable"})
MAX_REDIS_CONNECTIONS = 1024

DEADLINE_GRACE_S = 30.0
"""A job's last entry is due this long after the job timeout at the latest (the node's stop
grace, its last writes, clocks that drift)."""


class Dispatcher:
    """Process-wide: one per web server or bot process, created in its factory."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        redis_async: aioredis.Redis,
        *,
        metrics: TurnCounter | None = None,
        first_token_timeout_s: float | None = None,
        idle_timeout_s: float | None = None,
        job_timeout_s: int = 600,
        queue_ttl_s: int = 120,
        max_attempts: int = 2,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.redis = redis_async
        # A worker's silence a turn waits out (default: the settings').
        self.first_token_timeout_s = (
            settings.worker_first_token_timeout_s
            if first_token_timeout_s is None
            else first_token_timeout_s
        )
        self.idle_timeout_s = (
            settings.worker_idle_timeout_s if idle_timeout_s is None else idle_timeout_s
        )
        self.job_timeout_s = job_timeout_s
        self.queue_ttl_s = queue_ttl_s
        self.max_attempts = max_attempts
        self._background: set[asyncio.Task[None]] = set()
        # The process's Prometheus turn metrics (backend.metrics); None: not counted.
        self.metrics = metrics
        # A turn's absolute deadline: read from this clock, after the job timeout and this grace.
        self.clock: Callable[[], float] = time.monotonic
        self.deadline_grace_s = DEADLINE_GRACE_S
        # The registry as of its last read: no turn reads the worker index itself.
        # `cocoon web` refreshes it in the background (workers.start()).
        # Stream readers wait for Redis's keyspace event of the next append (workers.stream_bell).
        self.bell = StreamBell(redis_async)
        self.workers = registry.WorkerSnapshot(
            redis_async,
            refresh_s=settings.worker_snapshot_s,
            default_capacity=settings.attestation.default_capacity,
            limit=settings.max_workers,
        )

    @classmethod
    def from_settings(
        cls, settings: Settings, ledger: Ledger, *, metrics: TurnCounter | None = None
    ) -> Dispatcher:
        # Each streaming turn holds a connection during its blocking reads: allow many, and
        # make the rest wait for one rather than fail.
        client = redisconn.async_client(
            settings.redis_url, max_connections=MAX_REDIS_CONNECTIONS, blocking_timeout=30
        )
        return cls(settings, ledger, client, metrics=metrics)

    async def wind_down(self, timeout_s: float) -> None:
        """Stopping: give turns whose client left up to ``timeout_s`` to settle; those still
        running then are cancelled, and their holds released (never left to the sweeper)."""
        if not self._background:
            return
        _done, pending = await asyncio.wait(set(self._background), timeout=max(0.0, timeout_s))
        for task in pending:
            task.cancel()
        if pending:
            log.warning("%d turns still settling at a stop: their holds are released", len(pending))
            await asyncio.gather(*pending, return_exceptions=True)

    async def close(self) -> None:
        """Wait for turns whose client left to finish settling, then close the connections."""
        if self._background:
            await asyncio.wait(self._background, timeout=self.idle_timeout_s + 5)
        await self.workers.close()
        await self.bell.close()
        await self.redis.aclose(close_connection_pool=True)

    def models(self) -> dict[str, ModelPrice]:
        return dict(self.settings.models)

    async def start_turn(self, request: TurnRequest) -> Turn:
        """Validate, hold, dispatch. Raises TurnError with nothing held on failure."""
        try:
            return await self._start_turn(request)
        except TurnError as error:
            if self.metrics is not None:
                self.metrics.error(error.code)
            raise

    async def _start_turn(self, request: TurnRequest) -> Turn:
        price = self.settings.price(request.model)
        if price is None:
            known = ", ".join(sorted(self.settings.models)) or "none"
            raise TurnError(
                ErrorCode.UNKNOWN_MODEL, f"unknown model {request.model!r}; available: {known}"
            )
        if not request.messages:
            raise TurnError(ErrorCode.INVALID_REQUEST, "a turn needs at least one message")
        admission.check_context(request.model, request.messages, price)
        prompt_bound = prompt_token_bound(request.messages, request.tools)
        max_tokens = request.max_tokens or default_max_tokens(self.settings, price)
        if max_tokens < 1 or max_tokens > price.context_length:
            raise TurnError(
                ErrorCode.INVALID_REQUEST,
                f"max_tokens must be 1..{price.context_length} for {request.model}",
            )
        worst = worst_case_cost(price, prompt_tokens=prompt_bound, max_tokens=max_tokens)
        turn_id = uuid.uuid4().hex
        bind_log_context(turn_id=turn_id, job_id=None)
        await self.hold(request.user_id, worst, turn_id)
        return await dispatched(Turn(self, request, turn_id, price, max_tokens, held=worst))

    async def hold(self, user_id: int, worst: int, turn_id: str) -> None:
        """Hold a turn's worst case on the user's balance (nothing for a free turn); TurnError
        INSUFFICIENT_BALANCE, saying what is needed and what is available, when it does not
        cover it."""
        if worst <= 0:
            return
        try:
            await self.ledger.hold(user_id, worst, turn_id)
        except InsufficientFunds:
            available = (await self.ledger.balances(user_id)).available
            raise TurnError(
                ErrorCode.INSUFFICIENT_BALANCE,
                f"this turn can cost up to {worst} nanoTON and the balance is {available}",
                needed=worst,
                available=available,
            ) from None

    def keep(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a settlement in the background, out of reach of a client that went away."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


TurnT = TypeVar("TurnT", bound="Turn")


async def dispatched(turn: TurnT) -> TurnT:
    """``turn`` sent to its worker; when that fails, it ends failed and its hold is released."""
    try:
        await turn.dispatch()
    except BaseException:
        turn.end_outcome = "failed"
        await turn.release()
        raise
    return turn


class Turn(TurnReading):
    """One running turn. Iterate ``events()`` once; ``cancel()`` stops it (billed for what was
    generated). Leaving the iteration early cancels too. Reading its reply within its bounds:
    :class:`~backend.turn_reading.TurnReading`; its settlement:
    :class:`~backend.settlement.TurnSettlement`."""

    d: Dispatcher

    def __init__(
        self,
        dispatcher: Dispatcher,
        request: TurnRequest,
        turn_id: str,
        price: ModelPrice,
        max_tokens: int,
        *,
        held: int,
    ) -> None:
        self.d = dispatcher
        self.request = request
        self.turn_id = turn_id
        self.price = price
        self.max_tokens = max_tokens
        self.held = held  # nanoTON held for the worst case (0: a free model, nothing held)
        # What the job's worker may send (backend.bounds), and what it sent so far.
        sampling = request.sampling
        self.bounds = bounds.ReplyBounds.for_max_tokens(
            max_tokens, logprobs=sampling.top_logprobs if sampling.logprobs else None
        )
        self._reader: streams.StreamReader | None = None
        self._reading_since = 0.0
        self._delivered_bytes = 0
        self._chunks = 0
        self.attempt = 0
        self.tried: list[str] = []
        self.job_id = ""
        self.worker: registry.WorkerInfo | None = None
        self._reply_key = new_reply_keypair()
        self._closed = False
        self._cancel_requested = False
        self._may_retry_same = False  # the last worker's fault was passing (a retry may use it)
        self.started_at = time.monotonic()
        # Metrics: how the turn ends when its hold is released, and whether it was counted.
        self.end_outcome = "released"
        self._first_token_seen = False
        self._counted = False

    # ------------------------------------------------------------- dispatch

    async def dispatch(self) -> None:
        """Pick a worker that has not failed this turn, seal to it, enqueue."""
        self.attempt += 1
        attempt = self.attempt
        worker: registry.WorkerInfo | None = None
        for exclude in (self.tried, []) if self._may_retry_same else (self.tried,):
            worker = await registry.pick_worker(
                self.d.redis,
                self.request.model,
                conversation_id=self._route_id(),
                exclude=exclude,
                job_id=lambda worker_id: job_id_for(worker_id, self.turn_id, attempt),
                slot_ttl_s=self.d.queue_ttl_s + self.d.job_timeout_s,
                # Attested workers always; unattested (directly registered) ones only in dev mode.
                attested_only=not self.d.settings.attestation.allow_dev,
                snapshot=self.d.workers,
            )
            if worker is not None:
                break
        self._may_retry_same = False
        if worker is None and attempt == 1:  # every worker busy: queue (backend.admission)
            worker = await admission.wait_for_room(self.d, self.request, self.turn_id, attempt)
        if worker is None:
            raise TurnError(
                ErrorCode.NO_WORKER,
                f"no worker is serving {self.request.model} right now; try later",
            )
        self.worker = worker
        self.job_id = job_id_for(worker.worker_id, self.turn_id, attempt)
        bind_log_context(turn_id=self.turn_id, job_id=self.job_id)
        self.tried.append(worker.worker_id)
        self._reply_key = new_reply_keypair()
        job = JobRequest(
            job_id=self.job_id,
            model=self.request.model,
            messages=list(self.request.messages),
            sampling=self.request.sampling,
            max_tokens=self.max_tokens,
            reply_key=public_b64(self._reply_key),
            conversation_id=self.request.conversation_id,
            tools=self.request.tools,
        )
        sealed = self._keep_request(seal_request(job, worker.box_public_key))
        await aenqueue_job(
            self.d.redis,
            worker.worker_id,
            self.job_id,
            sealed,
            timeout_s=self.d.job_timeout_s,
            ttl_s=self.d.queue_ttl_s,
            max_tokens=self.max_tokens,
        )
        log.info(
            "turn %s job %s -> worker %s (attempt %d)",
            self.turn_id,
            self.job_id,
            worker.worker_id,
            self.attempt,
        )

    # --------------------------------------------------------------- stream

    async def events(self) -> AsyncGenerator[TurnEvent, None]:
        """The reply as it streams, then one TurnDone. Raises TurnError on failure."""
        finished = False
        try:
            while True:
                got_text = False
                try:
                    async for event in self._job_events():
                        if isinstance(event, StreamChunk):
                            got_text = True
                            self._count_first_token()
                            yield TurnText.of(event, self.request.sampling)
                        elif isinstance(event, FinalRecord):
                            done = await self._settle(event)
                            finished = True
                            yield done
                            return
                        else:
                            await self._on_worker_error(event, got_text)
                            break  # retry on another worker
                except streams.StreamTimeout as stall:
                    await self._on_timeout(stall)
        finally:
            if not finished:
                await self._abandon()

    async def _on_worker_error(self, error: ErrorRecord, got_text: bool) -> None:
        log.info("turn %s job %s: worker error %s", self.turn_id, self.job_id, error.code)
        if not got_text and error.code in RETRYABLE_WORKER_ERRORS and self._can_retry():
            self._may_retry_same = error.code in TRANSIENT_WORKER_ERRORS
            await self._redispatch()
            return
        self.end_outcome = "cancelled" if error.code == "cancelled" else "failed"
        await self.release()
        if (refusal := admission.client_error(error)) is not None:
            raise refusal  # the client's to fix (a prompt over the context): a 400
        if error.code == "cancelled":
            raise TurnError(ErrorCode.CANCELLED, "the turn was cancelled")
        raise TurnError(ErrorCode.WORKER_ERROR, f"the worker could not answer: {error.message}")

    async def _on_timeout(self, stall: streams.StreamTimeout) -> None:
        log.info("turn %s job %s: %s", self.turn_id, self.job_id, stall)
        await streams.request_cancel(self.d.redis, self.job_id)
        if stall.first_token and self._can_retry():
            await self._redispatch()
            return
        self.end_outcome = "failed"
        await self.release()
        where = "before answering" if stall.first_token else "in the middle of the reply"
        raise TurnError(
            ErrorCode.TIMEOUT, f"the worker stopped responding {where}; you were not charged"
        ) from None

    def _can_retry(self) -> bool:
        return self.attempt < self.d.max_attempts and not self._cancel_requested

    async def _redispatch(self) -> None:
        assert self.worker is not None
        await registry.release_slot(self.d.redis, self.worker.worker_id, self.job_id)
        self.d.workers.released(self.worker.worker_id)
        try:
            await self.dispatch()
        except TurnError:
            self.end_outcome = "failed"
            await self.release()
            raise

    async def cancel(self) -> None:
        """Ask the worker to stop; the turn ends with finish reason "cancelled", billed for the
        tokens generated so far."""
        self._cancel_requested = True
        await streams.request_cancel(self.d.redis, self.job_id)

    async def end_unread(self) -> None:
        """The client is gone before it read anything (its response could not even start),
        so no iteration of the events will end the turn: stop the job and give the whole
        hold back now, not when the sweeper comes by. Nothing reached the client, so nothing
        is charged (a turn whose events were read ends through them: billed for what was
        generated)."""
        self.end_outcome = "cancelled"
        try:
            await self.cancel()
        except redis.RedisError as error:  # the hold goes back all the same
            log.warning("turn %s: could not ask the worker to stop: %s", self.turn_id, error)
        finally:
            await self.release()

    async def _abandon(self) -> None:
        """The client stopped reading before the end: stop the job and settle, in a task of
        its own (the client's task may be being cancelled, and its Redis connection with it)."""
        if self._closed:
            return
        self._cancel_requested = True
        self.d.keep(self._drain_and_settle())

    async def _drain_and_settle(self) -> None:
        try:
            with contextlib.suppress(redis.RedisError):
                await streams.request_cancel(self.d.redis, self.job_id)
            async for event in self._job_events():
                if isinstance(event, FinalRecord):
                    await self._settle(event)
                    return
                if isinstance(event, ErrorRecord):
                    break
        except (streams.StreamTimeout, TurnError, redis.RedisError) as error:
            log.info("turn %s: abandoned job ended without a final: %s", self.turn_id, error)
        except asyncio.CancelledError:  # the process is stopping: give the hold back, now
            await self.release()
            raise
        except Exception as error:  # never leave the hold open
            log.error("turn %s: settling the abandoned job failed: %s", self.turn_id, error)
        await self.release()
