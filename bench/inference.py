"""Benchmarks of the inference path, run by hand; every figure is a ratio against a baseline
measured in the same run, on the same machine.

    .venv/bin/python -m bench.inference            # all three
    .venv/bin/python -m bench.inference --only ttft --samples 100

1. **TTFT overhead** at concurrency 1: time to first token through the stack (dispatcher →
   seal → RQ queue → worker node process → sealed stream → decrypt) minus the engine's own,
   p50 and p99. With the instant engine (no model) the difference is the stack's own cost; with
   llama-cpp both are shown.
2. **Streaming efficiency**: completion tokens/s through the stack ÷ the same engine called
   directly, at concurrency 1 and 32 (llama-cpp, SmolLM2-135M; the engine serializes
   generations, so 32 at once measures the stack's overhead under load).
3. **Queue throughput** with the instant engine: turns/s through the stack at 64 in flight,
   against one bare RQ SimpleWorker running trivial jobs (enqueued in advance, burst mode).
   Shown for a free model (the queue path alone) and a priced one (plus hold and settlement).

Needs Redis (``COCOON_BENCH_REDIS_URL``, default ``redis://127.0.0.1:6379/12``, flushed).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis
import redis.asyncio as aioredis

from backend.db import Database
from backend.dispatch import Dispatcher, TurnDone, TurnRequest, TurnText
from backend.ledger import Ledger
from backend.settings import DEFAULT_MODEL, AttestationSettings, ModelPrice, Settings
from backend.users import get_or_create_user
from workers import registry
from workers.engines import GenerationRequest, TextDelta, create_engine
from workers.wire import ChatMessage, SamplingParams

REDIS_URL = "redis://127.0.0.1:6379/12"
FREE = "bench-free"
PRICED = "bench-priced"
PROMPT = "Write a long, detailed essay about the history of sailing ships."
GREEDY = SamplingParams(temperature=0.0, top_p=1.0)


def noop() -> int:
    """The bare RQ baseline's job."""
    return 1


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.2f} ms"


class Bench:
    def __init__(self, redis_url: str, workdir: Path) -> None:
        self.redis_url = redis_url
        price = ModelPrice(prompt=1_000, completion=1_000, context_length=2048)
        free = ModelPrice(prompt=0, completion=0, context_length=2048)
        self.settings = Settings(
            _env_file=None,
            data_dir=workdir,
            redis_url=redis_url,
            models={DEFAULT_MODEL: price, FREE: free, PRICED: price},
            # The bench's nodes register directly, as development (unattested) workers.
            attestation=AttestationSettings(allow_dev=True),
        )
        self.nodes: list[subprocess.Popen[bytes]] = []

    async def __aenter__(self) -> Bench:
        redis.Redis.from_url(self.redis_url).flushdb()
        self.db = Database.from_settings(self.settings)
        await self.db.upgrade()
        self.ledger = Ledger(self.db)
        self.dispatcher = Dispatcher(
            self.settings,
            self.ledger,
            aioredis.Redis.from_url(self.redis_url, max_connections=256),
        )
        user = await get_or_create_user(self.db, 1)
        await self.ledger.credit_deposit(user.id, 10**18, "bench")
        self.user = user.id
        return self

    async def __aexit__(self, *_exc: object) -> None:
        for node in self.nodes:
            node.terminate()
            node.wait(timeout=40)
        await self.dispatcher.close()
        await self.db.close()

    def start_node(self, model: str, engine: str, *options: str) -> str:
        worker_id = f"bench-{uuid.uuid4().hex[:8]}"
        command = [
            sys.executable, "-m", "workers.node", "--model", model, "--engine", engine,
            "--redis-url", self.redis_url, "--worker-id", worker_id, "--capacity", "64",
            "--log-level", "WARNING",
        ]  # fmt: skip
        for option in options:
            command += ["--engine-option", option]
        self.nodes.append(subprocess.Popen(command, stdin=subprocess.DEVNULL))
        client = redis.Redis.from_url(self.redis_url)
        deadline = time.monotonic() + 120
        while not client.exists(registry.worker_key(worker_id)):
            if time.monotonic() > deadline:
                raise SystemExit("worker node did not start")
            time.sleep(0.1)
        return worker_id

    def stop_nodes(self) -> None:
        for node in self.nodes:
            node.terminate()
            node.wait(timeout=40)
        self.nodes.clear()

    def request(self, model: str, text: str, max_tokens: int) -> TurnRequest:
        return TurnRequest(
            self.user,
            model,
            [ChatMessage(role="user", content=text)],
            max_tokens=max_tokens,
            sampling=GREEDY,
        )

    async def turn(self, model: str, text: str, max_tokens: int) -> tuple[float, float, int]:
        """(time to first token, total time, completion tokens) of one turn via the stack."""
        started = time.perf_counter()
        first = 0.0
        turn = await self.dispatcher.start_turn(self.request(model, text, max_tokens))
        tokens = 0
        async for event in turn.events():
            if isinstance(event, TurnText) and not first:
                first = time.perf_counter() - started
            elif isinstance(event, TurnDone):
                tokens = event.completion_tokens
        return first, time.perf_counter() - started, tokens


async def direct(engine: object, text: str, max_tokens: int) -> tuple[float, float, int]:
    """The same numbers from the engine called directly, in this process."""
    started = time.perf_counter()
    first = 0.0
    tokens = 0
    request = GenerationRequest(
        messages=[{"role": "user", "content": text}], max_tokens=max_tokens, temperature=0.0
    )
    async for item in engine.generate(request):  # type: ignore[attr-defined]
        if isinstance(item, TextDelta):
            if not first:
                first = time.perf_counter() - started
        else:
            tokens = item.completion_tokens
    return first, time.perf_counter() - started, tokens


