"""Tools through the model's chat template, with the official ``openai`` Python SDK against
``cocoon web`` on loopback and a real llama.cpp node on SmolLM2 (issue 14): a forced call whose
arguments parse and a whole round trip with SmolLM2's own template (which knows no tools: the
worker writes them into the messages); then with the shipped Hermes template
(``--engine-option chat_template=workers/templates/hermes_tools.jinja``, attested by its
SHA-256): two calls in one reply under a forced choice, one with ``parallel_tool_calls``
false, a streamed reply's calls assembled by the SDK's own stream helper, and the round trip
rendered by the template. Every turn is billed within its bounds: no worker is flagged."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from backend.models import WorkerFlag
from backend.settings import DEFAULT_MODEL
from tests.support.api import WEATHER, Api, settled_turns
from tests.support.env import require_module
from tests.support.turns import TON, Node
from workers.engines.tools import HERMES_TEMPLATE

require_module("llama_cpp")

pytestmark = pytest.mark.engine

QUESTION = {"role": "user", "content": "What is the weather in Paris?"}
TWO_CITIES = {"role": "user", "content": "What is the weather in Paris and in Rome?"}
RESULT = '{"celsius": 21, "sky": "clear"}'


@pytest.fixture
def hermes_node(redis_url: str) -> Iterator[Node]:
    """A node whose engine renders tools with the shipped Hermes template."""
    started = Node(redis_url, engine_options=[f"chat_template={HERMES_TEMPLATE}"])
    yield started
    started.stop()


async def unflagged_and_balanced(v1: Api) -> None:
    """Every turn settled, billed as the worker counted (no bound crossed), the balance true."""
    turns = await settled_turns(v1)
    async with v1.ledger.db.session() as session:
        assert list(await session.scalars(select(WorkerFlag))) == []
    assert (await v1.ledger.balances(v1.user_id)).available == TON - sum(t.cost for t in turns)


def arguments(call: Any) -> dict[str, Any]:
    parsed = json.loads(call.function.arguments)
    assert isinstance(parsed, dict)
    return parsed


async def test_a_forced_tool_call_and_a_whole_round_trip(v1: Api, node: Node) -> None:
    client = v1.client()
    reply = await client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[QUESTION],
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=60,
        temperature=0,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.function.name == "get_weather" and isinstance(arguments(call)["city"], str)

    # The round trip: the call and its result go back, the model answers in words.
    answer = await client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[
            QUESTION,
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": RESULT},
        ],
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=30,
    )
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    await unflagged_and_balanced(v1)


async def test_calls_through_the_hermes_template(v1: Api, hermes_node: Node) -> None:
    client = v1.client()

    # Two calls in one reply under a forced choice: each with an id of its own.
    ask: dict[str, Any] = {
        "model": DEFAULT_MODEL,
        "messages": [TWO_CITIES],
        "tools": [WEATHER],
        "tool_choice": "required",
        "max_tokens": 80,
        "temperature": 0,
    }
    reply = await client.chat.completions.create(**ask)
    calls = reply.choices[0].message.tool_calls or []
    assert reply.choices[0].finish_reason == "tool_calls"
    assert [arguments(c)["city"] for c in calls] == ["Paris", "Rome"]
    assert len({c.id for c in calls}) == 2

    # parallel_tool_calls false: one call at most.
    single = await client.chat.completions.create(**ask, parallel_tool_calls=False)
    assert len(single.choices[0].message.tool_calls or []) == 1

    # Streamed, each call as OpenAI streams it, assembled by the SDK's own stream helper.
    async with client.chat.completions.stream(**ask) as stream:
        streamed = await stream.get_final_completion()
    assembled = streamed.choices[0].message.tool_calls or []
    assert streamed.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, arguments(c)) for c in assembled] == [
        (c.function.name, arguments(c)) for c in calls
    ]

    # The round trip, rendered by the template: the calls and their results go back.
    answer = await client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[
            TWO_CITIES,
            reply.choices[0].message.model_dump(exclude_none=True),
            *({"role": "tool", "tool_call_id": c.id, "content": RESULT} for c in calls),
        ],
        tools=[WEATHER],
        max_tokens=30,
        temperature=0,
    )
    message = answer.choices[0].message
    assert message.content or message.tool_calls
    assert answer.usage is not None and reply.usage is not None
    assert answer.usage.prompt_tokens > reply.usage.prompt_tokens  # the calls and results
    await unflagged_and_balanced(v1)
