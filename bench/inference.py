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
   generations, so 32 at once measures the stack's overhead under load).
3. **Queue throughput** with the instant engine: turns/s through the stack at 64 in flight,
   against one bare RQ SimpleWorker running trivial jobs (enqueued in advance, burst mode).
   Shown for a free model (the queue path alone) and a priced one (plus hold and settlement).
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
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import redis
import redis.asyncio as aioredis
from aiohttp import web
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from backend.apikeys import create_key
from backend.db import Database
from backend.dispatch import Dispatcher, TurnDone, TurnRequest, TurnText
from backend.ledger import Ledger
from backend.settings import DEFAULT_MODEL, AttestationSettings, ModelPrice, Settings
from backend.users import get_or_create_user
from workers import registry
from workers.engines import GenerationRequest, TextDelta, create_engine
from workers.wire import ChatMessage, SamplingParams

REDIS_URL = os.environ.get("COCOON_BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
POSTGRES_URL = os.environ.get(
    "COCOON_BENCH_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
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


def p50_p99(values: list[float]) -> str:
    return f"p50 {percentile(values, 50) * 1000:.2f} ms, p99 {percentile(values, 99) * 1000:.2f} ms"


@dataclass(frozen=True)
class Row:
    """One line of the closing table: what, on which database, the figure, its baseline (from
    the same run) and the goal."""

    what: str
    db: str
    figure: str
    baseline: str
    goal: str


ROWS: list[Row] = []


def row(what: str, db: str, figure: str, baseline: str, goal: str) -> None:
    ROWS.append(Row(what, db, figure, baseline, goal))


def print_table(load: str) -> None:
    print(f"\n== the table (machine load average at the start: {load})")
    print("| what | db | now | baseline, same run | goal |")
    print("| --- | --- | --- | --- | --- |")
    for r in ROWS:
        print(f"| {r.what} | {r.db} | {r.figure} | {r.baseline} | {r.goal} |")
    for what, goal in NOT_MEASURED:
        print(f"| {what} | - | not measured by this bench yet | - | {goal} |")


NOT_MEASURED = [
    ("watcher crediting a 10,000-transaction backlog (local TON Center)", "<= 10 s on PostgreSQL"),
    (
        "1,000 simultaneous bot chats through the webhook, p99 handler time excl. inference",
        "<= 50 ms, no flood-limit breach",
    ),
]


class Bench:
    def __init__(self, redis_url: str, workdir: Path, database_url: str | None = None) -> None:
        self.redis_url = redis_url
        self.db_name = "postgresql" if database_url else "sqlite"
        price = ModelPrice(prompt=1_000, completion=1_000, context_length=2048)
        free = ModelPrice(prompt=0, completion=0, context_length=2048)
        self.settings = Settings(
            _env_file=None,
            data_dir=workdir,
            database_url=database_url,
            redis_url=redis_url,
            models={DEFAULT_MODEL: price, FREE: free, PRICED: price},
            # The bench's nodes register directly, as development (unattested) workers.
            attestation=AttestationSettings(allow_dev=True),
            # One user runs every turn of the bench: no per-minute limit gets in the way.
            rate_limit_per_minute=10**9,
            api_rate_limit_per_key_per_minute=1_000_000,
            # 32 llama-cpp turns at once wait for the engine's few slots, however slow the machine.
            api_queue_timeout_s=600,
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

    async def start_node(self, model: str, engine: str, *options: str) -> str:
        worker_id = f"bench-{uuid.uuid4().hex[:8]}"
        command = [
            sys.executable, "-m", "workers.node", "--model", model, "--engine", engine,
            "--redis-url", self.redis_url, "--worker-id", worker_id, "--capacity", "64",
            "--log-level", "WARNING",
        ]  # fmt: skip
        for option in options:
            command += ["--engine-option", option]
        self.nodes.append(subprocess.Popen(command, stdin=subprocess.DEVNULL))  # noqa: ASYNC220
        deadline = time.monotonic() + 120
        while not await self.dispatcher.redis.exists(registry.worker_key(worker_id)):
            if time.monotonic() > deadline:
                raise SystemExit("worker node did not start")
            await asyncio.sleep(0.1)
        await self.dispatcher.workers.refresh()  # the dispatcher sees it at once
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


async def bench_streaming(bench: Bench, tokens: int) -> None:
    db = bench.db_name
    print(f"\n== 2. streaming efficiency, llama-cpp, {tokens} tokens per turn ({db})")
    await bench.start_node(DEFAULT_MODEL, "llama-cpp")
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
        row(
            f"streaming efficiency, c={concurrency} (stack / engine alone)",
            db,
            f"{stack_rate / alone_rate:.3f} ({stack_rate:.1f} tok/s)",
            f"engine alone {alone_rate:.1f} tok/s",
            f">= {target}",
        )
    await llama.close()
    bench.stop_nodes()


async def bench_queue(bench: Bench, jobs: int) -> None:
    db = bench.db_name
    print(f"\n== 3. queue throughput, instant engine, {jobs} turns, 64 in flight ({db})")
    baseline = bare_rq(bench.redis_url, jobs)
    print(f"bare RQ SimpleWorker: {baseline:7.1f} jobs/s")
    await bench.start_node(FREE, "instant")
    await bench.start_node(PRICED, "instant")
    goals = {FREE: ">= 5x", PRICED: ">= 3x on PostgreSQL"}
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
    from backend.ledger import TurnUsage

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
    usage = TurnUsage(
        model=PRICED,
        prompt_tokens=3,
        cached_prompt_tokens=0,
        completion_tokens=4,
        finish_reason="stop",
        worker_id="bench",
        tee="dev",
    )

    async def settle_one(key: str) -> None:
        async with semaphore:
            await bench.ledger.settle(key, 7_000, provider_id=None, share_bps=7000, usage=usage)

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


async def fresh_postgres(url: str) -> str:
    """A database of the bench's own on ``url``'s server, made empty; its URL."""
    name = f"cocoon_bench_{os.getpid()}"
    admin = create_async_engine(url, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as connection:
            await connection.execute(text(f"DROP DATABASE IF EXISTS {name}"))
            await connection.execute(text(f"CREATE DATABASE {name}"))
    finally:
        await admin.dispose()
    return make_url(url).set(database=name).render_as_string(hide_password=False)


async def drop_postgres(admin_url: str, url: str) -> None:
    admin = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as connection:
            name = make_url(url).database
            await connection.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    finally:
        await admin.dispose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sections = ["ttft", "streaming", "queue", "http", "settlements"]
    parser.add_argument(
        "--only",
        type=lambda text: text.split(","),
        default=sections,
        help=f"sections to run, comma-separated: {','.join(sections)} (default: all)",
    )
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--redis-url", default=REDIS_URL)
    parser.add_argument("--postgres-url", default=POSTGRES_URL)
    parser.add_argument("--samples", type=int, default=200, help="TTFT samples")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per streaming turn")
    parser.add_argument("--jobs", type=int, default=2000, help="queue benchmark turns")
    parser.add_argument("--settlements", type=int, default=2000)
    args = parser.parse_args()
    if unknown := set(args.only) - set(sections):
        parser.error(f"no such section: {', '.join(sorted(unknown))}")
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"load average {load}, {os.cpu_count()} CPUs")
    databases = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    for database in databases:
        with tempfile.TemporaryDirectory() as workdir:
            url = await fresh_postgres(args.postgres_url) if database == "postgresql" else None
            try:
                async with Bench(args.redis_url, Path(workdir), url) as bench:
                    if "ttft" in args.only:
                        await bench_ttft(bench, args.samples)
                    if "streaming" in args.only:
                        await bench_streaming(bench, args.tokens)
                    if "queue" in args.only:
                        await bench_queue(bench, args.jobs)
                    if "http" in args.only:
                        await bench_http(bench, args.samples)
                    if "settlements" in args.only:
                        await bench_settlements(bench, args.settlements)
            finally:
                if url is not None:
                    await drop_postgres(args.postgres_url, url)
    print_table(load)


if __name__ == "__main__":
    asyncio.run(main())
