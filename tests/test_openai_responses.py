"""``POST /v1/responses`` (text in, text or a stream of Responses events out) through the
official ``openai`` SDK's ``client.responses.create`` against ``cocoon web`` and a real worker
node (llama.cpp, SmolLM2): billed as a chat turn is, and what it cannot honour refused by name
with nothing billed."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from backend.settings import DEFAULT_MODEL
from tests.support.api import Api, charged_turns
from tests.support.env import require_module
from tests.support.turns import TON, Node

require_module("llama_cpp")

pytestmark = pytest.mark.engine


async def test_text_in_text_out_plain_and_streamed(v1: Api, node: Node) -> None:
    client = v1.client()
    raw = await client.responses.with_raw_response.create(
        model=DEFAULT_MODEL,
        instructions="Answer in one short sentence. " * 8,
        input="Say hello.",
        max_output_tokens=8,
        temperature=0,
    )
    reply = raw.parse()
    assert reply.output_text and reply.status in ("completed", "incomplete")
    assert reply.usage is not None and 1 <= reply.usage.output_tokens <= 8
    cost = int(reply.model_extra["cocoon"]["cost_nanoton"])
    assert raw.headers["X-Cocoon-Cost-Nanoton"] == str(cost) and cost > 0
    # The instructions were read (in place of the model's own, shorter, default system prompt).
    bare = await client.responses.create(
        model=DEFAULT_MODEL, input="Say hello.", max_output_tokens=1
    )
    assert bare.usage is not None and reply.usage.input_tokens > bare.usage.input_tokens

    stream = await client.responses.create(
        model=DEFAULT_MODEL,
        input=[
            {"role": "user", "content": "Say hello."},
            {"role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
            {"role": "user", "content": [{"type": "input_text", "text": "Again."}]},
        ],
        max_output_tokens=8,
        stream=True,
    )
    deltas, kinds, final = "", [], None
    async for event in stream:
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            deltas += event.delta
        if event.type in ("response.completed", "response.incomplete"):
            final = event.response
    assert kinds[0] == "response.created" and kinds[-1] in (
        "response.completed",
        "response.incomplete",
    )
    assert final is not None and final.output_text == deltas and deltas
    assert final.usage is not None and final.usage.output_tokens >= 1

    turns = await charged_turns(v1)
    assert len(turns) == 3 and turns[0].cost == cost


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"background": True}, "background"),
        ({"text": {"format": {"type": "json_object"}}}, "text"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}, "input"),
        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input"),
        ({"input": []}, "input"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
    ],
)
async def test_what_cannot_be_honoured_is_refused_by_name(
    v1: Api, extra: dict[str, Any], param: str
) -> None:
    client = v1.client()
    body: dict[str, Any] = {"model": DEFAULT_MODEL, "input": "Hi", **extra}
    with pytest.raises(openai.BadRequestError) as refused:
        await client.responses.create(**body)
    assert refused.value.param is not None and refused.value.param.startswith(param)
    assert (await v1.ledger.balances(v1.user_id)).available == TON
    with pytest.raises(openai.NotFoundError):  # an unknown model, as chat answers it
        await client.responses.create(model="no-such-model", input="Hi")
