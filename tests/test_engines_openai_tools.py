"""The openai engine passes tools to its upstream natively and reads the upstream's streamed
``tool_calls`` back into the wire's call pieces, bounded and checked.

The upstream is a real aiohttp server on loopback speaking OpenAI's streamed chat completions
(every chunk validated against the openai SDK's ``ChatCompletionChunk``): backed by the real
llama-cpp engine on the small model with the shipped Hermes template (it takes OpenAI's
``tools``, ``tool_choice``, ``parallel_tool_calls`` and tool conversation, and streams each call
as OpenAI does: id, type and name first, then fragments of the arguments), or by a script, for
a server that streams what a hostile or sloppy one would. llama-cpp-python's own server cannot
be the upstream: it sends no usage in a stream (``stream_options.include_usage``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from openai.types.chat import ChatCompletionChunk

from backend.tool_checks import CallCheck
from tests.support.engines import WEATHER, end_stream, on_loopback, openai_upstream, whole_calls
from tests.support.env import require_module
from workers.engines import Engine, GenerationRequest, TextDelta, Usage, create_engine
from workers.engines.tools import HERMES_TEMPLATE
from workers.wire_tools import MAX_TOOL_ARGUMENTS_CHARS, MAX_TOOLS, Tools, ToolSpec
from workers.wire_tools import ToolCallDelta as WireCallDelta

MODEL = "smollm2-135m"
SERVED = "smollm2-served"
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
Item = str | list[dict[str, Any]]  # a reply's text, or one delta's tool_calls
Reply = Callable[[dict[str, Any]], AsyncIterator[Item]]


def upstream_app(reply: Reply, bodies: list[dict[str, Any]]) -> web.Application:
    """An OpenAI-compatible chat-completions server (streaming, with usage) over ``reply``."""

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        bodies.append(body)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1}

        async def send(choices: list[dict[str, Any]], **extra: Any) -> None:
            chunk = ChatCompletionChunk.model_validate(
                {**base, "model": SERVED, "choices": choices, **extra}
            )
            data = chunk.model_dump_json(exclude_unset=True)
            await response.write(f"data: {data}\n\n".encode())

        def choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        await send([choice({"role": "assistant", "content": ""})])
        called = False
        async with aclosing(reply(body)) as items:  # type: ignore[type-var]
            async for item in items:
                if isinstance(item, str):
                    await send([choice({"content": item})])
                else:
                    called = True
                    await send([choice({"tool_calls": item})])
        await send([choice({}, "tool_calls" if called else "stop")])
        usage = {"prompt_tokens": 20, "completion_tokens": 10, "total_tokens": 30}
        await send([], usage=usage)
        return await end_stream(response)

    return openai_upstream(SERVED, completions)


@asynccontextmanager
async def upstream(reply: Reply) -> AsyncIterator[tuple[Engine, list[dict[str, Any]]]]:
    """The openai engine started against a loopback upstream; the request bodies it got."""
    bodies: list[dict[str, Any]] = []
    async with on_loopback(upstream_app(reply, bodies)) as url:
        engine = create_engine("openai", MODEL, base_url=url, served_model=SERVED)
        await engine.start()
        try:
            yield engine, bodies
        finally:
            await engine.close()


def llama_reply(engine: Engine) -> Reply:
    """The llama-cpp engine behind OpenAI's request: tools and tool conversation as OpenAI
    sends them, each call streamed as OpenAI does (its first piece, then 7-char fragments)."""

    async def reply(body: dict[str, Any]) -> AsyncIterator[Item]:
        messages = []
        for message in body["messages"]:
            content = message.get("content") or ""
            item: dict[str, Any] = {"role": message["role"], "content": content}
            if message.get("tool_calls"):
                item["tool_calls"] = [
                    {"id": c["id"], **c["function"]} for c in message["tool_calls"]
                ]
            if message.get("tool_call_id"):
                item["tool_call_id"] = message["tool_call_id"]
            messages.append(item)
        choice = body.get("tool_choice", "auto")
        request = GenerationRequest(
            messages,
            body["max_tokens"],
            temperature=body["temperature"],
            tools=tuple(
                {**t["function"], "parameters": json.dumps(t["function"]["parameters"])}
                for t in body.get("tools") or ()
            ),
            tool_choice="required" if isinstance(choice, dict) else choice,
            tool_name=choice["function"]["name"] if isinstance(choice, dict) else None,
            parallel_tool_calls=body.get("parallel_tool_calls", True),
        )
        async for out in engine.generate(request):
            if isinstance(out, Usage):
                return
            if out.text:
                yield out.text
            for piece in out.tool_calls:
                if piece.name is not None:
                    function = {"name": piece.name, "arguments": ""}
                    yield [{"index": piece.index, "id": f"call_{piece.index}",
                            "type": "function", "function": function}]  # fmt: skip
                for at in range(0, len(piece.arguments), 7):
                    fragment = {"arguments": piece.arguments[at : at + 7]}
                    yield [{"index": piece.index, "function": fragment}]

    return reply


def scripted(items: list[Item]) -> Reply:
    async def reply(body: dict[str, Any]) -> AsyncIterator[Item]:
        for item in items:
            yield item

    return reply


async def run(engine: Engine, request: GenerationRequest) -> tuple[str, list[Any], Usage]:
    """The reply's text, its call pieces (checked as the backend checks a worker's), usage."""
    items = [item async for item in engine.generate(request)]
    usage = items.pop()
    assert isinstance(usage, Usage) and all(isinstance(i, TextDelta) for i in items)
    deltas: list[TextDelta] = items  # type: ignore[assignment]
    pieces = [piece for delta in deltas for piece in delta.tool_calls]
    tools = request.tools and Tools(
        functions=[ToolSpec(**tool) for tool in request.tools],
        choice=request.tool_choice,
        name=request.tool_name,
        parallel=request.parallel_tool_calls,
    )
    check = CallCheck(tools or None)
    wire = [WireCallDelta(index=p.index, name=p.name, arguments=p.arguments) for p in pieces]
    assert check.read(wire) is None and check.finish() is None  # the backend lets them through
    return "".join(delta.text for delta in deltas), pieces, usage


def call(index: int, name: str, *fragments: str, repeat_name: bool = False) -> list[Item]:
    """A call as a server streams it: its first piece (id, type, name), then its fragments
    (with ``repeat_name``, as llama-cpp-python streams: every piece whole but the arguments)."""
    first = {"index": index, "id": f"call_{index}", "type": "function"}
    items: list[Item] = [[{**first, "function": {"name": name, "arguments": ""}}]]
    for fragment in fragments:
        if repeat_name:
            items.append([{**first, "function": {"name": name, "arguments": fragment}}])
        else:
            items.append([{"index": index, "function": {"arguments": fragment}}])
    return items


@pytest.mark.engine
async def test_a_tool_round_trip_through_a_real_upstream_on_the_small_model() -> None:
    require_module("llama_cpp")
    from workers.engines.llama_cpp import LlamaCppEngine

    llama = LlamaCppEngine(MODEL, chat_template=HERMES_TEMPLATE)
    await llama.start()
    try:
        async with upstream(llama_reply(llama)) as (engine, bodies):
            assert engine.calls_tools
            named = GenerationRequest(
                QUESTION, 80, temperature=0.0, tools=(WEATHER,), tool_choice="required",
                tool_name="get_weather", parallel_tool_calls=False,
            )  # fmt: skip
            text, pieces, usage = await run(engine, named)
            sent = bodies[-1]
            assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
            assert sent["parallel_tool_calls"] is False
            assert sent["tools"][0]["function"]["parameters"] == json.loads(WEATHER["parameters"])
            got = whole_calls(pieces)
            assert [name for name, _ in got] == ["get_weather"]
            assert isinstance(got[0][1]["city"], str) and not text.strip()
            assert usage.finish_reason == "stop"  # "tool_calls" is a stop

            history: list[dict[str, Any]] = [
                *QUESTION,
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_0", "name": "get_weather", "arguments": '{"city":"Paris"}'}]},
                {"role": "tool", "content": "21C and sunny", "tool_call_id": "call_0"},
            ]  # fmt: skip
            answer = GenerationRequest(history, 16, temperature=0.0, tools=(WEATHER,))
            text, pieces, _ = await run(engine, answer)
            sent = bodies[-1]
            assert sent["messages"][1]["tool_calls"] == [
                {"id": "call_0", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
            ]  # fmt: skip
            assert sent["messages"][2] == {
                "role": "tool", "content": "21C and sunny", "tool_call_id": "call_0"
            }  # fmt: skip
            assert sent["tool_choice"] == "auto"
            assert text or pieces
    finally:
        await llama.close()


async def test_an_upstreams_calls_are_checked_and_bounded() -> None:
    big = "x" * 4096
    script: list[Item] = [
        "Let me check. ",
        *call(0, "get_weather", '{"city": ', '"Paris"}'),
        *call(1, "get_weather", '{"city":', ' "Rome"}', repeat_name=True),
        *call(2, "rm_rf", "{}"),  # not offered: given back as text
        *call(3, "get_weather", "{oops"),  # not JSON: given back as text
        *call(4, "get_weather", '{"city": "', *[big] * 8, '"}'),  # past the bound: dropped
        [{"index": 5, "function": {"arguments": "{}"}}],  # no name: dropped
        "Done.",
    ]
    async with upstream(scripted(script)) as (engine, bodies):
        request = GenerationRequest(QUESTION, 80, tools=(WEATHER,))
        text, pieces, _ = await run(engine, request)
        paris, rome = ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})
        assert whole_calls(pieces) == [paris, rome]
        assert text.startswith("Let me check.") and text.endswith("Done.")
        assert '"rm_rf"' in text and "{oops" in text and big not in text
        assert all(len(p.arguments) <= MAX_TOOL_ARGUMENTS_CHARS for p in pieces)
        assert bodies[-1]["tool_choice"] == "auto" and bodies[-1]["parallel_tool_calls"] is True

        one = GenerationRequest(QUESTION, 80, tools=(WEATHER,), parallel_tool_calls=False)
        _, pieces, _ = await run(engine, one)
        assert whole_calls(pieces) == [paris]

    many: list[Item] = [item for i in range(MAX_TOOLS + 6) for item in call(i, "get_weather", "{}")]
    async with upstream(scripted(many)) as (engine, _):
        _, pieces, _ = await run(engine, GenerationRequest(QUESTION, 80, tools=(WEATHER,)))
        assert len(whole_calls(pieces)) == MAX_TOOLS


async def test_without_tools_an_upstreams_calls_are_not_read() -> None:
    async with upstream(scripted(["Hello.", *call(0, "get_weather", "{}")])) as (engine, bodies):
        text, pieces, usage = await run(engine, GenerationRequest(QUESTION, 8))
        assert text == "Hello." and not pieces and usage.completion_tokens == 10
        assert "tools" not in bodies[-1] and "tool_choice" not in bodies[-1]
