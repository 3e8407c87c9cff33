"""Log probabilities (``logprobs`` / ``top_logprobs``) through the official ``openai`` SDK
against ``cocoon web`` and a real worker node (llama.cpp, SmolLM2), plain and streamed, and the
bounds a worker's reply is held to on the wire."""

from __future__ import annotations

import math
from typing import Any

import openai
import pytest

from backend.bounds import ReplyBounds
from backend.settings import DEFAULT_MODEL
from backend.turns import TurnText
from tests.support.api import Api, settled_turns
from tests.support.env import require_module
from tests.support.turns import Node
from workers.stream_crypto import StreamSealer
from workers.wire import (
    MAX_LOGPROBS_PER_CHUNK,
    MAX_TOKEN_CHARS,
    MAX_TOP_LOGPROBS,
    WIRE_VERSION,
    SamplingParams,
    StreamChunk,
    TokenLogprob,
    TopLogprob,
    WorkerKeys,
    new_reply_keypair,
    public_b64,
)

require_module("llama_cpp")

HELLO = [{"role": "user", "content": "Say hello."}]


def _token(text: str = "a", logprob: float = -0.5, top: int = 0) -> dict[str, object]:
    alternative = {"token": text, "logprob": logprob, "bytes": list(text.encode())}
    return {**alternative, "top_logprobs": [alternative] * top}


def _chunk(logprobs: list[dict[str, object]]) -> dict[str, object]:
    return {
        "v": WIRE_VERSION,
        "type": "chunk",
        "job_id": "j1",
        "seq": 0,
        "text": "a",
        "logprobs": logprobs,
    }


@pytest.mark.parametrize(
    "logprobs",
    [
        [_token()] * (MAX_LOGPROBS_PER_CHUNK + 1),  # a flood of tokens in one chunk
        [_token(top=21)],  # more alternatives than anyone may ask for
        [_token(logprob=0.5)],  # a probability above 1
        [_token(logprob=-1e9)],  # below the floor (-inf is sent as -9999)
        [_token(text="x" * (MAX_TOKEN_CHARS + 1))],  # a token's text past its bound
        [{**_token(), "bytes": [256]}],  # not a byte
    ],
)
def test_a_worker_cannot_send_unbounded_logprobs(logprobs: list[dict[str, object]]) -> None:
    with pytest.raises(ValueError):
        StreamChunk.model_validate(_chunk(logprobs))


def test_the_largest_honest_records_fit_the_turns_bounds_only_when_asked() -> None:
    """Chunks of the most records, each with the most alternatives of the longest escaped text,
    sealed: within the stream reader's bounds of a turn that asked for them (one token's record
    each, 512 tokens); a worker sending them unasked is cut off by the reader."""
    worst = '"\x01' * (MAX_TOKEN_CHARS // 2)  # JSON-escaped to 2 and 6 bytes a character
    alternative = TopLogprob(token=worst, logprob=-1.2345678901234567, bytes=[255] * 64)
    record = TokenLogprob(**alternative.model_dump(), top_logprobs=[alternative] * 20)
    reply_key = public_b64(new_reply_keypair())

    def sealed(text: str) -> int:
        records = [record] * MAX_LOGPROBS_PER_CHUNK
        chunk = StreamChunk(job_id="j1", seq=0, text=text, logprobs=records)
        # The stream's first entry: the largest, with the worker's key and signature.
        return len(StreamSealer("j1", reply_key, WorkerKeys.generate()).seal(chunk))

    asked = ReplyBounds.for_max_tokens(512, logprobs=MAX_TOP_LOGPROBS)
    assert sealed("é" * 1000) <= asked.sealed_entry_bytes
    assert (512 // MAX_LOGPROBS_PER_CHUNK) * sealed("") <= asked.sealed_bytes
    assert (512 // MAX_LOGPROBS_PER_CHUNK) * sealed("") > ReplyBounds.for_max_tokens(
        512
    ).sealed_bytes


def test_a_turn_keeps_only_the_logprobs_it_asked_for() -> None:
    top = TopLogprob(token="b", logprob=-1.0, bytes=[98])
    token = TokenLogprob(token="a", logprob=-0.1, bytes=[97], top_logprobs=[top] * 5)
    chunk = StreamChunk(job_id="j1", seq=0, text="a", logprobs=[token])
    assert TurnText.of(chunk, SamplingParams()).logprobs == ()  # none asked: none passed on
    [kept] = TurnText.of(chunk, SamplingParams(logprobs=True, top_logprobs=2)).logprobs
    assert len(kept.top_logprobs) == 2
    with pytest.raises(ValueError):
        SamplingParams(top_logprobs=2)  # alternatives without logprobs


def _check_tokens(content: str, tokens: list[openai.types.chat.ChatCompletionTokenLogprob]) -> None:
    """Greedy tokens whose bytes spell the reply, each the likeliest of its alternatives."""
    assert tokens
    assert b"".join(bytes(t.bytes or []) for t in tokens).decode() == content
    for token in tokens:
        assert token.logprob <= 0
        assert len(token.top_logprobs) == 3
        best = token.top_logprobs[0]
        assert (best.token, best.logprob) == (token.token, token.logprob)  # temperature 0
        assert [t.logprob for t in token.top_logprobs] == sorted(
            (t.logprob for t in token.top_logprobs), reverse=True
        )
        assert sum(math.exp(t.logprob) for t in token.top_logprobs) <= 1.0 + 1e-3


@pytest.mark.engine
async def test_logprobs_plain_and_streamed(v1: Api, node: Node) -> None:
    client = v1.client(max_retries=openai.DEFAULT_MAX_RETRIES)
    asked: dict[str, Any] = {
        "model": DEFAULT_MODEL,
        "messages": HELLO,
        "max_tokens": 8,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 3,
    }
    reply = await client.chat.completions.create(**asked)
    choice = reply.choices[0]
    assert choice.message.content and choice.logprobs and choice.logprobs.content
    _check_tokens(choice.message.content, choice.logprobs.content)

    stream = await client.chat.completions.create(**asked, stream=True)  # the same, streamed
    text, streamed = "", []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
            streamed += chunk.choices[0].logprobs.content
    assert text == choice.message.content  # greedy: the same reply
    _check_tokens(text, streamed)
    assert [t.token for t in streamed] == [t.token for t in choice.logprobs.content]

    plain = await client.chat.completions.create(model=DEFAULT_MODEL, messages=HELLO, max_tokens=4)
    assert plain.choices[0].logprobs is None  # not asked: none

    for bad in ({"top_logprobs": 21, "logprobs": True}, {"top_logprobs": 2}):
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(
                model=DEFAULT_MODEL, messages=HELLO, max_tokens=4, **bad
            )
        assert "top_logprobs" in str(refused.value)


@pytest.mark.engine
async def test_a_kept_stream_is_replayed_with_its_logprobs(v1: Api, node: Node) -> None:
    client = v1.client()
    ask: dict[str, Any] = {
        "model": DEFAULT_MODEL,
        "messages": HELLO,
        "max_tokens": 6,
        "logprobs": True,
        "top_logprobs": 2,
        "stream": True,
        "extra_headers": {"Idempotency-Key": "logprobs-1"},
    }

    async def streamed() -> list[tuple[str, float]]:
        tokens = []
        async for chunk in await client.chat.completions.create(**ask):
            if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
                tokens += [(t.token, t.logprob) for t in chunk.choices[0].logprobs.content]
        return tokens

    first = await streamed()
    assert first
    assert await streamed() == first  # the kept reply, replayed
    assert len(await settled_turns(v1)) == 1  # billed once
