"""A worker is a stranger with tools too (issue 14): a call of a function the request did not
offer, arguments that are not a JSON object, more calls than ``parallel_tool_calls`` allows,
arguments past the wire's bound, calls in a turn that offered none. Each ends the turn cleanly
(``worker_misbehaved``, a clear error for the client), billed only the text delivered before
it (:func:`backend.bounds.delivered_floor`), the hold released, the worker flagged
``tool_calls``. The checks themselves (backend.tool_checks), then a rogue worker
(tests/support/rogue.py) behind the real API on loopback, spoken to with the openai SDK."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest
from sqlalchemy import select

from backend.bounds import Flag, Violation, delivered_floor, prompt_token_bound
from backend.models import WorkerFlag
from backend.pricing import turn_cost
from backend.settings import DEFAULT_MODEL
from backend.tool_checks import CallCheck
from tests.support.api import Api, settled_turns
from tests.support.rogue import RogueJob, RogueWorker
from tests.support.turns import TON
from workers.wire import ChatMessage, StreamChunk, canonical_json
from workers.wire_tools import MAX_TOOL_ARGUMENTS_CHARS, ToolCall, ToolCallDelta, Tools, ToolSpec

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
OFFERED = Tools(functions=[ToolSpec(name="get_weather"), ToolSpec(name="get_time")])


def call(index: int, name: str, arguments: str) -> list[ToolCallDelta]:
    return [ToolCallDelta(index=index, name=name), ToolCallDelta(index=index, arguments=arguments)]


# -- the checks ---------------------------------------------------------------------------------


def test_calls_of_offered_functions_in_order_pass() -> None:
    check = CallCheck(OFFERED)
    assert check.read(call(0, "get_weather", '{"city": ')) is None
    assert check.read([ToolCallDelta(index=0, arguments='"Paris"}')]) is None
    assert check.read(call(1, "get_time", "{}")) is None
    assert check.finish() is None and check.calls == 2


@pytest.mark.parametrize(
    ("tools", "pieces", "at_finish"),
    [
        (OFFERED, call(0, "rm_rf", "{}"), False),  # not offered
        (OFFERED.model_copy(update={"name": "get_time", "choice": "required"}),
         call(0, "get_weather", "{}"), False),  # not the named one
        (OFFERED, call(1, "get_weather", "{}"), False),  # out of order
        (OFFERED, [ToolCallDelta(index=0, arguments="{}")], False),  # arguments of no call
        (OFFERED.model_copy(update={"parallel": False}),
         call(0, "get_weather", "{}") + call(1, "get_weather", "{}"), False),  # too many
        (OFFERED, [*call(0, "get_weather", "x" * 100),
                   ToolCallDelta(index=0, arguments="x" * MAX_TOOL_ARGUMENTS_CHARS)], False),
        (None, call(0, "get_weather", "{}"), False),  # nothing offered
        (OFFERED, call(0, "get_weather", "{not json"), True),
        (OFFERED, call(0, "get_weather", "[1, 2]"), True),  # JSON, not an object
        (OFFERED, call(0, "get_weather", "{") + call(1, "get_time", "{}"), False),
    ],
)  # fmt: skip
def test_a_call_the_request_did_not_allow_is_a_flag(
    tools: Tools | None, pieces: list[ToolCallDelta], at_finish: bool
) -> None:
    check = CallCheck(tools)
    flag = check.read(pieces)
    if at_finish:
        assert flag is None
        flag = check.finish()
    assert flag is not None and flag.kind is Violation.TOOL_CALLS


def test_the_prompt_bound_counts_the_tools_text() -> None:
    history = [
        ChatMessage(role="user", content="Weather?"),
        ChatMessage(
            role="assistant",
            content="",
            tool_calls=[ToolCall(id="call_0", name="get_weather", arguments='{"city":"<Évora>"}')],
        ),
        ChatMessage(role="tool", content="21C", tool_call_id="call_0"),
    ]
    bare = [ChatMessage(role="user", content="Weather?")]
    # Every call and result adds at least its text; escaped by Jinja's tojson ("<" is \u003c,
    # "É" is \u00c9) the arguments' 18 characters may take 43 bytes.
    assert prompt_token_bound(history) - prompt_token_bound(bare) > 64 + 43 + 64
    described = Tools(
        functions=[
            ToolSpec(name="f", description="é" * 100, parameters=json.dumps({"a": "<" * 50}))
        ]
    )
    extra = prompt_token_bound(bare, described) - prompt_token_bound(bare)
    assert extra >= 512 + 600 + 50 * 6  # the preamble, 100 \u00e9, 50 \u003c


# -- a rogue worker behind the API --------------------------------------------------------------


async def entry(rogue: RogueWorker, job: RogueJob, text: str, pieces: list[ToolCallDelta]) -> None:
    """The next chunk of the reply with ``pieces`` of calls (a rogue writes what it likes)."""
    chunk = StreamChunk(job_id=job.job_id, seq=job.chunks, text=text, tool_calls=pieces or None)
    job.chunks += 1
    await rogue.raw_entry(job, canonical_json(chunk))


async def flags(v1: Api) -> set[tuple[str, str]]:
    async with v1.ledger.db.session() as session:
        return {(r.worker_id, r.kind) for r in await session.scalars(select(WorkerFlag))}


ROGUE_REPLIES = {  # the chunks written, how many are delivered, the request's extra fields
    "a function not offered": ([("Sure.", []), ("", call(0, "rm_rf", '{"path": "/"}'))], 1, {}),
    "arguments that are not JSON": ([("Sure.", call(0, "get_weather", '{"city": "Par'))], 1, {}),
    "two calls where one is allowed": (
        [("Sure.", call(0, "get_weather", '{"city": "Paris"}')),
         ("", call(1, "get_weather", '{"city": "Rome"}'))],
        1,
        {"parallel_tool_calls": False},
    ),
}  # fmt: skip


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("lie", list(ROGUE_REPLIES))
async def test_a_rogue_workers_calls_end_the_turn_billed_only_what_it_delivered(
    v1: Api, redis_url: str, lie: str, stream: bool
) -> None:
    rogue = RogueWorker(redis_url)
    client = v1.client()
    entries, kept, extra = ROGUE_REPLIES[lie]
    try:

        async def ask() -> Any:
            request: dict[str, Any] = {
                "model": DEFAULT_MODEL,
                "messages": [{"role": "user", "content": "Weather in Paris?"}],
                "tools": [WEATHER],
                "max_tokens": 64,
                **extra,
            }
            if not stream:
                return await client.chat.completions.create(**request)
            seen = []
            async for chunk in await client.chat.completions.create(**request, stream=True):
                seen.append(chunk)
            return seen

        asked = asyncio.create_task(ask())
        job = await rogue.take()
        assert job.request.tools is not None  # the worker got the tools
        for text, pieces in entries:
            await entry(rogue, job, text, pieces)
        await rogue.final(job, prompt_tokens=10, completion_tokens=64)
        with pytest.raises(openai.APIError) as failed:
            await asyncio.wait_for(asked, 60)
        error: Any = failed.value
        assert error.code == "worker_misbehaved" or "worker_misbehaved" in str(error.body)
        assert "tool call" in error.message

        await settled_turns(v1)
        delivered = sum(
            len((text + "".join((p.name or "") + p.arguments for p in pieces)).encode())
            for text, pieces in entries[:kept]
        )
        price = v1.settings.models[DEFAULT_MODEL]
        billed = turn_cost(
            price,
            prompt_tokens=0,
            cached_prompt_tokens=0,
            completion_tokens=delivered_floor(delivered, 64),
        )
        assert (await v1.ledger.balances(v1.user_id)).available == TON - billed
        assert (await v1.ledger.audit()).ok
        assert await flags(v1) == {(rogue.worker_id, "tool_calls")}
    finally:
        await rogue.close()


def test_a_flag_names_the_call() -> None:
    check = CallCheck(OFFERED.model_copy(update={"parallel": False}))
    assert check.read(call(0, "get_weather", "{}") + call(1, "get_time", "{}")) == Flag(
        Violation.TOOL_CALLS, 2, 1
    )
