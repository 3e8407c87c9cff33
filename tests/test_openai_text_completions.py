"""``POST /v1/completions`` (legacy text completions) through the official ``openai`` SDK's
``client.completions.create`` against ``cocoon web`` and a real worker node (llama.cpp,
SmolLM2): the prompt continued as it is (no chat template), plain and streamed, billed as a chat
turn is, and what it cannot honour refused by name with nothing billed."""

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

PROMPT = "The capital of France is"


async def test_a_prompt_is_continued_as_it_is_and_billed(v1: Api, node: Node) -> None:
    client = v1.client()
    raw = await client.completions.with_raw_response.create(
        model=DEFAULT_MODEL, prompt=PROMPT, max_tokens=6, temperature=0
    )
    reply = raw.parse()
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    [choice] = reply.choices
    assert choice.text and choice.finish_reason in ("stop", "length")
    assert reply.usage is not None
    # No chat template around it: only the prompt's own few tokens were read.
    assert reply.usage.prompt_tokens <= 8
    chat = await client.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=1
    )
    assert chat.usage is not None and chat.usage.prompt_tokens > reply.usage.prompt_tokens + 4
    cost = int(reply.model_extra["cocoon"]["cost_nanoton"])
    assert raw.headers["X-Cocoon-Cost-Nanoton"] == str(cost) and cost > 0

    stream = await client.completions.create(
        model=DEFAULT_MODEL,
        prompt=[PROMPT],
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, finish = "", None, None
    async for chunk in stream:
        for part in chunk.choices:
            text += part.text
            finish = part.finish_reason or finish
        usage = chunk.usage or usage
    assert text.strip() and finish in ("stop", "length")
    assert usage is not None and 1 <= usage.completion_tokens <= 6
    assert usage.prompt_tokens == reply.usage.prompt_tokens

    turns = await charged_turns(v1)
    assert len(turns) == 3 and turns[0].cost == cost


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"echo": True}, "echo"),
        ({"suffix": "!"}, "suffix"),
        ({"best_of": 2}, "best_of"),
        ({"logprobs": 2}, "logprobs"),
        ({"n": 2}, "n"),
        ({"prompt": [PROMPT, PROMPT]}, "prompt"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"logit_bias": {"1": 101}}, "logit_bias"),
    ],
)
async def test_what_cannot_be_honoured_is_refused_by_name(
    v1: Api, extra: dict[str, Any], param: str
) -> None:
    client = v1.client()
    body: dict[str, Any] = {"model": DEFAULT_MODEL, "prompt": PROMPT, **extra}
    with pytest.raises(openai.BadRequestError) as refused:
        await client.completions.create(**body)
    assert refused.value.param is not None and refused.value.param.startswith(param)
    assert (await v1.ledger.balances(v1.user_id)).available == TON


async def test_errors_are_chats_errors(v1: Api) -> None:
    client = v1.client()
    with pytest.raises(openai.NotFoundError):  # an unknown model
        await client.completions.create(model="no-such-model", prompt=PROMPT)
    with pytest.raises(openai.APIStatusError) as no_worker:  # no node: 503, as chat
        await client.completions.create(model=DEFAULT_MODEL, prompt=PROMPT)
    assert no_worker.value.status_code == 503
    with pytest.raises(openai.BadRequestError, match="Idempotency-Key"):
        await client.completions.create(
            model=DEFAULT_MODEL, prompt=PROMPT, extra_headers={"Idempotency-Key": "k1"}
        )
    stranger = v1.client(api_key="sk-wrong")
    with pytest.raises(openai.AuthenticationError):
        await stranger.completions.create(model=DEFAULT_MODEL, prompt=PROMPT)
    assert (await v1.ledger.balances(v1.user_id)).available == TON