async def bench_ttft(bench: Bench, samples: int) -> None:
    print("\n== 1. time-to-first-token overhead, concurrency 1")
    bench.start_node(FREE, "instant")
    engine = create_engine("instant", FREE)
    await engine.start()
    for _ in range(10):  # warm up connections and code paths
        await bench.turn(FREE, "warm up", 4)
    stack = [(await bench.turn(FREE, "hello there", 4))[0] for _ in range(samples)]
    alone = [(await direct(engine, "hello there", 4))[0] for _ in range(samples)]
    bench.stop_nodes()
    overhead = [s - statistics.median(alone) for s in stack]
    print(f"instant engine: engine alone p50 {ms(percentile(alone, 50))}")
    print(
        f"  stack TTFT p50 {ms(percentile(stack, 50))}  p99 {ms(percentile(stack, 99))}"
        f"  -> overhead p50 {ms(percentile(overhead, 50))} (target 5 ms)"
        f"  p99 {ms(percentile(overhead, 99))} (target 20 ms)"
    )

    bench.start_node(DEFAULT_MODEL, "llama-cpp")
    llama = create_engine("llama-cpp", DEFAULT_MODEL)
    await llama.start()
    n = max(10, samples // 10)
    await bench.turn(DEFAULT_MODEL, PROMPT, 1)
    await direct(llama, PROMPT, 1)
    stack = [(await bench.turn(DEFAULT_MODEL, PROMPT, 1))[0] for _ in range(n)]
    alone = [(await direct(llama, PROMPT, 1))[0] for _ in range(n)]
    await llama.close()
    bench.stop_nodes()
    print(
        f"llama-cpp ({n} each): engine alone p50 {ms(percentile(alone, 50))}"
        f" p99 {ms(percentile(alone, 99))}; stack p50 {ms(percentile(stack, 50))}"
        f" p99 {ms(percentile(stack, 99))}; difference of p50s"
        f" {ms(percentile(stack, 50) - percentile(alone, 50))}"
    )


async def bench_streaming(bench: Bench, tokens: int) -> None:
    print(f"\n== 2. streaming efficiency, llama-cpp, {tokens} tokens per turn")
    bench.start_node(DEFAULT_MODEL, "llama-cpp")
    llama = create_engine("llama-cpp", DEFAULT_MODEL)
    await llama.start()
    await bench.turn(DEFAULT_MODEL, PROMPT, 8)
    await direct(llama, PROMPT, 8)
    for concurrency in (1, 32):
        rounds = 3 if concurrency == 1 else 1

        async def many(run: object, concurrency: int = concurrency) -> float:
            started = time.perf_counter()
            results = await asyncio.gather(
                *(run() for _ in range(concurrency))  # type: ignore[operator]
            )
            elapsed = time.perf_counter() - started
            return sum(r[2] for r in results) / elapsed

        stack_rates, alone_rates = [], []
        for _ in range(rounds):
            alone_rates.append(await many(lambda: direct(llama, PROMPT, tokens)))
            stack_rates.append(await many(lambda: bench.turn(DEFAULT_MODEL, PROMPT, tokens)))
        stack_rate = statistics.median(stack_rates)
        alone_rate = statistics.median(alone_rates)
        target = 0.98 if concurrency == 1 else 0.95
        print(
            f"concurrency {concurrency:2d}: stack {stack_rate:6.1f} tok/s, engine alone"
            f" {alone_rate:6.1f} tok/s -> efficiency {stack_rate / alone_rate:.3f}"
            f" (target {target})"
        )
    await llama.close()
    bench.stop_nodes()


async def bench_queue(bench: Bench, jobs: int) -> None:
    print(f"\n== 3. queue throughput, instant engine, {jobs} turns, 64 in flight")
    baseline = bare_rq(bench.redis_url, jobs)
    print(f"bare RQ SimpleWorker: {baseline:7.1f} jobs/s")
    bench.start_node(FREE, "instant")
    bench.start_node(PRICED, "instant")
    for model, label in ((FREE, "queue path (free model)"), (PRICED, "with hold + settlement")):
        for _ in range(20):
            await bench.turn(model, "warm up", 2)
        semaphore = asyncio.Semaphore(64)

        async def one(model: str = model, semaphore: asyncio.Semaphore = semaphore) -> None:
            async with semaphore:
                await bench.turn(model, "one two three", 3)

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(jobs)))
        rate = jobs / (time.perf_counter() - started)
        print(f"stack, {label}: {rate:7.1f} turns/s -> {rate / baseline:.2f}x bare RQ (target 5x)")
    bench.stop_nodes()


def bare_rq(redis_url: str, jobs: int) -> float:
    from rq import Queue

    connection = redis.Redis.from_url(redis_url)
    queue = Queue("bench-bare", connection=connection)
    queue.empty()
    for _ in range(jobs):
        queue.enqueue("bench.inference.noop")
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "rq.cli", "worker", "--burst", "--quiet", "-w",
         "rq.worker.SimpleWorker", "--url", redis_url, "bench-bare"],
        check=True,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    connection.close()
    return jobs / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["ttft", "streaming", "queue"])
    parser.add_argument("--redis-url", default=REDIS_URL)
    parser.add_argument("--samples", type=int, default=200, help="TTFT samples")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per streaming turn")
    parser.add_argument("--jobs", type=int, default=2000, help="queue benchmark turns")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        async with Bench(args.redis_url, Path(workdir)) as bench:
            if args.only in (None, "ttft"):
                await bench_ttft(bench, args.samples)
            if args.only in (None, "streaming"):
                await bench_streaming(bench, args.tokens)
            if args.only in (None, "queue"):
                await bench_queue(bench, args.jobs)


if __name__ == "__main__":
    asyncio.run(main())
