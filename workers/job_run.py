"""One chat job on the worker node: from the sealed request to the job's last stream entry.

A :class:`JobRun` opens the request with the node's key, checks the model, runs the engine and
streams the reply as sealed events to ``cocoon:stream:<job_id>``:

* each text delta becomes part of a sealed :class:`~workers.wire.StreamChunk` (``seq`` 0, 1, ...),
  sealed under the job's stream key (:mod:`workers.stream_crypto`: one key exchange per job, an
  AEAD per entry). The engine never waits for Redis: deltas that arrive while a chunk is being
  written are merged into the next one, and a chunk after the first waits until ``coalesce_s``
  has passed since the one before (``--stream-coalesce-ms``), so a fast engine's tokens travel a
  few to an entry. The first chunk and the last are never delayed, and nothing is reordered;
* the end is one signed :class:`~workers.wire.FinalRecord` (token usage), or an
  :class:`~workers.wire.ErrorRecord` (``wrong_model``, ``engine_error``, ...).

Stopping (:meth:`JobRun.stop`). A user's cancel ends the stream with a FinalRecord
``finish_reason="cancelled"`` that counts the tokens generated so far (they are billed). When
the node itself stops a job (``"shutdown"``, or ``"timeout"``: the RQ job timeout), the rule is:
before the first token, an ErrorRecord (``worker_shutdown`` / ``job_timeout``): nothing was
delivered and the dispatcher may retry elsewhere; after it, a FinalRecord ``"cancelled"``. An
engine that does not end with its usage within :data:`STOP_GRACE_S` is cancelled, and the node
counts the usage itself: the text deltas it streamed, and (when there were any) the prompt, with
the engine's own tokenizer (``Engine.count_prompt_tokens``).

The reply is at most the smaller of the sealed request's ``max_tokens`` and the backend's
bound the job carries in the clear (:func:`workers.jobs.outer_max_tokens`): a sealed client
chooses its own, and the backend holds and pays for its bound only, so a node that generated
past it would be cut off unpaid.

A request that cannot be opened gets no reply at all: without it there is no reply key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
import time
import traceback
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from redis.asyncio import Redis as AsyncRedis
from rq import Queue
from rq.executions import Execution
from rq.job import Job

from workers import streams
from workers.engines import Engine, EngineError, GenerationRequest, TextDelta, Usage
from workers.engines.base import ContextLengthExceeded, RequestRefused
from workers.jobs import outer_max_tokens, sealed_argument
from workers.logprobs import to_wire
from workers.receipts import Receipt, sign_receipt
from workers.stream_crypto import StreamSealer
from workers.wire import (
    CONTEXT_LENGTH_EXCEEDED,
    INVALID_REQUEST,
    MAX_LOGPROBS_PER_CHUNK,
    ErrorRecord,
    Event,
    FinalRecord,
    JobRequest,
    StreamChunk,
    TokenLogprob,
    WireError,
    WorkerKeys,
    open_request,
)
from workers.wire_tools import MAX_TOOLS, ToolCallDelta

__all__ = ["JobRun", "Outcome", "describe_error"]

log = logging.getLogger(__name__)

MAX_CHUNK_CHARS = streams.MAX_CHUNK_CHARS
"""Merged deltas are split into chunks of at most this many characters."""

STREAM_TTL_REFRESH_S = 60.0

STOP_GRACE_S = 2.0
"""How long an engine asked to stop may take to end with its usage before it is cancelled."""
"""A busy stream's TTL is refreshed at its first entry, its last, and once a minute between."""


@dataclass(frozen=True)
class Outcome:
    """How a job ended, for RQ and the logs (never any text of the conversation)."""

    ok: bool
    detail: str  # the finish reason when ok, else the failure reason RQ records
    usage: Usage | None = None


