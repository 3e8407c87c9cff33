"""The official ``openai`` Python SDK (sync, async, streamed) against ``cocoon web`` on loopback
with a real worker node (llama.cpp, SmolLM2), doing what real clients do: give up on a slow
reply (billed only what was generated), retry with an ``Idempotency-Key`` (billed once), send a
prompt longer than the context (their own ``BadRequestError``, streamed or not), and send more
requests at once than the engine runs (they queue; none fails)."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis

from backend.openai_api import idempotency, routes
from backend.settings import DEFAULT_MODEL
from tests.support.api import WEATHER, Api, ApiFactory, charged_turns, settled_turns
from tests.support.env import require_module
from tests.support.ops import api_serves
from tests.support.turns import TON, Node, open_holds
from workers import registry

require_module("llama_cpp")

pytestmark = pytest.mark.engine

LONG = [{"role": "user", "content": "Count from 1 to 500, one number per line."}]


async def a_turn_running(v1: Api, timeout_s: float = 60.0) -> None:
    """Return once a turn holds money (it was dispatched)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if await open_holds(v1.ledger):
            return
        assert time.monotonic() < deadline, "no turn started"
        await asyncio.sleep(0.05)


async def test_sync_async_and_streamed_clients(v1: Api, node: Node) -> None:
    def sync_chat() -> openai.types.chat.ChatCompletion:
        with openai.OpenAI(base_url=v1.base_url, api_key=v1.key) as client:
            return client.chat.completions.create(
                model=DEFAULT_MODEL,
                messages=[{"role": "user", "content": "Say hello."}],
                max_tokens=8,
                temperature=None,  # what the SDK sends for "not given" in some wrappers
            )

    reply = await asyncio.to_thread(sync_chat)
    assert reply.choices[0].message.content and reply.usage is not None

    client = v1.client(max_retries=openai.DEFAULT_MAX_RETRIES)
    raw = await client.chat.completions.with_raw_response.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8
    )
    completion = raw.parse()
    cost = int(completion.model_extra["cocoon"]["cost_nanoton"])
    assert raw.headers["X-Cocoon-Cost-Nanoton"] == str(cost) and cost > 0
    assert raw.headers["X-Request-Id"]

    stream = await client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    async for chunk in stream:
        text += "".join(c.delta.content or "" for c in chunk.choices)
        usage = chunk.usage or usage
    assert text and usage is not None
    turns = await settled_turns(v1)
    assert len(turns) == 3
    spent = sum(t.cost for t in turns)
    assert (await v1.ledger.balances(v1.user_id)).available == TON - spent


async def test_a_client_that_times_out_pays_only_what_was_generated(v1: Api, node: Node) -> None:
    """The issue's client gave up (openai's timeout=3) and was billed three full turns. A client
    that gives up closes its connection, as the SDK's timeout does; it gives up here once its
    turn is running (not after a fixed time a fast machine may not need: the reply could be
    whole by then). Retries off: a retry is a new turn (see the idempotency test)."""
    client = v1.client(timeout=120)
    request = asyncio.create_task(
        client.chat.completions.create(
            model=DEFAULT_MODEL, messages=LONG, max_tokens=1500, temperature=0
        )
    )
    await a_turn_running(v1)
    request.cancel()  # the client gives up: its connection closes
    with pytest.raises(asyncio.CancelledError):
        await request
    # The server saw the client leave and stopped the turn: billed for what was generated,
    # not the 1500 tokens asked for.
    turns = await charged_turns(v1)
    assert turns and all(
        t.finish_reason == "cancelled" and t.completion_tokens < 1500 for t in turns
    )


async def test_a_retry_with_an_idempotency_key_is_billed_once(v1: Api, node: Node) -> None:
    headers = {"Idempotency-Key": "retry-me-1"}
    ask = {"model": DEFAULT_MODEL, "messages": LONG, "max_tokens": 40, "temperature": 0}
    hasty = v1.client()
    first_try = asyncio.create_task(hasty.chat.completions.create(**ask, extra_headers=headers))
    await a_turn_running(v1)  # now the client gives up
    first_try.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first_try
    # The retry waits for the first to end; on a machine slow enough that the server's wait
    # runs out first it is a 409 with Retry-After, which the SDK retries by itself as often
    # as allowed here: the first turn's end, not a time, ends the wait (nine tries of up to a
    # minute outlast the test's own timeout).
    patient = v1.client(max_retries=8, timeout=120)
    raw = await patient.chat.completions.with_raw_response.create(**ask, extra_headers=headers)
    first = raw.parse()
    assert raw.headers["Idempotent-Replayed"] == "true"
    assert first.choices[0].finish_reason == "length"  # it ran to its end for the retry
    again = await patient.chat.completions.create(**ask, extra_headers=headers)
    assert again.id == first.id
    assert again.choices[0].message.content == first.choices[0].message.content
    [turn] = await settled_turns(v1)
    assert turn.cost == int(first.model_extra["cocoon"]["cost_nanoton"])
    assert (await v1.ledger.balances(v1.user_id)).available == TON - turn.cost
    # The same key with another request is refused, not replayed.
    with pytest.raises(openai.BadRequestError, match="another request body"):
        await patient.chat.completions.create(
            model=DEFAULT_MODEL, messages=LONG, max_tokens=12, extra_headers=headers
        )


