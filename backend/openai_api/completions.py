"""One chat completion answered over HTTP, as clients expect it answered:

* **Not streamed.** The reply is collected while the connection is watched: a client that goes
  away (its own timeout) cancels the turn, which is billed only for what was generated, as a
  stopped stream is. With an ``Idempotency-Key`` the turn runs to its end instead, and its
  result is kept for the client's retry (:mod:`backend.openai_api.idempotency`): billed once.
* **Streamed.** The status and headers are sent only once the first event is known: a turn that
  fails before its first token answers with its real status and an OpenAI-shaped body, not a
  200 followed by an error event.
* The cost of a non-streamed turn is in the ``X-Cocoon-Cost-Nanoton`` header and the body's
  ``cocoon`` object; a stream carries it in its usage chunk (``stream_options.include_usage``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from aiohttp import web

from backend.dispatch import Turn, TurnDone, TurnError, TurnEvent, TurnText
from backend.errors import CocoonError
from backend.openai_api import protocol as p
from backend.openai_api import tools
from backend.openai_api.idempotency import IdempotencyKey, Replay
from backend.openai_api.service import OpenAIService, Reply
from workers.wire import TokenLogprob

log = logging.getLogger("cocoon.openai_api")

COST_HEADER = "X-Cocoon-Cost-Nanoton"
REPLAYED_HEADER = "Idempotent-Replayed"
DISCONNECT_POLL_S = 0.25


def client_gone(request: web.Request) -> bool:
    """True once the client closed its connection."""
    transport = request.transport
    return transport is None or transport.is_closing()


def error_response(error: CocoonError) -> web.Response:
    return web.json_response(
        p.error_body(error), status=p.error_status(error), headers=p.error_headers(error)
    )


SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


class EventStream:
    """A turn answered as server-sent events: the prepared ``response``, and the turn's events
    from the first one on (iterate it; a TurnError raised by a later event ends it)."""

    def __init__(
        self, response: web.StreamResponse, first: TurnEvent, rest: AsyncIterator[TurnEvent]
    ) -> None:
        self.response = response
        self._first: TurnEvent | None = first
        self._rest = rest

    async def write(self, data: bytes) -> None:
        await self.response.write(data)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> TurnEvent:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await anext(self._rest)


@contextlib.asynccontextmanager
async def event_stream(
    request: web.Request, turn: Turn
) -> AsyncIterator[EventStream | web.Response]:
    """A stream's status goes out with its first event only: a turn that fails before it is
    answered with its real status (the web.Response given); otherwise the prepared
    :class:`EventStream`, whose ``[DONE]`` and end are written when the block ends without an
    exception. The turn's events are closed however it ends."""
    events: AsyncGenerator[TurnEvent, None] = turn.events()
    async with contextlib.aclosing(events):
        try:
            first = await anext(events)
        except TurnError as error:  # before anything was sent
            yield error_response(error)
            return
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        yield EventStream(response, first, events)
        await response.write(p.SSE_DONE)
        await response.write_eof()


async def collect_watching(
    request: web.Request,
    turn: Turn,
    *,
    cancel_on_disconnect: bool,
    calls: tools.CallReader | None = None,
) -> Reply:
    """The whole reply (its tool calls checked by ``calls``); the turn is cancelled (billed
    what was generated) if the client leaves and ``cancel_on_disconnect``."""
    task = asyncio.ensure_future(OpenAIService.collect(turn, calls))
    cancelled = False
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if cancel_on_disconnect and not cancelled and client_gone(request):
                cancelled = True
                await turn.cancel()
    finally:
        if not task.done():  # this handler is being cancelled (a stop): the turn is abandoned
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TurnError):
                await task


async def answer(
    request: web.Request,
    service: OpenAIService,
    body: p.ChatCompletionRequest,
    turn: Turn,
    idem: IdempotencyKey | None,
) -> web.StreamResponse:
    """The turn's answer, JSON or a stream; kept under ``idem`` when it ends with a reply."""
    completion_id = f"chatcmpl-{turn.turn_id}"
    created = int(time.time())
    if body.stream:
        return await _stream(request, service, body, turn, idem, completion_id, created)
    if idem is not None:
        outcome = await _kept(service, body, turn, idem, completion_id, created)
        if isinstance(outcome, CocoonError):
            return error_response(outcome)
        return web.json_response(outcome, headers={COST_HEADER: _cost(outcome)})
    calls = _reader(body)
    try:
        text, done, logprobs = await collect_watching(
            request, turn, cancel_on_disconnect=True, calls=calls
        )
        called = calls.finish() if calls is not None else None
    except TurnError as error:
        return error_response(error)
    record = await service.attestation(done)
    completion = p.ChatCompletion.of(
        completion_id, created, body.model, text, done, record, called, logprobs
    )
    return web.json_response(completion.model_dump(), headers={COST_HEADER: str(done.cost)})


def _reader(body: p.ChatCompletionRequest) -> tools.CallReader | None:
    """What checks the reply's tool calls (None when the request offers none)."""
    return tools.CallReader() if tools.offered(body) else None


def _cost(completion: dict[str, Any]) -> str:
    return str(completion.get("cocoon", {}).get("cost_nanoton", ""))


