"""What clients meet at the API's edge before any worker runs: OpenAI-shaped errors for every
status (404, 405, 413 too), the one 4 MiB body limit, CORS, ``/health``, ``GET /v1/models/{id}``,
``x-request-id``, ``null`` read as the default, every parameter that cannot be honoured refused
by name, and the per-key and per-user limits (429 with ``Retry-After``). No worker runs here:
a request that passes the edge ends in a 503 ``no_worker`` with nothing charged."""

from __future__ import annotations

import io
import json
from typing import Any

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis

from backend.openai_api.limits import key_subject
from backend.ratelimit import ConcurrencyLimiter, RateLimiter
from backend.settings import DEFAULT_MODEL
from tests.support.api import Api, ApiFactory
from tests.support.turns import TON

HI = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
BIG = {"type": "object", "description": "x" * 40_000}  # a schema over the wire's 32 KiB


async def post(v1: Api, body: Any, *, key: str | None = None, **headers: str) -> Any:
    async with aiohttp.ClientSession() as session:
        data = io.BytesIO(body if isinstance(body, bytes) else json.dumps(body).encode())
        async with session.post(
            v1.base_url + "/chat/completions",
            data=data,
            headers={
                "Authorization": f"Bearer {key or v1.key}",
                "Content-Type": "application/json",
                **headers,
            },
        ) as response:
            return response.status, response.headers.copy(), await response.json()


async def test_statuses_without_a_route_are_openai_json(v1: Api) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(v1.base_url + "/nowhere") as response:
            assert response.status == 404
            assert response.content_type == "application/json"
            body = await response.json()
            assert body["error"]["code"] == "not_found" and body["error"]["message"]
            assert response.headers["X-Request-Id"].startswith("req_")
        async with session.get(v1.base_url + "/chat/completions") as response:
            assert response.status == 405
            assert (await response.json())["error"]["type"] == "invalid_request_error"
            assert "POST" in response.headers["Allow"]
        # The client's own request id is echoed (a sane one).
        async with session.get(v1.base_url + "/models", headers={"X-Request-Id": "abc-1"}) as r:
            assert r.headers["X-Request-Id"] == "abc-1"


async def test_one_body_limit_of_4_mib(v1: Api) -> None:
    # 2.7 MB: over aiohttp's default 1 MiB, under the documented 4 MiB: it is read and reaches
    # the turn, which finds it over the model's context (not refused for its size).
    messages = [{"role": "user", "content": "x" * 900_000} for _ in range(3)]
    status, _, body = await post(v1, {"model": DEFAULT_MODEL, "messages": messages})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert body["error"]["param"] == "messages"
    status, _, body = await post(v1, b'{"model": "' + b"x" * (5 * 1024 * 1024) + b'"}')
    assert status == 413 and body["error"]["code"] == "body_too_large"
    assert (await v1.ledger.balances(v1.user_id)).available == TON


async def test_cors_for_browser_clients(v1_server: ApiFactory) -> None:
    v1 = await v1_server(api_cors_origins=["https://app.example"])
    async with aiohttp.ClientSession() as session:
        preflight = {
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        }
        async with session.options(v1.base_url + "/chat/completions", headers=preflight) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
            assert "POST" in r.headers["Access-Control-Allow-Methods"]
        async with session.get(
            v1.base_url + "/models", headers={"Origin": "https://app.example"}
        ) as r:
            assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert "X-Request-Id" in r.headers["Access-Control-Expose-Headers"]
        async with session.get(
            v1.base_url + "/models", headers={"Origin": "https://evil.example"}
        ) as r:
            assert "Access-Control-Allow-Origin" not in r.headers


async def test_health_and_one_model(v1: Api) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(v1.base_url.removesuffix("/v1") + "/health") as r:
            assert r.status == 200
            assert await r.json() == {"status": "ok", "models": {DEFAULT_MODEL: False}}
    client = v1.client()
    model = await client.models.retrieve(DEFAULT_MODEL)
    assert model.id == DEFAULT_MODEL and model.model_extra["context_length"] > 0
    with pytest.raises(openai.NotFoundError) as refused:
        await client.models.retrieve("gpt-17")
    assert refused.value.code == "model_not_found"


async def test_null_means_the_default(v1: Api) -> None:
    nulls = {
        "temperature": None,
        "top_p": None,
        "n": None,
        "stream": None,
        "stop": None,
        "max_tokens": None,
        "presence_penalty": None,
        "logit_bias": None,
        "response_format": None,
        "tools": None,
        "user": None,
    }
    status, _, body = await post(v1, {"model": DEFAULT_MODEL, "messages": HI, **nulls})
    assert status == 503 and body["error"]["code"] == "no_worker"  # it got past validation