class JobRun:
    """One job taken by the node. ``await run()`` once; ``stop()`` at any time."""

    def __init__(
        self,
        job: Job,
        *,
        engine: Engine,
        keys: WorkerKeys,
        redis: AsyncRedis,
        coalesce_s: float = 0.0,
    ) -> None:
        self.job = job
        self.coalesce_s = coalesce_s
        self.engine = engine
        self.keys = keys
        self.redis = redis
        self.started = time.monotonic()
        self.execution: Execution | None = None  # kept by the node for its heartbeats
        self.deltas = 0  # text pieces from the engine (its tokens, near enough)
        self.chunks = 0  # sealed chunks written
        self.stop_reason: str | None = None  # "cancel", "shutdown" or "timeout"
        self._unsent: list[str] = []
        self._unsent_logprobs: list[TokenLogprob] = []  # with sampling.logprobs only
        self._unsent_calls: list[ToolCallDelta] = []  # with tools only
        # Asks the engine to end between two tokens and report its real usage; the task is
        # cancelled outright only if the engine has not stopped STOP_GRACE_S later.
        self._stop_signal = threading.Event()
        self._generation: asyncio.Task[Usage] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._ttl_set_at = -STREAM_TTL_REFRESH_S
        self._sealer: StreamSealer | None = None  # the job's stream key, at its first entry
        self._written_at = 0.0  # when the last chunk was written (monotonic)
        self._generated = asyncio.Event()  # the engine is done: write what is left at once
        # The receipt's digests (workers.receipts): the sealed request as enqueued, and the
        # reply's text as streamed.
        self._request_sha256 = ""
        self._reply_sha256 = hashlib.sha256()
        self._outer_max_tokens: int | None = None  # the backend's bound (the job's meta)

    @property
    def job_id(self) -> str:
        return self.job.id

    def stop(self, reason: str) -> bool:
        """Stop generating at once; the stream still gets its last record. True if news."""
        first = self.stop_reason is None
        if first:
            self.stop_reason = reason
        self._stop_signal.set()
        generation = self._generation
        if generation is not None and not generation.done():
            try:
                asyncio.get_running_loop().call_later(STOP_GRACE_S, generation.cancel)
            except RuntimeError:  # no running loop: stop it now
                generation.cancel()
        return first

    async def run(self) -> Outcome:
        request = self.open()
        if isinstance(request, Outcome):
            return request
        if request.model != self.engine.model:
            message = f"this worker serves {self.engine.model!r}, not {request.model!r}"
            await self._send(
                request, ErrorRecord(job_id=self.job_id, code="wrong_model", message=message)
            )
            return Outcome(False, "wrong model")
        if await streams.is_cancel_requested(self.redis, self.job_id):
            self.stop("cancel")
        if self.stop_reason is None:
            self._generation = asyncio.create_task(self._generate(request))
            done, _ = await asyncio.wait({self._generation}, timeout=self._time_left())
            if not done:
                self.stop("timeout")
                await asyncio.wait({self._generation})
        self._generated.set()  # a writer waiting to coalesce writes at once
        if self._writer is not None:
            await self._writer  # a Redis error here fails the job
        await self._write_unsent(request)
        return await self._conclude(request)

    async def reject(self, code: str, message: str) -> None:
        """Answer a job that will not run with an ErrorRecord (if it can be opened at all)."""
        request = self.open()
        if isinstance(request, JobRequest):
            await self._send(request, ErrorRecord(job_id=self.job_id, code=code, message=message))

    def open(self) -> JobRequest | Outcome:
        try:
            sealed = sealed_argument(self.job)
            self._outer_max_tokens = outer_max_tokens(self.job)
            self._request_sha256 = hashlib.sha256(sealed).hexdigest()
            request = open_request(sealed, self.keys)
        except (ValueError, WireError) as error:  # neither quotes the payload
            return Outcome(False, f"cannot open the request: {error}")
        except Exception as error:  # job data RQ could not deserialize
            return Outcome(False, f"cannot read the job: {type(error).__name__}")
        if request.job_id != self.job_id:
            return Outcome(False, "the sealed request belongs to another job id")
        return request

    # -- internals -------------------------------------------------------------------------------

    async def _generate(self, request: JobRequest) -> Usage:
        sampling = request.sampling
        if not self.engine.reads_images and any(m.images for m in request.messages):
            raise RequestRefused(f"this worker's {self.engine.name} engine does not read images")
        tools = request.tools
        if tools is not None and not self.engine.calls_tools:
            raise RequestRefused(f"this worker's {self.engine.name} engine does not call tools")
        generation = self.engine.generate(
            GenerationRequest(
                messages=[message.model_dump() for message in request.messages],
                max_tokens=min(request.max_tokens, self._outer_max_tokens or request.max_tokens),
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                stop=tuple(sampling.stop),
                seed=sampling.seed,
                presence_penalty=sampling.presence_penalty,
                frequency_penalty=sampling.frequency_penalty,
                json_mode=sampling.response_format.type if sampling.response_format else None,
                json_schema=(
                    sampling.response_format.json_schema if sampling.response_format else None
                ),
                logit_bias=tuple((int(t), b) for t, b in sampling.logit_bias.items()),
                continue_final=sampling.continue_final_message,
                logprobs=sampling.top_logprobs if sampling.logprobs else None,
                chat_template=sampling.chat_template,
                tools=tuple(f.model_dump() for f in tools.functions) if tools else (),
                tool_choice=tools.choice if tools else "auto",
                tool_name=tools.name if tools else None,
                parallel_tool_calls=tools.parallel if tools else True,
                stop_signal=self._stop_signal,
            )
        )
        usage: Usage | None = None
        try:
            async for item in generation:
                if isinstance(item, Usage):
                    usage = item
                elif isinstance(item, TextDelta) and (
                    item.text or item.logprobs or item.tool_calls
                ):
                    self.deltas += 1
                    self._unsent.append(item.text)
                    self._unsent_calls += (
                        ToolCallDelta(index=c.index, name=c.name, arguments=c.arguments)
                        for c in item.tool_calls
                    )
                    if sampling.logprobs:
                        self._unsent_logprobs += to_wire(item.logprobs, sampling.top_logprobs)
                    self._ensure_writer(request)
        finally:
            aclose = getattr(generation, "aclose", None)
            if aclose is not None:
                await aclose()
        if usage is None:
            raise EngineError("the engine ended without reporting token usage")
        return usage

    def _ensure_writer(self, request: JobRequest) -> None:
        """Write the unsent text unless a write is under way (its own task: a stop never
        cuts a write in half)."""
        writer = self._writer
        if writer is not None and writer.done() and (failed := writer.exception()) is not None:
            raise failed
        if writer is None or writer.done():
            self._writer = asyncio.create_task(self._write_unsent(request))

    async def _write_unsent(self, request: JobRequest) -> None:
        while self._unsent or self._unsent_logprobs or self._unsent_calls:
            wait = self._written_at + self.coalesce_s - time.monotonic()
            if self.chunks and wait > 0 and not self._generated.is_set():
                # The tokens that come meanwhile join this chunk; the end of the generation
                # cuts the wait short.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._generated.wait(), wait)
            text = "".join(self._unsent)
            self._unsent.clear()
            if len(text) > MAX_CHUNK_CHARS:
                self._unsent.append(text[MAX_CHUNK_CHARS:])
                text = text[:MAX_CHUNK_CHARS]
            logprobs = None
            if request.sampling.logprobs:
                logprobs = self._unsent_logprobs[:MAX_LOGPROBS_PER_CHUNK]
                del self._unsent_logprobs[:MAX_LOGPROBS_PER_CHUNK]
            calls = self._unsent_calls[:MAX_TOOLS] or None
            del self._unsent_calls[:MAX_TOOLS]
            chunk = StreamChunk(
                job_id=self.job_id, seq=self.chunks, text=text, logprobs=logprobs, tool_calls=calls
            )
            self._reply_sha256.update(chunk.reply_text().encode("utf-8", "surrogatepass"))
            self.chunks += 1
            await self._send(request, chunk)
            self._written_at = time.monotonic()

    async def _conclude(self, request: JobRequest) -> Outcome:
        task = self._generation
        reason = self.stop_reason
        if reason not in (None, "cancel") and self.deltas == 0:
            # Stopped before the first token: hand the job back, so it is retried elsewhere.
            code = "worker_shutdown" if reason == "shutdown" else "job_timeout"
            what = "the worker is shutting down" if reason == "shutdown" else "the job timed out"
            await self._send(request, ErrorRecord(job_id=self.job_id, code=code, message=what))
            return Outcome(False, f"{code}: stopped before the first token")
        if task is not None and not task.cancelled() and task.exception() is None:
            usage = task.result()
            await self._send(request, _final(self.job_id, usage))
            if reason in (None, "cancel"):
                return Outcome(True, usage.finish_reason, usage)
            return Outcome(False, f"{reason}: stopped after {usage.completion_tokens} tokens")
        if reason is None:  # the engine failed
            assert task is not None
            error = task.exception()
            message = str(error) if isinstance(error, EngineError) else "the engine failed"
            code = (
                CONTEXT_LENGTH_EXCEEDED
                if isinstance(error, ContextLengthExceeded)
                else INVALID_REQUEST
                if isinstance(error, RequestRefused)
                else "engine_error"
            )
            record = ErrorRecord(job_id=self.job_id, code=code, message=message[:4096])
            await self._send(request, record)
            return Outcome(False, f"engine error ({describe_error(error)})")
        # The engine did not stop in time and was cancelled: it gave no usage, so count what it
        # produced (never more than was used): its text deltas, and the prompt it read to
        # produce them, counted with the engine's own tokenizer.
        prompt = await self._count_prompt(request) if self.deltas else 0
        usage = Usage(prompt, 0, self.deltas, "cancelled")
        await self._send(request, _final(self.job_id, usage))
        if reason == "cancel":
            return Outcome(True, "cancelled", usage)
        return Outcome(False, f"{reason}: stopped after {self.deltas} tokens")

    async def _count_prompt(self, request: JobRequest) -> int:
        """The prompt's tokens as the engine counts them; 0 when it cannot tell."""
        messages = [message.model_dump() for message in request.messages]
        try:
            count = await asyncio.to_thread(
                partial(
                    self.engine.count_prompt_tokens, chat_template=request.sampling.chat_template
                ),
                messages,
            )
        except Exception as error:  # the engine's trouble: bill no prompt rather than fail
            log.warning("job %s: cannot count the prompt: %s", self.job_id, describe_error(error))
            return 0
        return max(0, count or 0)

    async def _send(self, request: JobRequest, event: Event) -> None:
        if self._sealer is None:
            self._sealer = StreamSealer(self.job_id, request.reply_key, self.keys)
        sealed = self._sealer.seal(event)
        last = not isinstance(event, StreamChunk)
        receipt = self._receipt(request, event) if isinstance(event, FinalRecord) else None
        ttl_s: int | None = streams.STREAM_TTL_S
        if not last and time.monotonic() - self._ttl_set_at < STREAM_TTL_REFRESH_S:
            ttl_s = None  # set moments ago: one command per chunk, not two
        elif not last:
            self._ttl_set_at = time.monotonic()
        await streams.append(
            self.redis, self.job_id, sealed, last=last, ttl_s=ttl_s, receipt=receipt
        )

    def _receipt(self, request: JobRequest, final: FinalRecord) -> bytes:
        """The signed receipt of the job (workers.receipts): digests and counts, no text."""
        receipt = Receipt(
            job_id=self.job_id,
            model=request.model,
            request_sha256=self._request_sha256,
            reply_sha256=self._reply_sha256.hexdigest(),
            prompt_tokens=final.prompt_tokens,
            cached_prompt_tokens=final.cached_prompt_tokens,
            completion_tokens=final.completion_tokens,
            finish_reason=final.finish_reason,
        )
        return sign_receipt(receipt, self.keys.signing_key).model_dump_json().encode()

    def _time_left(self) -> float | None:
        """Seconds left of the RQ job timeout (None: no limit, RQ's ``-1``)."""
        timeout = self.job.timeout
        if timeout is None:
            timeout = Queue.DEFAULT_TIMEOUT
        if timeout < 0:
            return None
        return max(0.001, timeout - (time.monotonic() - self.started))


def _final(job_id: str, usage: Usage) -> FinalRecord:
    return FinalRecord(
        job_id=job_id,
        prompt_tokens=usage.prompt_tokens,
        cached_prompt_tokens=min(usage.cached_prompt_tokens, usage.prompt_tokens),
        completion_tokens=usage.completion_tokens,
        finish_reason=usage.finish_reason,
    )


def describe_error(failure: BaseException | asyncio.Task[Any] | None) -> str:
    """An exception's type and where it was raised, without its message.

    Messages may quote data (pydantic puts the rejected input in its errors), and logs and RQ
    must never hold prompt or reply text.
    """
    if isinstance(failure, asyncio.Task):
        if failure.cancelled():
            return "cancelled"
        failure = failure.exception()
    if failure is None:
        return "no error"
    frames = traceback.extract_tb(failure.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{type(failure).__name__}{where}"
