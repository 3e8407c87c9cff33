"""Tools through the chat template (workers.engines.tools): the calls read out of a streamed
reply, several per reply, within bounds a hostile model cannot stretch; and the real llama.cpp
engine on the small model rendering the tools with the shipped Hermes template."""

from __future__ import annotations

import json

import pytest

from backend.bounds import tools_token_bound
from tests.support.engines import WEATHER, whole_calls
from tests.support.env import require_module
from workers.engines.base import GenerationRequest, TextDelta, ToolCallDelta, Usage
from workers.engines.tools import (
    CLOSE,
    HERMES_TEMPLATE,
    MAX_CALL_CHARS,
    OPEN,
    ToolCallParser,
    fallback_messages,
    forced_schema,
    knows_tools,
    read_template,
    template_digest,
)
from workers.wire_tools import Tools, ToolSpec

QUESTION = [{"role": "user", "content": "What is the weather in Paris and in Rome?"}]


def fed(parser: ToolCallParser, pieces: list[str]) -> tuple[str, list[ToolCallDelta]]:
    text, calls = "", []
    for piece in pieces:
        out, got = parser.feed(piece)
        text, calls = text + out, calls + list(got)
    out, got = parser.finish()
    return text + out, calls + list(got)


def test_two_hermes_calls_in_one_streamed_reply_name_first_then_arguments() -> None:
    paris = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    rome = '{"name": "get_weather", "arguments": {"city": "Rome"}}'
    reply = f"Let me look.\n{OPEN}\n{paris}\n{CLOSE}\n{OPEN}\n{rome}\n{CLOSE}\n"
    parser = ToolCallParser(forced=False, limit=64, names=["get_weather"])
    text, calls = fed(parser, [reply[i : i + 3] for i in range(0, len(reply), 3)])
    assert text == "Let me look."  # no part of a tag leaks, the whitespace around calls goes
    assert calls[0] == ToolCallDelta(0, name="get_weather") and calls[1].name is None
    paris_and_rome = [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
    assert whole_calls(calls) == paris_and_rome


def test_parallel_false_keeps_one_call_and_unknown_functions_stay_text() -> None:
    one = f'{OPEN}{{"name": "get_weather", "arguments": {{}}}}{CLOSE}'
    parser = ToolCallParser(forced=False, limit=1, names=["get_weather"])
    assert whole_calls(fed(parser, [one + one])[1]) == [("get_weather", {})]
    stranger = f'{OPEN}{{"name": "rm_rf", "arguments": {{}}}}{CLOSE}'
    parser = ToolCallParser(forced=False, limit=64, names=["get_weather"])
    assert fed(parser, [stranger]) == (stranger, [])


def test_a_forced_reply_is_an_array_of_calls_read_as_each_completes() -> None:
    parser = ToolCallParser(forced=True, limit=64, names=["get_weather"])
    first = parser.feed('[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"na')
    assert whole_calls(list(first[1])) == [("get_weather", {"city": "Paris"})]
    rest = parser.feed('me": "get_weather", "arguments": {"city": "Rome"}}]')
    assert [c.index for c in rest[1]] == [1, 1] and parser.finish() == ("", ())


def test_a_hostile_model_cannot_make_the_parser_hold_more_than_a_call() -> None:
    parser = ToolCallParser(forced=False, limit=64, names=["get_weather"])
    held = 0
    text = ""
    for _ in range(200):  # an endless call: 200 x 1 KiB
        out, calls = parser.feed(OPEN if not text and not held else "x" * 1024)
        assert not calls
        text += out
        held = len(parser._buffer)
        assert held <= MAX_CALL_CHARS
    assert text.startswith(OPEN)  # given back as text
    forced = ToolCallParser(forced=True, limit=64, names=["get_weather"])
    forced.feed('[{"name": "get_weather", "arguments": {"city": "')
    for _ in range(100):
        forced.feed("y" * 1024)
        assert len(forced._buffer) <= 2 * MAX_CALL_CHARS


def test_the_forced_schema_and_the_fallback_for_a_template_without_tools() -> None:
    request = GenerationRequest(
        QUESTION, 40, tools=(WEATHER,), tool_choice="required", parallel_tool_calls=False
    )
    schema = json.loads(forced_schema(request) or "")
    assert schema["maxItems"] == 1 and schema["items"]["properties"]["name"]["enum"] == [
        "get_weather"
    ]
    assert forced_schema(GenerationRequest(QUESTION, 40, tools=(WEATHER,))) is None
    history = [
        *QUESTION,
        {"role": "assistant", "content": "",
         "tool_calls": [{"id": "call_0", "name": "get_weather", "arguments": '{"city":"Paris"}'}]},
        {"role": "tool", "content": "21C", "tool_call_id": "call_0"},
    ]  # fmt: skip
    messages = fallback_messages(GenerationRequest(history, 40, tools=(WEATHER,)))
    assert messages[0]["role"] == "system" and "get_weather" in messages[0]["content"]
    assert OPEN in messages[2]["content"] and messages[3]["role"] == "user"
    assert knows_tools(read_template(HERMES_TEMPLATE))


@pytest.mark.engine
async def test_llama_cpp_renders_tools_through_the_template_and_calls_them() -> None:
    require_module("llama_cpp")
    from workers.engines.llama_cpp import LlamaCppEngine

    plain = LlamaCppEngine("smollm2-135m")
    engine = LlamaCppEngine("smollm2-135m", chat_template=HERMES_TEMPLATE)
    await plain.start()
    await engine.start()
    try:
        assert not plain.tool_template and engine.tool_template  # SmolLM2's own knows none
        digest = template_digest(read_template(HERMES_TEMPLATE))
        assert engine.attested_config()["chat_template_sha256"] == digest  # what it attests
        assert "chat_template_sha256" not in plain.attested_config()
        call = {"id": "call_0", "name": "get_weather", "arguments": '{"city":"Paris"}'}
        history = [
            *QUESTION,
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "21C and sunny", "tool_call_id": "call_0"},
        ]
        tools = [{"type": "function", "function": {**WEATHER, "parameters": {}}}]
        prompt = engine._llm.detokenize(engine.prompt_tokens(history, tools=tools)).decode()
        assert "<tools>" in prompt and '"name": "get_weather"' in prompt
        assert "<tool_response>\n21C and sunny\n</tool_response>" in prompt

        # The tools' text a worker bills stays within the backend's bound on it, rendered by
        # the template or written by the fallback, with text that escapes (Jinja's tojson).
        odd = {**WEATHER, "description": "Météo <now> & 'here' 🌦" * 20}
        bound = tools_token_bound(Tools(functions=[ToolSpec(**odd)]))
        for each in (engine, plain):
            bare = len(each._prompt(GenerationRequest(QUESTION, 8)))
            offered = len(each._prompt(GenerationRequest(QUESTION, 8, tools=(odd,))))
            assert 0 < offered - bare <= bound

        request = GenerationRequest(
            QUESTION, 80, temperature=0.0, tools=(WEATHER,), tool_choice="required"
        )
        items = [item async for item in engine.generate(request)]
        assert isinstance(items[-1], Usage)
        calls = [c for item in items if isinstance(item, TextDelta) for c in item.tool_calls]
        got = whole_calls(calls)
        assert got and all(name == "get_weather" for name, _ in got)
        assert all(isinstance(arguments["city"], str) for _, arguments in got)
    finally:
        await engine.close()
        await plain.close()