async def test_what_is_honoured_gets_through(v1: Api) -> None:
    honoured = {
        "presence_penalty": 0.5,
        "frequency_penalty": -1,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "n", "schema": {"type": "object"}, "strict": True},
        },
        "logprobs": False,
        "logit_bias": {"17": -5, "42": 100},
    }
    status, _, body = await post(v1, {"model": DEFAULT_MODEL, "messages": HI, **honoured})
    assert status == 503 and body["error"]["code"] == "no_worker"  # it got past validation
    tool_round_trip = [
        *HI,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]
    prefill = [*HI, {"role": "assistant", "content": "Once upon"}]  # continued, not refused
    status, _, body = await post(v1, {"model": DEFAULT_MODEL, "messages": prefill})
    assert status == 503 and body["error"]["code"] == "no_worker"
    for choice in ("auto", "required", "none", {"type": "function", "function": {"name": "f"}}):
        status, _, body = await post(
            v1,
            {
                "model": DEFAULT_MODEL,
                "messages": tool_round_trip,
                "tools": [TOOL],
                "tool_choice": choice,
            },
        )
        assert status == 503 and body["error"]["code"] == "no_worker"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "nonsense"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": BIG}}},
            "response_format.json_schema",
        ),
        (
            {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}},
            "tool_choice",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name"}}]},
            "tools.0.function.name",
        ),
        ({"functions": [{"name": "f"}]}, "functions"),
        (
            {"messages": [*HI, {"role": "function", "name": "f", "content": "1"}]},
            "messages[1].role",
        ),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"logit_bias": {"50256": -101}}, "logit_bias"),
        ({"logit_bias": {str(n): 1 for n in range(301)}}, "logit_bias"),
        ({"n": 2}, "n"),
        (
            {
                "messages": [
                    *HI,
                    {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]},
                    {"role": "user", "content": "and?"},
                ]
            },
            "messages.1.tool_calls.0.function",
        ),
    ],
)
async def test_what_cannot_be_honoured_is_refused_by_name(
    v1: Api, extra: dict[str, Any], param: str
) -> None:
    client = v1.client()
    body: dict[str, Any] = {"model": DEFAULT_MODEL, "messages": HI, **extra}
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(**body)
    assert refused.value.param == param
    assert param.split("[")[0].split(".")[0] in refused.value.message
    assert (await v1.ledger.balances(v1.user_id)).available == TON


async def test_a_keys_rate_and_concurrency_limits_answer_429(v1_server: ApiFactory) -> None:
    v1 = await v1_server(api_rate_limit_per_key_per_minute=2, api_max_concurrent_per_key=1)
    for _ in range(2):
        status, _, _ = await post(v1, {"model": DEFAULT_MODEL, "messages": HI})
        assert status == 503  # no worker: but counted against the key's minute
    status, headers, body = await post(v1, {"model": DEFAULT_MODEL, "messages": HI})
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(headers["Retry-After"]) <= 60
    # Another key of the same user has its own budget, but the user's turns at once are shared.
    other = await v1.new_key()
    redis = aioredis.Redis.from_url(v1.settings.redis_url)
    try:
        running = ConcurrencyLimiter(redis, 1, lease_s=60)
        assert await running.acquire(key_subject(other), "a-turn-in-flight")
        status, headers, body = await post(v1, {"model": DEFAULT_MODEL, "messages": HI}, key=other)
        assert status == 429 and "at once" in body["error"]["message"]
        assert headers["Retry-After"] == "1"
        await running.release(key_subject(other), "a-turn-in-flight")
        status, _, _ = await post(v1, {"model": DEFAULT_MODEL, "messages": HI}, key=other)
        assert status == 503
    finally:
        await redis.aclose()


async def test_the_users_budget_is_shared_with_the_bot(v1_server: ApiFactory) -> None:
    v1 = await v1_server(rate_limit_per_minute=3)
    redis = aioredis.Redis.from_url(v1.settings.redis_url)
    try:
        bot = RateLimiter(redis, 3)
        for _ in range(3):
            assert await bot.allow(v1.user_id) == 0  # three turns in the chat
    finally:
        await redis.aclose()
    client = v1.client()
    with pytest.raises(openai.RateLimitError, match="shared by the bot"):
        await client.chat.completions.create(model=DEFAULT_MODEL, messages=HI)  # type: ignore[arg-type]


async def test_a_bad_or_reused_idempotency_key_is_refused(v1: Api) -> None:
    status, _, body = await post(
        v1, {"model": DEFAULT_MODEL, "messages": HI}, **{"Idempotency-Key": "k" * 300}
    )
    assert status == 400 and body["error"]["param"] == "Idempotency-Key"
    # A first request that failed (no worker, nothing billed) gives its key back: the retry
    # runs again rather than replaying the failure.
    for _ in range(2):
        status, _, body = await post(
            v1, {"model": DEFAULT_MODEL, "messages": HI}, **{"Idempotency-Key": "k-1"}
        )
        assert status == 503 and body["error"]["code"] == "no_worker"


async def test_a_stream_that_cannot_start_answers_its_real_status(v1: Api) -> None:
    # No worker: before any event the stream's status is still free, so it is the real one.
    status, headers, body = await post(
        v1, {"model": DEFAULT_MODEL, "messages": HI, "stream": True}, Origin="https://a.example"
    )
    assert status == 503 and body["error"]["code"] == "no_worker"
    assert headers["Content-Type"].startswith("application/json")
    assert headers["X-Request-Id"] and headers["Access-Control-Allow-Origin"] == "*"
    client = v1.client()
    with pytest.raises(openai.InternalServerError, match="no worker"):
        await client.chat.completions.create(model=DEFAULT_MODEL, messages=HI, stream=True)  # type: ignore[arg-type]
