"""What the engine tests (tests/test_engines.py for llama.cpp and the openai engine,
tests/test_vllm.py for vLLM, tests/test_engines_tools.py and tests/test_engines_openai_tools.py
for tools) share: a one-message chat request, a stream read to its end with its shape checked
(text deltas, then one Usage, last), the checks every engine passes, the tool the tool tests
offer, and an OpenAI-compatible upstream served on loopback for the openai engine."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from workers.engines import Engine, GenerationRequest, TextDelta, Usage
from workers.engines.base import ToolCallDelta

__all__ = [
    "WEATHER",
    "assert_ends_its_turn",
    "assert_stop_string_cuts",
    "chat",
    "collect",
    "end_stream",
    "on_loopback",
    "openai_upstream",
    "stream",
    "whole_calls",
]

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city now.",
    "parameters": json.dumps(
        {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
         "required": ["city"], "additionalProperties": False}
    ),
}  # fmt: skip
"""A tool as the wire carries it (its parameters a JSON schema in a string)."""


def chat(text: str, **kwargs: Any) -> GenerationRequest:
    """One user message; 8 tokens at most and greedy unless ``kwargs`` say otherwise."""
    kwargs.setdefault("max_tokens", 8)
    kwargs.setdefault("temperature", 0.0)
    return GenerationRequest(messages=[{"role": "user", "content": text}], **kwargs)


async def stream(engine: Engine, request: GenerationRequest) -> tuple[list[TextDelta], Usage]:
    """Run a request to the end; check the stream's shape (deltas, then one Usage, last)."""
    items = [item async for item in engine.generate(request)]
    assert items, "the stream was empty"
    usage = items[-1]
    assert isinstance(usage, Usage), f"the last item is {usage!r}, not a Usage"
    deltas = items[:-1]
    assert all(isinstance(item, TextDelta) and item.text for item in deltas), deltas
    return deltas, usage  # type: ignore[return-value]


async def collect(engine: Engine, request: GenerationRequest) -> tuple[str, Usage]:
    """:func:`stream`'s text and usage."""
    deltas, usage = await stream(engine, request)
    return "".join(delta.text for delta in deltas), usage


async def assert_ends_its_turn(engine: Engine) -> None:
    """Asked to say hello, with room for much more, the model ends its turn by itself (and the
    chat template's end marker is not in the text)."""
    text, usage = await collect(engine, chat("Say hello.", max_tokens=200))
    assert text.strip()
    assert usage.finish_reason == "stop"
    assert 0 < usage.completion_tokens < 200
    assert "<|im_end|>" not in text


async def assert_stop_string_cuts(engine: Engine, max_tokens: int) -> None:
    """A stop string (the reply's third word) cuts the greedy reply just before it."""
    question = "List three fruits, one per line."
    full, _ = await collect(engine, chat(question, max_tokens=max_tokens))
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    cut, usage = await collect(engine, chat(question, max_tokens=max_tokens, stop=(stop,)))
    assert cut == full[: full.index(stop)]
    assert usage.finish_reason == "stop"


def whole_calls(pieces: Sequence[ToolCallDelta]) -> list[tuple[str, Any]]:
    """The calls streamed in ``pieces`` (each call's name first, then fragments of its
    arguments), whole: (name, arguments parsed), in the order of their index."""
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    for piece in pieces:
        if piece.name is not None:
            names[piece.index] = piece.name
        arguments[piece.index] = arguments.get(piece.index, "") + piece.arguments
    return [(names[i], json.loads(arguments[i])) for i in sorted(names)]


def openai_upstream(
    served_model: str, completions: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.Application:
    """An OpenAI-compatible upstream: ``/v1/models`` lists ``served_model``, and
    ``/v1/chat/completions`` is answered by ``completions``."""

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": served_model}]})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", completions)
    return app


async def end_stream(response: web.StreamResponse) -> web.StreamResponse:
    """Close an OpenAI server-sent stream as OpenAI does: ``data: [DONE]``, then the body's end."""
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


@asynccontextmanager
async def on_loopback(app: web.Application) -> AsyncIterator[str]:
    """``app`` served on a free loopback port for as long as the block runs; its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
