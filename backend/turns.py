"""What a chat turn is to its clients: the request, the events of its reply, how it ends, why it
fails, and what the dispatcher counts (:mod:`backend.dispatch` runs the turn)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from backend.errors import CocoonError
from backend.receipts import ReceiptRecord
from workers.wire import ChatMessage, SamplingParams, StreamChunk, TokenLogprob
from workers.wire_tools import ToolCallDelta, Tools


class TurnCounter(Protocol):
    """What the dispatcher counts: :class:`backend.metrics.TurnMetrics` on the process's
    Prometheus registry (declared here, so the dispatcher imports nothing of the metrics)."""

    def first_token_after(self, model: str, seconds: float) -> None: ...

    def ended(
        self,
        model: str,
        outcome: str,
        seconds: float,
        *,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        charged: int = 0,
    ) -> None: ...

    def error(self, code: str) -> None: ...

    def flagged(self, model: str, kind: str) -> None: ...


class TurnError(CocoonError):
    """Why a turn could not run or finish. ``code`` is stable for clients; ``str()`` is readable.

    Codes: ``invalid_request``, ``unknown_model``, ``insufficient_balance``,
    ``no_worker``, ``timeout``, ``cancelled``, ``worker_error``, ``worker_misbehaved``.
    """


@dataclass(frozen=True)
class TurnRequest:
    user_id: int
    model: str
    messages: Sequence[ChatMessage]
    max_tokens: int | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    conversation_id: str | None = None
    tools: Tools | None = None  # the functions the model may call (OpenAI API tools)


@dataclass(frozen=True)
class TurnText:
    text: str
    # The log probabilities of this text's tokens, when the request asked for them
    # (SamplingParams.logprobs): what the worker sent, cut to the alternatives asked for.
    logprobs: tuple[TokenLogprob, ...] = ()
    # Pieces of the reply's tool calls, as the worker sent them (the OpenAI API checks them
    # against the offered tools: backend.openai_api.tools).
    tool_calls: tuple[ToolCallDelta, ...] = ()

    @classmethod
    def of(cls, chunk: StreamChunk, sampling: SamplingParams) -> TurnText:
        calls = tuple(chunk.tool_calls or ())
        if not sampling.logprobs or not chunk.logprobs:
            return cls(chunk.text, tool_calls=calls)
        top = sampling.top_logprobs
        return cls(
            chunk.text,
            tuple(
                t
                if len(t.top_logprobs) <= top
                else t.model_copy(update={"top_logprobs": t.top_logprobs[:top]})
                for t in chunk.logprobs
            ),
            calls,
        )


@dataclass(frozen=True)
class WorkerProof:
    """What the client can show about who served the turn (the bot's /privacy report).

    A turn ends with a :class:`TurnDone` only from a final record whose signature by this
    worker's registered key verified (:class:`workers.stream_crypto.StreamOpener`; any other
    signature ends the turn with ``worker_error``): the usage billed is always the worker's
    signed usage."""

    worker_id: str
    tee: str
    engine: str
    engine_version: str
    key_fingerprint: str
    # The turn's receipt id when the worker's receipt verified with its attested key and was
    # kept (backend.receipts; GET /v1/receipts/{id}): what "verified" is shown from.
    receipt_id: str | None = None


@dataclass(frozen=True)
class TurnDone:
    turn_id: str
    model: str
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    cost: int  # nanoTON charged
    worker: WorkerProof
    # The worker's signed receipt (backend.receipts), when it sent one that verified.
    receipt: ReceiptRecord | None = None


TurnEvent = TurnText | TurnDone
