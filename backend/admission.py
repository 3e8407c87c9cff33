"""What a turn must pass to run, apart from money: a prompt that fits the model's context, and a
free slot on a worker of its model, waited for rather than failed.

* **Context.** Decided before anything is held or dispatched when the backend can tell on its
  own: a prompt whose fewest possible tokens (:func:`prompt_token_floor`: UTF-8 bytes over the
  longest token's :data:`~backend.bounds.BYTES_PER_TOKEN_MAX`) already fill the context. Closer
  calls are the worker's, which counts with the model's tokenizer before generating and answers
  ``context_length_exceeded`` (:func:`client_error`): the same 400 for API clients (a stream's
  status is sent only with its first event), nothing billed, never retried elsewhere.
* **Queue.** When every worker of the model is busy (its advertised capacity, the parallelism
  its engine really has, is reserved), the turn waits for a slot up to
  ``COCOON_API_QUEUE_TIMEOUT_S``, before its job exists: the wait never counts against the
  job's first-token timeout. Then a 503 ``no_worker`` with ``retry_after``.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from typing import Protocol

from redis.asyncio import Redis as AsyncRedis

from backend.bounds import BYTES_PER_TOKEN_MAX
from backend.errors import ErrorCode
from backend.settings import ModelPrice, Settings
from backend.turns import TurnError, TurnRequest
from workers import registry
from workers.jobs import job_id_for
from workers.wire import CONTEXT_LENGTH_EXCEEDED, INVALID_REQUEST, ChatMessage, ErrorRecord


class Queue(Protocol):
    """What the queue needs of the dispatcher (:class:`backend.dispatch.Dispatcher`)."""

    settings: Settings
    redis: AsyncRedis
    workers: registry.WorkerSnapshot
    clock: Callable[[], float]
    queue_ttl_s: int
    job_timeout_s: int


QUEUE_POLL_S = 0.25
"""How often a waiting turn looks for a free slot (with jitter)."""

QUEUE_RETRY_AFTER_S = 5
"""The ``Retry-After`` of a turn that waited the whole queue timeout."""


def prompt_token_floor(messages: Sequence[ChatMessage]) -> int:
    """The fewest tokens ``messages`` can be, whatever the tokenizer."""
    size = sum(len(m.content.encode("utf-8", "surrogatepass")) for m in messages)
    return -(-size // BYTES_PER_TOKEN_MAX)


CONTEXT_EXCEEDED_LEAD = "This model's maximum context length is exceeded: "
"""How the message of a ``context_length_exceeded`` refusal starts: in OpenAI's words, which
clients that read the message rather than the code (litellm's ``ContextWindowExceededError``,
and its context-window fallbacks) recognise."""


def context_exceeded(message: str) -> TurnError:
    return TurnError(
        ErrorCode.INVALID_REQUEST,
        CONTEXT_EXCEEDED_LEAD + message,
        param="messages",
        openai_code=CONTEXT_LENGTH_EXCEEDED,
        status=400,
    )


def check_context(model: str, messages: Sequence[ChatMessage], price: ModelPrice) -> None:
    """TurnError (``context_length_exceeded``) for a prompt that cannot fit the context."""
    floor = prompt_token_floor(messages)
    if floor >= price.context_length:
        raise context_exceeded(
            f"the prompt is at least {floor} tokens but {model}'s context holds "
            f"{price.context_length} tokens for prompt and reply together; shorten it"
        )


def client_error(error: ErrorRecord) -> TurnError | None:
    """A worker's refusal that is the client's to fix, as the client's error (None if not)."""
    if error.code == CONTEXT_LENGTH_EXCEEDED:
        return context_exceeded(error.message)
    if error.code == INVALID_REQUEST:  # e.g. a JSON schema the engine cannot compile
        return TurnError(ErrorCode.INVALID_REQUEST, error.message, status=400)
    return None


async def wait_for_room(
    d: Queue, request: TurnRequest, turn_id: str, attempt: int
) -> registry.WorkerInfo | None:
    """Every worker of the turn's model is busy: a slot on one, waited for up to the queue
    timeout; None when no worker serves the model at all; TurnError (503, ``retry_after``) when
    the wait ran out."""
    model = request.model
    attested_only = not d.settings.attestation.allow_dev
    deadline = d.clock() + d.settings.api_queue_timeout_s
    while any(w.attested or not attested_only for w in await d.workers.workers(model)):
        if d.clock() >= deadline:
            raise TurnError(
                ErrorCode.NO_WORKER,
                f"every worker serving {model} is busy; try again in a few seconds",
                retry_after=QUEUE_RETRY_AFTER_S,
            )
        await asyncio.sleep(QUEUE_POLL_S * random.uniform(0.5, 1.5))
        worker = await registry.pick_worker(
            d.redis,
            model,
            conversation_id=request.conversation_id,
            job_id=lambda worker_id: job_id_for(worker_id, turn_id, attempt),
            slot_ttl_s=d.queue_ttl_s + d.job_timeout_s,
            attested_only=attested_only,
            snapshot=d.workers,
        )
        if worker is not None:
            return worker
    return None