async def _kept(
    service: OpenAIService,
    body: p.ChatCompletionRequest,
    turn: Turn,
    idem: IdempotencyKey,
    completion_id: str,
    created: int,
) -> dict[str, Any] | CocoonError:
    """A turn whose result is kept for its key's retries: it runs in a task of the dispatcher's
    own, to its end even if this request's client leaves (or its handler is cancelled)."""
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[dict[str, Any] | CocoonError] = loop.create_future()

    async def run() -> None:
        calls = _reader(body)
        try:
            text, done, logprobs = await OpenAIService.collect(turn, calls)
            called = calls.finish() if calls is not None else None
        except TurnError as error:
            await idem.abandon()
            outcome.set_result(error)
            return
        except BaseException:  # a stop: the turn is given back, so is the key
            with contextlib.suppress(Exception):
                await idem.abandon()
            outcome.cancel()
            raise
        record = await service.attestation(done)
        completion = p.ChatCompletion.of(
            completion_id, created, body.model, text, done, record, called, logprobs
        )
        payload = completion.model_dump()
        try:
            await idem.finish(200, payload)
        except Exception as error:  # Redis went away: answer this request, keep nothing
            log.warning("turn %s: its result was not kept: %s", turn.turn_id, error)
        outcome.set_result(payload)

    service.dispatcher.keep(run())
    return await asyncio.shield(outcome)


async def _stream(
    request: web.Request,
    service: OpenAIService,
    body: p.ChatCompletionRequest,
    turn: Turn,
    idem: IdempotencyKey | None,
    completion_id: str,
    created: int,
) -> web.StreamResponse:
    chunks = p.ChunkStream(completion_id, created, body.model)
    async with event_stream(request, turn) as stream:
        if isinstance(stream, web.Response):
            if idem is not None:
                await idem.abandon()
            return stream
        await stream.write(chunks.start())
        parts: list[str] = []
        logprobs: list[TokenLogprob] | None = [] if body.logprobs else None
        done: TurnDone | None = None
        calls = _reader(body)
        try:
            async for event in stream:
                if isinstance(event, TurnText):
                    parts.append(event.text)
                    if logprobs is not None:
                        logprobs += event.logprobs
                    if event.text or event.logprobs or not event.tool_calls:
                        tokens = list(event.logprobs) if logprobs is not None else None
                        await stream.write(chunks.text(event.text, tokens))
                    if event.tool_calls and calls is not None:  # as soon as the worker read them
                        pieces = [calls.read(piece) for piece in event.tool_calls]
                        await stream.write(chunks.tool_calls(pieces))
                else:
                    done = event
                    text = "".join(parts)
                    called = calls.finish() if calls is not None else None
                    if called:
                        await stream.write(chunks.called())
                    else:
                        await stream.write(chunks.finish(event))
                    record = await service.attestation(event)
                    if body.include_usage:
                        await stream.write(chunks.usage(event, record))
                    else:  # the receipt, as the stream's trailing event (issue 13)
                        await stream.write(chunks.receipt(event))
                    if idem is not None:
                        completion = p.ChatCompletion.of(
                            completion_id,
                            created,
                            body.model,
                            text,
                            event,
                            record,
                            called,
                            logprobs,
                        )
                        await idem.finish(200, completion.model_dump())
        except TurnError as error:
            await stream.write(p.sse(p.error_body(error, with_param=False)))
        finally:
            if done is None and idem is not None:
                with contextlib.suppress(Exception):
                    await idem.abandon()
        return stream.response


async def replay(
    request: web.Request, body: p.ChatCompletionRequest, kept: Replay
) -> web.StreamResponse:
    """The kept result of an ``Idempotency-Key``'s first request, as JSON or as a stream."""
    headers = {REPLAYED_HEADER: "true"}
    cost = kept.body.get("cocoon", {}).get("cost_nanoton")
    if isinstance(cost, str):
        headers[COST_HEADER] = cost
    if not body.stream or kept.status != 200:
        return web.json_response(kept.body, status=kept.status, headers=headers)
    response = web.StreamResponse(headers={**SSE_HEADERS, **headers})
    await response.prepare(request)
    for event in _replayed_events(kept.body, include_usage=body.include_usage):
        await response.write(p.sse(event))
    await response.write(p.SSE_DONE)
    await response.write_eof()
    return response


def _replayed_events(completion: dict[str, Any], *, include_usage: bool) -> list[dict[str, Any]]:
    head = {
        "id": completion["id"],
        "object": "chat.completion.chunk",
        "created": completion["created"],
        "model": completion["model"],
    }
    [choice] = completion["choices"]

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    events = [chunk({"role": "assistant", "content": ""})]
    calls = choice["message"].get("tool_calls")
    if calls:
        events.append(chunk({"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}))
    else:
        content = chunk({"content": choice["message"]["content"]})
        content["choices"][0]["logprobs"] = choice.get("logprobs")
        events.append(content)
    events.append(chunk({}, choice["finish_reason"]))
    if include_usage:
        events.append(
            {**head, "choices": [], "usage": completion["usage"], "cocoon": completion["cocoon"]}
        )
    return events
