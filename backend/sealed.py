"""A sealed turn: the client sealed the request itself, so the backend routes ciphertext.

The client fetched the public attestation report, verified a worker itself, and sealed a wire
:class:`~workers.wire.JobRequest` (its messages and sampling, a reply key of its own, and a
job id ``<worker_id>_<32 hex>-1`` it chose) to that worker's attested X25519 key. The backend
sees the model, ``max_tokens``, the worker and job ids, and the ciphertext; never the text.

* **Hold**: the worst case of ``max_tokens`` and a prompt bounded by the ciphertext's length
  (:func:`backend.bounds.sealed_prompt_bound`: its JSON holds every message's text).
  ``max_tokens`` goes to the node in the clear with the job (:mod:`workers.jobs`), and the node
  generates at most the smaller of it and the client's sealed one: a client that seals more
  than it declared gets a reply cut at the declared bound, billed, not an honest worker's
  reply cut off unpaid.
* **Routing**: that worker only (a slot reserved on it, as for any turn); no retry elsewhere,
  since the request opens only there. Each job id is used once (:data:`USED_TTL_S`).
* **Relay**: each stream entry goes to the client as it is (sealed under the job's stream key,
  which only the client's reply key agrees with the worker: :mod:`workers.stream_crypto`),
  held to the turn's reply bounds on the ciphertext itself.
* **Settlement**: from the worker's receipt, which travels in the clear next to its last entry
  (:mod:`workers.receipts`): its signature by the attested key, the job id, the model and the
  ciphertext's digest are checked, and each count is billed at most its bound (the completion
  bounded by the ciphertext the worker delivered). A job that ends without a valid receipt (an
  error record, a worker that lies) is not billed: the whole hold goes back. A bound crossed
  is enforced, but flags no worker: the sealed request's limits are the client's to set.

The client checks the rest: the reply digest of the receipt against the text it opened, the
final record's signature, and the receipt against the report (:mod:`backend.client`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

import redis

from backend import bounds
from backend.bounds import Flag
from backend.dispatch import Dispatcher, Turn, TurnError, dispatched
from backend.errors import ErrorCode
from backend.pricing import worst_case_cost
from backend.receipts import open_receipt
from backend.turns import TurnDone, TurnRequest
from workers import registry, streams
from workers.jobs import aenqueue_job
from workers.logcontext import bind as bind_log_context
from workers.redis_keys import redis_key
from workers.wire import MAX_SEALED_BYTES, FinalRecord

__all__ = ["SealedEvent", "SealedRequest", "SealedTurn", "start_sealed_turn"]

log = logging.getLogger("cocoon.dispatch")

USED_JOB = "sealed-job"
USED_TTL_S = 7 * 86_400
"""A sealed job id is refused again for this long (the receipt names it: one job, one bill)."""

JOB_TURN = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class SealedRequest:
    user_id: int
    model: str
    worker_id: str
    job_id: str
    max_tokens: int
    sealed: bytes


@dataclass(frozen=True)
class SealedEvent:
    """One stream entry for the client, as the worker sealed it (``last``: the job's end)."""

    data: bytes
    last: bool


def job_problem(worker_id: str, job_id: str) -> str | None:
    """Why ``job_id`` is not a sealed job id of ``worker_id`` (None: it is)."""
    prefix, _, rest = job_id.partition("_")
    turn, _, attempt = rest.rpartition("-")
    if prefix != worker_id or attempt != "1" or not JOB_TURN.match(turn):
        return f"job_id must be {worker_id}_<32 lower-case hex>-1 (chosen by the client)"
    return None


async def start_sealed_turn(dispatcher: Dispatcher, request: SealedRequest) -> SealedTurn:
    """Validate, hold, enqueue on the chosen worker. TurnError with nothing held on failure."""
    settings = dispatcher.settings
    price = settings.price(request.model)
    if price is None:
        known = ", ".join(sorted(settings.models)) or "none"
        raise TurnError(ErrorCode.UNKNOWN_MODEL, f"unknown model {request.model!r}; known: {known}")
    if not 1 <= request.max_tokens <= price.context_length:
        raise TurnError(
            ErrorCode.INVALID_REQUEST,
            f"max_tokens must be 1..{price.context_length} for {request.model}",
        )
    problem = job_problem(request.worker_id, request.job_id)
    if problem is None and not 0 < len(request.sealed) <= MAX_SEALED_BYTES:
        problem = "sealed_request must be a non-empty sealed box"
    if problem is not None:
        raise TurnError(ErrorCode.INVALID_REQUEST, problem)
    prompt_bound = bounds.sealed_prompt_bound(len(request.sealed))
    worst = worst_case_cost(price, prompt_tokens=prompt_bound, max_tokens=request.max_tokens)
    used = redis_key(USED_JOB, request.job_id)
    if not await dispatcher.redis.set(used, b"1", nx=True, ex=USED_TTL_S):
        raise TurnError(ErrorCode.INVALID_REQUEST, "this job_id was used already: choose a new one")
    turn_id = uuid.uuid4().hex
    bind_log_context(turn_id=turn_id, job_id=request.job_id)
    await dispatcher.hold(request.user_id, worst, turn_id)
    return await dispatched(
        SealedTurn(dispatcher, request, turn_id, held=worst, prompt_bound=prompt_bound)
    )


class SealedTurn(Turn):
    """One sealed turn. Iterate :meth:`sealed_events` once (its entries, then one TurnDone)."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        request: SealedRequest,
        turn_id: str,
        *,
        held: int,
        prompt_bound: int,
    ) -> None:
        price = dispatcher.settings.price(request.model)
        assert price is not None
        turn = TurnRequest(user_id=request.user_id, model=request.model, messages=())
        super().__init__(dispatcher, turn, turn_id, price, request.max_tokens, held=held)
        self.sealed = request.sealed
        self.wanted = request.worker_id
        self.sealed_job_id = request.job_id
        self.prompt_bound = prompt_bound
        self.sealed_request_sha256 = hashlib.sha256(request.sealed).hexdigest()

    def _can_retry(self) -> bool:
        return False  # the request opens on its one worker only

    async def _flag(self, found: Sequence[Flag]) -> None:
        """Bounds hold on a sealed turn as on any other (billed at the bound, cut off), but no
        worker is flagged: the sealed request's own limits are the client's word, which the
        backend cannot read, so a client could make an honest worker cross them."""
        for flag in found:
            log.info(
                "sealed turn %s: %s %d over its bound %d (not flagged: the request is sealed)",
                self.turn_id,
                flag.kind.value,
                flag.claimed,
                flag.bound,
            )

    async def dispatch(self) -> None:
        d = self.d
        self.attempt = 1
        others = {w.worker_id for w in await d.workers.workers(self.request.model)}
        others.discard(self.wanted)
        worker = await registry.pick_worker(
            d.redis,
            self.request.model,
            exclude=others,
            job_id=self.sealed_job_id,
            slot_ttl_s=d.queue_ttl_s + d.job_timeout_s,
            attested_only=not d.settings.attestation.allow_dev,
            snapshot=d.workers,
        )
        if worker is None or worker.worker_id != self.wanted:
            raise TurnError(
                ErrorCode.NO_WORKER,
                f"worker {self.wanted} is not serving {self.request.model} with room now: seal "
                "to another worker of a fresh attestation report",
            )
        self.worker = worker
        self.job_id = self.sealed_job_id
        self.tried.append(worker.worker_id)
        await aenqueue_job(
            d.redis,
            worker.worker_id,
            self.job_id,
            self.sealed,
            timeout_s=d.job_timeout_s,
            ttl_s=d.queue_ttl_s,
            max_tokens=self.max_tokens,  # the node generates at most this, whatever is sealed
        )
        log.info("sealed turn %s job %s -> worker %s", self.turn_id, self.job_id, worker.worker_id)

    async def sealed_events(self) -> AsyncGenerator[SealedEvent | TurnDone, None]:
        """The job's entries as they come (sealed to the client), then one TurnDone. Raises
        TurnError on failure (nothing billed, or only the text delivered within bounds)."""
        finished = False
        try:
            reader = self._reader = self._new_reader()
            async for blob in reader.entries():
                if not reader.finished:
                    self._delivered_bytes += bounds.sealed_text_bound(len(blob))
                    self._count_first_token()
                    yield SealedEvent(bytes(blob), last=False)
                    continue
                yield SealedEvent(bytes(blob), last=True)
                done = await self._settle_from_receipt()
                finished = True
                yield done
                return
        except streams.StreamOverrun as overrun:
            finished = True
            await self._cut_off(self._stream_flag(overrun))
        except streams.StreamTimeout as stall:
            finished = True
            await self._give_up(stall)
        finally:
            if not finished:
                await self._abandon()

    async def _give_up(self, stall: streams.StreamTimeout) -> None:
        log.info("sealed turn %s job %s: %s", self.turn_id, self.job_id, stall)
        with contextlib.suppress(redis.RedisError):
            await streams.request_cancel(self.d.redis, self.job_id)
        self.end_outcome = "failed"
        await self.release()
        where = "before answering" if stall.first_token else "in the middle of the reply"
        raise TurnError(
            ErrorCode.TIMEOUT, f"the worker stopped responding {where}; you were not charged"
        )

    async def _settle_from_receipt(self) -> TurnDone:
        """Bill the usage of the worker's receipt, held to the turn's bounds; without a valid
        receipt nothing is billed."""
        assert self.worker is not None and self._reader is not None
        signed = open_receipt(self._reader.receipt, self.worker.verify_key, self.job_id)
        problem = None
        if signed is None:
            problem = "the job ended without a valid receipt (open its last event to see why)"
        elif signed.receipt.request_sha256 != self.sealed_request_sha256:
            problem = "the worker's receipt is for another request"
        elif signed.receipt.model != self.request.model:
            problem = "the worker's receipt names another model"
        if signed is None or problem is not None:
            self.end_outcome = "failed"
            await self.release()
            raise TurnError(ErrorCode.WORKER_ERROR, f"{problem}; you were not charged")
        receipt = signed.receipt
        final = FinalRecord(
            job_id=self.job_id,
            prompt_tokens=receipt.prompt_tokens,
            cached_prompt_tokens=min(receipt.cached_prompt_tokens, receipt.prompt_tokens),
            completion_tokens=receipt.completion_tokens,
            finish_reason=receipt.finish_reason,
        )
        return await self._settle(final)

    async def _drain_and_settle(self) -> None:
        """The client left: stop the job, and settle from its receipt when it comes."""
        try:
            with contextlib.suppress(redis.RedisError):
                await streams.request_cancel(self.d.redis, self.job_id)
            reader = self._reader
            if reader is not None:
                async for _blob in reader.entries():
                    if reader.finished:
                        await self._settle_from_receipt()
                        return
        except (streams.StreamTimeout, streams.StreamOverrun, TurnError, redis.RedisError) as error:
            log.info("sealed turn %s: abandoned job ended unsettled: %s", self.turn_id, error)
        except asyncio.CancelledError:
            await self.release()
            raise
        except Exception as error:  # never leave the hold open
            log.error("sealed turn %s: settling the abandoned job failed: %s", self.turn_id, error)
        await self.release()
