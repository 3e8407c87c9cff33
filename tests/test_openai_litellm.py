"""litellm against ``cocoon web`` on loopback with a real worker node (llama.cpp, SmolLM2), as
litellm's docs say to call an OpenAI-compatible server (``openai/<model>`` with ``api_base``):
plain and streamed chat with ``completion`` and ``acompletion``, and a prompt over the context
as litellm's own ``ContextWindowExceededError``, the exception its context-window fallbacks
key on. Billed as the ledger says."""

from __future__ import annotations

import asyncio
import os

import pytest

from backend.settings import DEFAULT_MODEL
from tests.support.api import Api, settled_turns
from tests.support.env import require_module
from tests.support.turns import TON, Node

require_module("llama_cpp")
require_module("litellm")

# litellm fetches its model price list from GitHub at import unless told to use its own copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

pytestmark = [pytest.mark.engine, pytest.mark.slow]


async def close_litellm_clients() -> None:
    """Close the openai clients litellm made and cached (left open, their sockets would warn
    in a later test)."""
    import litellm
    import openai

    for client in list(litellm.in_memory_llm_clients_cache.cache_dict.values()):
        if isinstance(client, openai.AsyncOpenAI):
            await client.close()
        elif isinstance(client, openai.OpenAI):
            client.close()
    await litellm.close_litellm_async_clients()


async def test_litellm(v1: Api, node: Node) -> None:
    try:
        await ask_litellm(v1)
    finally:
        await close_litellm_clients()


async def ask_litellm(v1: Api) -> None:
    import litellm

    where = {"model": f"openai/{DEFAULT_MODEL}", "api_base": v1.base_url, "api_key": v1.key}
    hello = [{"role": "user", "content": "Say hello."}]

    plain = await asyncio.to_thread(
        litellm.completion, **where, messages=hello, max_tokens=8, num_retries=0
    )
    assert plain.choices[0].message.content and plain.usage.completion_tokens > 0

    stream = await litellm.acompletion(
        **where, messages=hello, max_tokens=8, stream=True,
        stream_options={"include_usage": True}, num_retries=0,
    )  # fmt: skip
    text, usage = "", None
    async for chunk in stream:
        text += "".join(c.delta.content or "" for c in chunk.choices)
        usage = getattr(chunk, "usage", None) or usage
    assert text and usage is not None and usage.completion_tokens > 0

    too_long = [{"role": "user", "content": "apple banana cherry " * 1200}]
    with pytest.raises(litellm.ContextWindowExceededError):
        await litellm.acompletion(**where, messages=too_long, max_tokens=8, num_retries=0)
    with pytest.raises(litellm.ContextWindowExceededError):  # streamed: before any chunk
        await litellm.acompletion(
            **where, messages=too_long, max_tokens=8, stream=True, num_retries=0
        )

    turns = await settled_turns(v1)
    assert len(turns) == 2  # nothing for the overflows
    assert (await v1.ledger.balances(v1.user_id)).available == TON - sum(t.cost for t in turns)
