"""The stack :mod:`bench.inference` measures: a dispatcher, ledger and database of its own, worker
nodes in processes of their own, the engine called directly beside it, the CPU both sides spend,
and the baselines that need a process or a database of their own."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

import nacl.public
import redis
import redis.asyncio as aioredis
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from backend.db import Database
from backend.dispatch import Dispatcher, TurnDone, TurnRequest, TurnText
from backend.ledger import Ledger, TurnUsage
from backend.settings import DEFAULT_MODEL, AttestationSettings, ModelPrice, Settings
from backend.users import get_or_create_user
from bench.inference_rows import print_table
from workers import registry
from workers.engines import GenerationRequest, TextDelta
from workers.jobs import aenqueue_job, job_id_for
from workers.registry import queue_name
from workers.wire import ChatMessage, JobRequest, SamplingParams, public_b64, seal_request

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
REDIS_URL = os.environ.get("COCOON_BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
POSTGRES_URL = os.environ.get(
    "COCOON_BENCH_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
FREE = "bench-free"
PRICED = "bench-priced"
PROMPT = "Write a long, detailed essay about the history of sailing ships."
USAGE = TurnUsage(  # what the settlement benchmarks bill for each turn
    model=PRICED,
    prompt_tokens=3,
    cached_prompt_tokens=0,
    completion_tokens=4,
    finish_reason="stop",
    worker_id="bench",
    tee="dev",
)
GREEDY = SamplingParams(temperature=0.0, top_p=1.0)


def noop() -> int:
    """The bare RQ baseline's job."""
    return 1


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
        self.chunks = 0  # stream chunks read, all turns together

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

    async def start_node(
        self, model: str, engine: str, *options: str, node_args: Sequence[str] = ()
    ) -> str:
        """A worker node of ``engine`` (``options``: its engine options; ``node_args``: more of
        the node's own arguments), registered and seen by the dispatcher."""
        worker_id = f"bench-{uuid.uuid4().hex[:8]}"
        command = [
            sys.executable, "-m", "workers.node", "--model", model, "--engine", engine,
            "--redis-url", self.redis_url, "--worker-id", worker_id, "--capacity", "64",
            "--log-level", "WARNING", *node_args,
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

    def cpu_s(self) -> tuple[float, float]:
        """CPU seconds spent so far (user + system): by this process (the dispatcher, the
        reader, an engine called directly) and by the running nodes together."""
        nodes = 0.0
        for node in self.nodes:
            with open(f"/proc/{node.pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            nodes += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        return time.process_time(), nodes

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
            if isinstance(event, TurnText):
                self.chunks += 1
                if not first:
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


def bare_rq(redis_url: str, jobs: int) -> float:
    from rq import Queue

    connection = redis.Redis.from_url(redis_url)
    queue = Queue("bench-bare", connection=connection)
    queue.empty()
    for _ in range(jobs):
        queue.enqueue("bench.inference_stack.noop")
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


Section = Callable[["Bench", argparse.Namespace], Awaitable[None]]
"""One section of a bench: run on a fresh :class:`Bench`, with the parsed arguments."""


async def run_sections(parser: argparse.ArgumentParser, sections: Mapping[str, Section]) -> None:
    """The benches' ``main``: ``--only`` (the ``sections``, in their order), ``--db``,
    ``--redis-url`` and ``--postgres-url`` added to ``parser``; every chosen section on every
    chosen database (PostgreSQL: a database of the bench's own, dropped at the end), each
    database with a :class:`Bench` of its own; then the table of rows, with the load."""
    names = list(sections)
    parser.add_argument(
        "--only",
        type=lambda value: value.split(","),
        default=names,
        help=f"sections to run, comma-separated: {','.join(names)} (default: all)",
    )
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--redis-url", default=REDIS_URL)
    parser.add_argument("--postgres-url", default=POSTGRES_URL)
    args = parser.parse_args()
    if unknown := set(args.only) - set(names):
        parser.error(f"no such section: {', '.join(sorted(unknown))}")
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"load average {load}, {os.cpu_count()} CPUs")
    for database in ["sqlite", "postgresql"] if args.db == "both" else [args.db]:
        with tempfile.TemporaryDirectory() as workdir:
            url = await fresh_postgres(args.postgres_url) if database == "postgresql" else None
            try:
                async with Bench(args.redis_url, Path(workdir), url) as bench:
                    for name, section in sections.items():
                        if name in args.only:
                            await section(bench, args)
            finally:
                if url is not None:
                    await drop_postgres(args.postgres_url, url)
    print_table(load)


class _Gathered:
    """Stands in for an asyncio Redis client to :func:`workers.jobs.aenqueue_job`: its enqueues
    pile up in one MULTI/EXEC, sent by :meth:`send` (the jobs arrive at once, as enqueued in
    advance)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.pipe = client.pipeline(transaction=True)

    async def info(self, section: str) -> object:
        return await self.client.info(section)

    def pipeline(self, transaction: bool = True) -> _Gathered:
        return self

    def __getattr__(self, name: str) -> object:
        return getattr(self.pipe, name)

    async def execute(self) -> list[object]:
        return []

    async def send(self) -> None:
        await self.pipe.execute()


async def node_alone(bench: Bench, model: str, worker_id: str, jobs: int) -> float:
    """Jobs/s of one node alone, as the bare RQ baseline's: ``jobs`` sealed 3-token turns put
    in its queue at once (one MULTI/EXEC), the time until RQ counts them all finished."""
    client = bench.dispatcher.redis
    info = await registry.get_worker(client, worker_id)
    assert info is not None, "the node is not registered"
    reply = public_b64(nacl.public.PrivateKey.generate())
    gathered = _Gathered(client)
    prefix = uuid.uuid4().hex[:8]
    for i in range(jobs):
        job_id = job_id_for(worker_id, f"alone{prefix}", i)
        request = JobRequest(
            job_id=job_id,
            model=model,
            messages=[ChatMessage(role="user", content="one two three")],
            sampling=GREEDY,
            max_tokens=3,
            reply_key=reply,
        )
        sealed = seal_request(request, info.box_public_key)
        # The stand-in takes the client's place: the enqueue's commands join the MULTI.
        await aenqueue_job(gathered, worker_id, job_id, sealed, timeout_s=600, ttl_s=600)  # type: ignore[arg-type]
    queue = queue_name(worker_id)
    done = [f"rq:finished:{queue}", f"rq:failed:{queue}"]
    before = sum([await client.zcard(key) for key in done])
    started = time.perf_counter()
    await gathered.send()
    while sum([await client.zcard(key) for key in done]) - before < jobs:  # noqa: ASYNC110
        await asyncio.sleep(0.005)
    return jobs / (time.perf_counter() - started)
