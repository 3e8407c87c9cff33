"""The official ``openai`` package against ``cocoon web`` on loopback, with a real worker."""

from __future__ import annotations

import aiohttp
import openai
import pytest

from backend.settings import DEFAULT_MODEL
from tests.support.api import Api
from tests.support.env import require_module
from tests.support.turns import TON, Node

require_module("llama_cpp")


@pytest.mark.engine
async def test_completion_not_streamed(v1: Api, node: Node) -> None:
    ledger, user = v1.ledger, v1.user_id
    client = v1.client(max_retries=openai.DEFAULT_MAX_RETRIES)
    reply = await client.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=16
    )
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 16
    cost = int(reply.model_extra["cocoon"]["cost_nanoton"])
    assert (await ledger.balances(user)).available == TON - cost


@pytest.mark.engine
async def test_completion_streamed_with_usage(v1: Api, node: Node) -> None:
    ledger, user = v1.ledger, v1.user_id
    client = v1.client(max_retries=openai.DEFAULT_MAX_RETRIES)
    stream = await client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, finish = "", None, None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert text and finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens > 0
    assert (await ledger.balances(user)).held == 0
    assert (await ledger.balances(user)).available < TON


async def test_errors_are_openai_shaped(v1: Api) -> None:
    base_url, key, ledger, user = v1.base_url, v1.key, v1.ledger, v1.user_id
    bad = v1.client(api_key="cc-not-a-key")
    with pytest.raises(openai.AuthenticationError):
        await bad.chat.completions.create(
            model=DEFAULT_MODEL, messages=[{"role": "user", "content": "hi"}]
        )
    client = v1.client()
    with pytest.raises(openai.NotFoundError, match="unknown model"):
        await client.chat.completions.create(
            model="gpt-17", messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(openai.BadRequestError, match="messages"):
        await client.chat.completions.create(model=DEFAULT_MODEL, messages=[])
    # No worker runs in this test: a clear 503, and the hold is released.
    with pytest.raises(openai.InternalServerError, match="no worker"):
        await client.chat.completions.create(
            model=DEFAULT_MODEL, messages=[{"role": "user", "content": "hi"}]
        )
    assert (await ledger.balances(user)).available == TON

    async with aiohttp.ClientSession() as session:
        async with session.post(
            base_url + "/chat/completions",
            data=b"{not json",
            headers={"Authorization": f"Bearer {key}"},
        ) as response:
            assert response.status == 400
            body = await response.json()
            assert body["error"]["code"] == "invalid_json"


async def test_models_are_listed_with_prices(v1: Api) -> None:
    client = v1.client(max_retries=openai.DEFAULT_MAX_RETRIES)
    models = await client.models.list()
    [model] = models.data
    assert model.id == DEFAULT_MODEL
    assert int(model.model_extra["pricing"]["completion"]) > 0
