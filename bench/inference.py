"""Benchmarks of the inference path and the money path, run by hand; every figure is printed
beside its baseline, measured in the same run on the same machine, and the goal of issue 19.

    .venv/bin/python -m bench.inference                        # everything, SQLite and PostgreSQL
    .venv/bin/python -m bench.inference --only ttft,http --samples 100 --db postgresql

1. **Added TTFT** at concurrency 1: time to first token through the stack (hold → pick and
   reserve a worker → seal → RQ queue → worker node process → sealed stream → open) minus the
   engine's own, p50 and p99, for a free and a priced model (the hold included); with the
   instant engine (no model) the difference is the stack's own cost; with llama-cpp (priced).
2. **Streaming efficiency**: completion tokens/s through the stack ÷ the same engine called
   directly, at concurrency 1 and 32 (llama-cpp, SmolLM2-135M; the engine serializes
   generations, so 32 at once measures the stack's overhead under load), and the CPU a token
   costs each way (this process as the backend, the node with its engine; ``/proc`` times).
   **Coalescing** (section ``coalesce``): the instant engine at 2,000 tokens/s, the node's
   ``--stream-coalesce-ms`` at its default 2 ms against 0: entries a turn, tokens/s, CPU a token.
3. **Queue throughput** with the instant engine: turns/s through the stack at 64 in flight,
   against one bare RQ SimpleWorker running trivial jobs (enqueued in advance, burst mode).
   Shown for a free model (the queue path alone) and a priced one (plus hold and settlement),
   and for the node alone: sealed jobs put in its queue at once, as the baseline's are, until
   RQ counts them finished (what the node itself keeps up with, the backend aside).
4. **Through the HTTP API**: TTFT of a streamed ``/v1/chat/completions`` (API key check, hold,
   dispatch, SSE) with the instant engine and a priced model, minus the same client's TTFT
   reading a bare aiohttp SSE endpoint on loopback.
5. **Settlements per second**: holds settled (each its own idempotent ledger transaction, a
   turn record with it), 16 at once, against the database's own rate of one-row commits.

Each section runs on every database of ``--db`` (the SQLite file of a temporary folder, and
``COCOON_BENCH_POSTGRES_URL``'s server, in a database of the bench's own, dropped at the end).
Needs Redis (``COCOON_BENCH_REDIS_URL``, default ``redis://127.0.0.1:6379/12``, flushed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web
from sqlalchemy import text

from backend.apikeys import create_key
from backend.settings import DEFAULT_MODEL
from bench.inference_rows import ROWS, ms, p50_p99, percentile, row
from bench.inference_stack import (
    FREE,
    PRICED,
    PROMPT,
    USAGE,
    Bench,
    bare_rq,
    direct,
    node_alone,
    run_sections,
)
from workers.engines import create_engine

__all__ = ["ROWS", "main"]


async def bench_ttft(bench: Bench, samples: int) -> None:
    db = bench.db_name
    print(f"\n== 1. time-to-first-token overhead, concurrency 1 ({db})")
    engine = create_engine("instant", FREE)
    await engine.start()
    for model, label in ((FREE, "free model"), (PRICED, "priced model, hold included")):
        await bench.start_node(model, "instant")
        for _ in range(10):  # warm up connections and code paths
            await bench.turn(model, "warm up", 4)
        stack = [(await bench.turn(model, "hello there", 4))[0] for _ in range(samples)]
        alone = [(await direct(engine, "hello there", 4))[0] for _ in range(samples)]
        bench.stop_nodes()
        overhead = [s - statistics.median(alone) for s in stack]
        print(
            f"instant engine, {label}: engine alone p50 {ms(percentile(alone, 50))};"
            f" stack TTFT p50 {ms(percentile(stack, 50))} p99 {ms(percentile(stack, 99))}"
            f" -> added p50 {ms(percentile(overhead, 50))} p99 {ms(percentile(overhead, 99))}"
        )
        row(
            f"added TTFT, instant engine, c=1, {label}",
            db,
            p50_p99(overhead),
            f"engine alone {p50_p99(alone)}",
            "p50 <= 1.5 ms, p99 <= 4 ms (priced, PostgreSQL)",
        )

    await bench.start_node(DEFAULT_MODEL, "llama-cpp")
    llama = create_engine("llama-cpp", DEFAULT_MODEL)
    await llama.start()
    n = max(10, samples // 10)
    await bench.turn(DEFAULT_MODEL, PROMPT, 1)
    await direct(llama, PROMPT, 1)
    stack = [(await bench.turn(DEFAULT_MODEL, PROMPT, 1))[0] for _ in range(n)]
    alone = [(await direct(llama, PROMPT, 1))[0] for _ in range(n)]
    await llama.close()
    bench.stop_nodes()
    added = percentile(stack, 50) - percentile(alone, 50)
    print(
        f"llama-cpp, priced ({n} each): engine alone p50 {ms(percentile(alone, 50))}"
        f" p99 {ms(percentile(alone, 99))}; stack p50 {ms(percentile(stack, 50))}"
        f" p99 {ms(percentile(stack, 99))}; difference of p50s {ms(added)}"
    )
    row(
        "added TTFT, llama.cpp, priced (difference of p50s)",
        db,
        f"{added * 1000:.2f} ms",
        f"engine alone {p50_p99(alone)}",
        "<= 3 ms on PostgreSQL",
    )


Run = Callable[[], Awaitable[tuple[float, float, int]]]


async def measure(bench: Bench, concurrency: int, run: Run) -> tuple[float, float, float]:
    """``concurrency`` runs at once: (completion tokens/s, CPU ms per token spent by this
    process, CPU ms per token spent by the nodes)."""
    own, nodes = bench.cpu_s()
    started = time.perf_counter()
    results = await asyncio.gather(*(run() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    own_after, nodes_after = bench.cpu_s()
    tokens = max(1, sum(r[2] for r in results))
    return (
        tokens / elapsed,
        (own_after - own) * 1000 / tokens,
        (nodes_after - nodes) * 1000 / tokens,
    )


async def bench_streaming(bench: Bench, tokens: int) -> None:
    """Tokens/s through the stack against the engine alone, and the CPU each spends a token
    (the engine alone: this process, the node idle; the stack: this process as the backend,
    and the node with its engine)."""
    db = bench.db_name
    print(f"\n== 2. streaming efficiency, llama-cpp, {tokens} tokens per turn ({db})")
    await bench.start_node(DEFAULT_MODEL, "llama-cpp")
    llama = create_engine("llama-cpp", DEFAULT_MODEL)
    await llama.start()
    await bench.turn(DEFAULT_MODEL, PROMPT, 8)
    await direct(llama, PROMPT, 8)
    for concurrency in (1, 32):
        stack, alone = [], []
        for _ in range(3 if concurrency == 1 else 1):
            alone.append(await measure(bench, concurrency, lambda: direct(llama, PROMPT, tokens)))
            stack.append(
                await measure(bench, concurrency, lambda: bench.turn(DEFAULT_MODEL, PROMPT, tokens))
            )
        stack_rate = statistics.median(s[0] for s in stack)
        alone_rate = statistics.median(a[0] for a in alone)
        backend_cpu = statistics.median(s[1] for s in stack)
        node_cpu = statistics.median(s[2] for s in stack)
        alone_cpu = statistics.median(a[1] + a[2] for a in alone)
        target = 0.98 if concurrency == 1 else 0.95
        print(
            f"concurrency {concurrency:2d}: stack {stack_rate:6.1f} tok/s, engine alone"
            f" {alone_rate:6.1f} tok/s -> efficiency {stack_rate / alone_rate:.3f}"
            f" (target {target}); CPU per token: engine alone {alone_cpu:.2f} ms, stack"
            f" {backend_cpu + node_cpu:.2f} ms (backend {backend_cpu:.2f}, node {node_cpu:.2f})"
        )
        row(
            f"streaming efficiency, c={concurrency} (stack / engine alone)",
            db,
            f"{stack_rate / alone_rate:.3f} ({stack_rate:.1f} tok/s)",
            f"engine alone {alone_rate:.1f} tok/s",
            f">= {target}",
        )
        row(
            f"CPU per token, llama.cpp, c={concurrency} (backend + node with its engine)",
            db,
            f"{backend_cpu + node_cpu:.2f} ms ({backend_cpu:.2f} + {node_cpu:.2f})",
            f"engine alone {alone_cpu:.2f} ms",
            "the stack adds little to the engine's own",
        )
    await llama.close()
    bench.stop_nodes()


COALESCE_TOKEN_DELAY_S = 0.0005
"""The instant engine's pace in the coalescing section: 2,000 tokens/s, a fast GPU's."""


async def bench_coalesce(bench: Bench, tokens: int) -> None:
    """Chunk coalescing (``--stream-coalesce-ms``) with a fast engine: entries per turn, tokens/s
    and CPU per token with the default 2 ms against 0 ms (no waiting), in the same run."""
    db = bench.db_name
    rate = round(1 / COALESCE_TOKEN_DELAY_S)
    print(f"\n== 2b. chunk coalescing, instant engine at {rate} tok/s, {tokens} tokens ({db})")
    words = " ".join(f"w{i}" for i in range(tokens))
    seen: dict[tuple[str, int], tuple[float, float, float]] = {}
    for coalesce_ms in ("0", "2"):
        await bench.start_node(
            FREE,
            "instant",
            f"token_delay={COALESCE_TOKEN_DELAY_S}",
            node_args=("--stream-coalesce-ms", coalesce_ms),
        )
        for _ in range(3):
            await bench.turn(FREE, words, tokens)
        for concurrency in (1, 32):
            bench.chunks = 0
            speed, own, nodes = await measure(
                bench, concurrency, lambda: bench.turn(FREE, words, tokens)
            )
            entries = bench.chunks / concurrency
            seen[coalesce_ms, concurrency] = (speed, entries, own + nodes)
            print(
                f"coalesce {coalesce_ms} ms, c={concurrency:2d}: {speed:7.0f} tok/s,"
                f" {entries:5.1f} entries a turn, CPU {own + nodes:.3f} ms a token"
                f" (backend {own:.3f}, node {nodes:.3f})"
            )
        bench.stop_nodes()
    for concurrency in (1, 32):
        now, before = seen["2", concurrency], seen["0", concurrency]
        row(
            f"chunk coalescing 2 ms, instant engine at {rate} tok/s, c={concurrency}",
            db,
            f"{now[1]:.0f} entries/turn, {now[0]:.0f} tok/s, CPU {now[2]:.3f} ms/token",
            f"0 ms: {before[1]:.0f} entries/turn, {before[0]:.0f} tok/s,"
            f" CPU {before[2]:.3f} ms/token",
            "fewer entries and less CPU, no slower",
        )


async def bench_queue(bench: Bench, jobs: int) -> None:
    db = bench.db_name
    print(f"\n== 3. queue throughput, instant engine, {jobs} turns, 64 in flight ({db})")
    baseline = bare_rq(bench.redis_url, jobs)
    print(f"bare RQ SimpleWorker: {baseline:7.1f} jobs/s")
    alone = await bench.start_node(FREE, "instant")
    await bench.start_node(PRICED, "instant")
    goals = {FREE: ">= 5x", PRICED: ">= 3x on PostgreSQL"}
    rate = await node_alone(bench, FREE, alone, jobs)
    print(f"the node alone (jobs enqueued at once): {rate:7.1f} jobs/s -> {rate / baseline:.2f}x")
    row(
        "queue throughput, the node alone (its queue filled at once, as the baseline's)",
        db,
        f"{rate / baseline:.2f}x ({rate:.0f} jobs/s)",
        f"bare RQ SimpleWorker {baseline:.0f} jobs/s",
        ">= 5x (the free model's goal: the node's share of it)",
    )
    for model, label in ((FREE, "free model"), (PRICED, "with hold + settlement")):
        for _ in range(20):
            await bench.turn(model, "warm up", 2)
        semaphore = asyncio.Semaphore(64)

        async def one(model: str = model, semaphore: asyncio.Semaphore = semaphore) -> None:
            async with semaphore:
                await bench.turn(model, "one two three", 3)

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(jobs)))
        rate = jobs / (time.perf_counter() - started)
        print(f"stack, {label}: {rate:7.1f} turns/s -> {rate / baseline:.2f}x bare RQ")
        row(
            f"queue throughput, {label}",
            db,
            f"{rate / baseline:.2f}x ({rate:.0f} turns/s)",
            f"bare RQ SimpleWorker {baseline:.0f} jobs/s",
            goals[model],
        )
    bench.stop_nodes()


async def sse_ttft(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> float:
    """Seconds from sending a streamed chat completion to reading its first content delta."""
    body = {
        "model": PRICED,
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
    }
    started = time.perf_counter()
    first = 0.0
    async with session.post(url, json=body, headers=headers) as response:
        if response.status != 200:
            raise SystemExit(f"{url}: HTTP {response.status}: {await response.text()}")
        async for line in response.content:
            if not first and line.startswith(b"data: ") and b'"content"' in line:
                first = time.perf_counter() - started
    return first


async def bare_sse(_request: web.Request) -> web.StreamResponse:
    """The baseline: an aiohttp SSE endpoint that answers at once, the way the API streams."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(_request)
    await _request.read()
    for word in ("hello", " there"):
        chunk = json.dumps({"choices": [{"index": 0, "delta": {"content": word}}]})
        await response.write(f"data: {chunk}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    return response


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


async def bench_http(bench: Bench, samples: int) -> None:
    from backend.web import create_app

    db = bench.db_name
    print(f"\n== 4. added TTFT through the HTTP API, instant engine, priced model ({db})")
    key, _ = await create_key(bench.db, bench.user)
    await bench.start_node(PRICED, "instant")
    api_runner, api_url = await serve(create_app(bench.settings))
    bare_app = web.Application()
    bare_app.router.add_post("/v1/chat/completions", bare_sse)
    bare_runner, bare_url = await serve(bare_app)
    try:
        async with aiohttp.ClientSession() as session:
            api = f"{api_url}/v1/chat/completions"
            bare = f"{bare_url}/v1/chat/completions"
            headers = {"Authorization": f"Bearer {key}"}
            for _ in range(10):
                await sse_ttft(session, api, headers)
                await sse_ttft(session, bare, headers)
            through, floor = [], []
            for _ in range(samples):  # interleaved: both see the same load
                through.append(await sse_ttft(session, api, headers))
                floor.append(await sse_ttft(session, bare, headers))
    finally:
        await api_runner.cleanup()
        await bare_runner.cleanup()
        bench.stop_nodes()
    added = [t - statistics.median(floor) for t in through]
    print(f"API TTFT {p50_p99(through)}; bare SSE {p50_p99(floor)} -> added {p50_p99(added)}")
    row(
        "added TTFT through the HTTP API (key, hold, dispatch, SSE), priced",
        db,
        p50_p99(added),
        f"bare aiohttp SSE {p50_p99(floor)}",
        "p50 <= 2 ms, p99 <= 6 ms",
    )


async def bench_settlements(bench: Bench, count: int) -> None:
    """Holds settled with their turn records, 16 at a time, against bare one-row commits."""
    db = bench.db_name
    print(f"\n== 5. settlements per second, {count} holds, 16 at once ({db})")
    engine = bench.db.engine
    async with engine.begin() as connection:
        await connection.execute(text("CREATE TABLE IF NOT EXISTS bench_commit (id INTEGER)"))
    semaphore = asyncio.Semaphore(16)

    async def commit_one(i: int) -> None:
        async with semaphore, engine.begin() as connection:
            await connection.execute(text("INSERT INTO bench_commit (id) VALUES (:i)"), {"i": i})

    started = time.perf_counter()
    await asyncio.gather(*(commit_one(i) for i in range(count)))
    bare = count / (time.perf_counter() - started)
    run = uuid.uuid4().hex[:8]
    keys = [f"bench-{run}-{i}" for i in range(count)]
    for key in keys:
        await bench.ledger.hold(bench.user, 10_000, key)

    async def settle_one(key: str) -> None:
        async with semaphore:
            await bench.ledger.settle(key, 7_000, provider_id=None, share_bps=7000, usage=USAGE)

    started = time.perf_counter()
    await asyncio.gather(*(settle_one(key) for key in keys))
    rate = count / (time.perf_counter() - started)
    print(f"settlements {rate:7.1f}/s; bare one-row commits {bare:7.1f}/s")
    row(
        "settlements per second (each its own ledger transaction)",
        db,
        f"{rate:.0f}/s ({rate / bare:.2f}x bare commits)",
        f"bare one-row commits {bare:.0f}/s",
        "keeps up with the queue (row above); batched on PostgreSQL",
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=200, help="TTFT samples")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per streaming turn")
    parser.add_argument("--jobs", type=int, default=2000, help="queue benchmark turns")
    parser.add_argument("--settlements", type=int, default=2000)
    await run_sections(
        parser,
        {
            "ttft": lambda bench, args: bench_ttft(bench, args.samples),
            "streaming": lambda bench, args: bench_streaming(bench, args.tokens),
            "coalesce": lambda bench, args: bench_coalesce(bench, 4 * args.tokens),
            "queue": lambda bench, args: bench_queue(bench, args.jobs),
            "http": lambda bench, args: bench_http(bench, args.samples),
            "settlements": lambda bench, args: bench_settlements(bench, args.settlements),
        },
    )


if __name__ == "__main__":
    asyncio.run(main())