async def test_a_retry_before_the_first_ends_is_a_409_the_sdk_retries(
    v1_server: ApiFactory, node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first request with a key waits for the worker's one slot, which the test holds:
    it is still running, however fast the machine, when the retry comes. The server's wait
    for it (a minute) is cut to none here: the retry is a 409 with Retry-After at once."""
    monkeypatch.setattr(routes, "IDEMPOTENCY_WAIT_S", 0.0)
    v1 = await v1_server(api_queue_timeout_s=300)
    headers = {"Idempotency-Key": "retry-me-2"}
    ask = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Hi"}]}
    admin = aioredis.Redis.from_url(v1.settings.redis_url)
    async with aiohttp.ClientSession() as session:
        while True:  # until the API sees the node (the test's own timeout bounds the wait)
            if await api_serves(session, v1.base_url.removesuffix("/v1"), DEFAULT_MODEL):
                break
            await asyncio.sleep(0.1)
    assert await registry.reserve_slot(admin, node.worker_id, "held-by-the-test", ttl_s=300)
    client = v1.client()
    first = asyncio.create_task(
        client.chat.completions.create(**ask, max_tokens=4, extra_headers=headers)
    )
    try:
        while True:  # until its key is claimed
            if await admin.keys(f"*{idempotency.IDEMPOTENCY}*"):
                break
            assert not first.done()
            await asyncio.sleep(0.05)
        with pytest.raises(openai.ConflictError, match="still running") as refused:
            await client.chat.completions.create(**ask, max_tokens=4, extra_headers=headers)
        assert refused.value.response.headers["Retry-After"] == "1"
    finally:  # the module's worker serves the next tests
        await registry.release_slot(admin, node.worker_id, "held-by-the-test")
        await admin.aclose()
    # Retried on each 409 (Retry-After: 1) until the first has ended: its result. The first
    # turn's end, not a count of tries, ends the wait (a loaded machine needs more than eight);
    # the test's own timeout bounds it.
    patient = v1.client(max_retries=100_000)
    try:
        raw = await patient.chat.completions.with_raw_response.create(
            **ask, max_tokens=4, extra_headers=headers
        )
        assert raw.headers["Idempotent-Replayed"] == "true"
        assert raw.parse().id == (await first).id
    finally:  # no request left running for the next test's unraisable-warning check
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
    [turn] = await settled_turns(v1)
    assert (await v1.ledger.balances(v1.user_id)).available == TON - turn.cost


async def test_json_replies_parse_and_penalties_are_taken(v1: Api, node: Node) -> None:
    client = v1.client()
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}, "year": {"type": "integer"}},
        "required": ["city", "year"],
        "additionalProperties": False,
    }
    reply = await client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "Where and when was the Eiffel Tower built?"}],
        max_tokens=60,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "place", "schema": schema, "strict": True},
        },
    )
    assert reply.choices[0].finish_reason == "stop"
    answer = json.loads(reply.choices[0].message.content or "")
    assert set(answer) == {"city", "year"}
    assert isinstance(answer["city"], str) and isinstance(answer["year"], int)

    stream = await client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "Describe a cat as JSON."}],
        max_tokens=80,
        temperature=0,
        presence_penalty=1.0,
        frequency_penalty=1.0,
        response_format={"type": "json_object"},
        stream=True,
    )
    text, finish = "", None
    async for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    if finish == "stop":  # a reply cut by max_tokens is JSON cut short
        assert isinstance(json.loads(text), dict)
    else:
        assert text.lstrip().startswith("{")


async def test_logit_bias_steers_the_reply(v1: Api, node: Node) -> None:
    from llama_cpp import Llama

    from workers.engines import default_model_path

    vocab = Llama(str(default_model_path()), vocab_only=True, verbose=False)
    [banana] = vocab.tokenize(b" banana", add_bos=False, special=False)
    client = v1.client()
    reply = await client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "Name a color."}],
        max_tokens=3,
        logit_bias={str(banana): 100},
    )
    assert (reply.choices[0].message.content or "").count("banana") == 3
    with pytest.raises(openai.BadRequestError, match="token ids must be below"):
        await client.chat.completions.create(
            model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
            logit_bias={"999999999": 1},
        )  # fmt: skip


async def test_an_assistant_message_last_is_continued(v1: Api, node: Node) -> None:
    client = v1.client()
    reply = await client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[
            {"role": "user", "content": "Count from 1 to 10, separated by commas."},
            {"role": "assistant", "content": "1, 2, 3, 4, 5,"},
        ],
        max_tokens=8,
        temperature=0,
    )
    # The reply goes on from the prefill, it does not start a new answer.
    assert (reply.choices[0].message.content or "").lstrip().startswith("6")


async def test_a_prompt_over_the_context_is_a_400_streamed_or_not(v1: Api, node: Node) -> None:
    # About 3,600 tokens for SmolLM2 (context 2,048): the worker's tokenizer decides it.
    words = [{"role": "user", "content": "apple banana cherry " * 1200}]
    client = v1.client()
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(model=DEFAULT_MODEL, messages=words, max_tokens=8)
    assert refused.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as refused:  # before any byte of a stream
        await client.chat.completions.create(
            model=DEFAULT_MODEL, messages=words, max_tokens=8, stream=True
        )
    assert refused.value.code == "context_length_exceeded"
    # Far over it: the backend decides alone, before holding or dispatching anything.
    huge = [{"role": "user", "content": "x" * 600_000}]
    with pytest.raises(openai.BadRequestError, match="at least") as refused:
        await client.chat.completions.create(model=DEFAULT_MODEL, messages=huge, max_tokens=8)
    assert refused.value.code == "context_length_exceeded"
    assert await settled_turns(v1) == []
    assert (await v1.ledger.balances(v1.user_id)).available == TON


async def test_more_requests_than_the_engine_runs_queue_instead_of_failing(
    v1_server: ApiFactory, node: Node
) -> None:
    # The llama.cpp worker runs one turn at a time (capacity 1): the others wait in the
    # backend's queue (long enough here for a busy test machine), none fails.
    v1 = await v1_server(api_queue_timeout_s=300)
    client = v1.client()

    async def ask(n: int) -> str | None:
        reply = await client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=[{"role": "user", "content": f"Say the number {n}."}],
            max_tokens=12,
        )
        return reply.choices[0].finish_reason

    finishes = await asyncio.gather(*(ask(n) for n in range(4)))
    assert all(finish in ("stop", "length") for finish in finishes)
    assert len(await settled_turns(v1)) == 4


async def test_a_saturated_model_answers_503_with_retry_after(
    v1_server: ApiFactory, node: Node
) -> None:
    v1 = await v1_server(api_queue_timeout_s=0.5)
    client = v1.client()
    # The one slot of the llama.cpp worker is taken (by a turn of another dispatcher, say) for
    # as long as the test needs: a turn of its own could end first on a fast machine.
    admin = aioredis.Redis.from_url(v1.settings.redis_url)
    deadline = time.monotonic() + 120
    while not await registry.reserve_slot(admin, node.worker_id, "held-by-the-test", ttl_s=120):
        assert time.monotonic() < deadline, "the node never registered"
        await asyncio.sleep(0.1)
    try:
        with pytest.raises(openai.InternalServerError) as refused:
            await client.chat.completions.with_raw_response.create(
                model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
            )
        assert refused.value.status_code == 503
        assert refused.value.response.headers["Retry-After"] == "5"
        assert "busy" in refused.value.message
        assert (await v1.ledger.balances(v1.user_id)).available == TON  # nothing held or charged
    finally:
        await registry.release_slot(admin, node.worker_id, "held-by-the-test")
        await admin.aclose()
    # The slot free again, the same request is served.
    served = await client.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert served.choices[0].message.content is not None


async def test_langchain_openai(v1: Api, node: Node) -> None:
    """langchain-openai's ChatOpenAI: plain and streamed chat, a forced tool call whose
    arguments parse, a structured (json_schema) reply, and a context overflow as openai's
    own exception, all billed as the ledger says."""
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(
        model=DEFAULT_MODEL, base_url=v1.base_url, api_key=v1.key, max_retries=0, max_tokens=12
    )
    reply = await chat.ainvoke("Say hello.")
    assert reply.content
    streamed = [chunk.content async for chunk in chat.astream("Say hi.")]
    assert "".join(str(part) for part in streamed)

    caller = chat.bind_tools([WEATHER], tool_choice="get_weather")
    called = await caller.ainvoke("What is the weather in Rome?", max_tokens=60, temperature=0)
    [call] = called.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)

    schema = {
        "title": "Answer",
        "type": "object",
        "properties": {"yes": {"type": "boolean"}},
        "required": ["yes"],
        "additionalProperties": False,
    }
    structured = chat.with_structured_output(schema, method="json_schema")
    answer = await structured.ainvoke("Is the sky blue?", max_tokens=20, temperature=0)
    assert isinstance(answer, dict) and isinstance(answer["yes"], bool)

    with pytest.raises(openai.BadRequestError, match="context"):
        await chat.ainvoke("apple banana cherry " * 1200)
    assert len(await charged_turns(v1)) == 4
    assert chat.root_async_client is not None
    await chat.root_async_client.close()
