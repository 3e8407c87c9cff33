"""Prometheus metrics of the operator's processes: ``GET /metrics`` of ``cocoon web`` (on
``COCOON_METRICS_PORT``, or on the main port behind ``COCOON_METRICS_TOKEN``; never public by
default: it shows revenue and users' funds), and the
turn metrics of ``cocoon bot`` (long polling) on ``COCOON_BOT_METRICS_PORT`` (:func:`serve_turns`).

One :class:`~prometheus_client.CollectorRegistry` per process (made by :func:`setup`, never at
import time) holds two kinds of metrics:

- events, counted as they happen by the dispatcher (:class:`TurnMetrics`): turns by outcome,
  time to first token, turn duration, prompt and completion tokens, turn errors by code,
  bounds crossed by workers (``backend.bounds``) by kind;
- state, read from Redis and the database when Prometheus scrapes (:class:`StateCollector`):
  queue depth per model, workers online by TEE kind, open holds, deposits by status, payouts by
  state, and ledger balances summed by account kind. A source that cannot be read is reported
  by ``cocoon_state_up{source=...} 0`` and the scrape still answers.

Amounts are nanoTON. They are exported as Prometheus floats: exact up to 2^53 nanoTON
(about 9 million TON); larger totals lose their last digits on the dashboard, never in the
ledger.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from http.server import HTTPServer
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from redis.asyncio import Redis as AsyncRedis
from sqlalchemy import func, select

from backend import appkeys
from backend.db import Database
from backend.models import Account, Hold, HoldState, Payout, TonDeposit
from backend.sites import start_site

__all__ = [
    "OUTCOMES",
    "REGISTRY",
    "StateCollector",
    "StateSnapshot",
    "TurnMetrics",
    "TurnsEndpoint",
    "read_state",
    "render",
    "serve_turns",
    "setup",
    "start_endpoint",
]

log = logging.getLogger("cocoon.metrics")

OUTCOMES = ("settled", "cancelled", "released", "failed")
"""How a turn ends: settled (billed from the worker's usage), cancelled (stopped by the client,
billed for what was generated, or not at all), released (the hold went back without an error:
the client left before anything was generated), failed (an error; the hold went back)."""

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)

REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)


class TurnMetrics:
    """What the dispatcher counts. One per process, on the process's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.turns = Counter(
            "cocoon_turns", "Chat turns ended, by outcome", ["model", "outcome"], registry=registry
        )
        self.errors = Counter(
            "cocoon_turn_errors",
            "Turns refused before they ran (no worker, no funds, bad request), by TurnError code",
            ["code"],
            registry=registry,
        )
        self.first_token = Histogram(
            "cocoon_turn_first_token_seconds",
            "Time from the hold to the first token of the reply",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.duration = Histogram(
            "cocoon_turn_duration_seconds",
            "Time from the hold to the settlement or release",
            ["model", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "cocoon_turn_tokens",
            "Tokens of settled turns, from the workers' signed usage",
            ["model", "kind"],
            registry=registry,
        )
        self.charged = Counter(
            "cocoon_turn_charged_nano", "nanoTON charged for turns", ["model"], registry=registry
        )
        self.worker_flags = Counter(
            "cocoon_worker_flags",
            "Bounds crossed by workers: a count billed at its bound, or a reply cut off",
            ["model", "kind"],
            registry=registry,
        )

    def first_token_after(self, model: str, seconds: float) -> None:
        self.first_token.labels(model).observe(seconds)

    def ended(
        self,
        model: str,
        outcome: str,
        seconds: float,
        *,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        charged: int = 0,
    ) -> None:
        self.turns.labels(model, outcome).inc()
        self.duration.labels(model, outcome).observe(seconds)
        if prompt_tokens:
            self.tokens.labels(model, "prompt").inc(prompt_tokens)
        if completion_tokens:
            self.tokens.labels(model, "completion").inc(completion_tokens)
        if charged:
            self.charged.labels(model).inc(charged)

    def error(self, code: str) -> None:
        self.errors.labels(code).inc()

    def flagged(self, model: str, kind: str) -> None:
        self.worker_flags.labels(model, kind).inc()


# ------------------------------------------------------------------ state at scrape time


@dataclass
class StateSnapshot:
    """Everything the state gauges show, read in one go."""

    up: dict[str, bool] = field(default_factory=dict)
    queue_depth: dict[str, int] = field(default_factory=dict)  # model -> queued jobs
    workers: dict[tuple[str, str], int] = field(default_factory=dict)  # (model, tee) -> online
    worker_load: dict[str, int] = field(default_factory=dict)  # model -> jobs running
    worker_capacity: dict[str, int] = field(default_factory=dict)  # model -> capacity
    holds_open: tuple[int, int] = (0, 0)  # count, nanoTON
    deposits: dict[str, tuple[int, int]] = field(default_factory=dict)  # status -> count, nano
    payouts: dict[str, tuple[int, int]] = field(default_factory=dict)  # state -> count, nano
    balances: dict[str, int] = field(default_factory=dict)  # account kind -> sum of balances


async def read_redis_state(redis: AsyncRedis, snapshot: StateSnapshot) -> None:
    from workers import registry

    workers = await registry.list_workers(redis)
    depths = await registry.queued_jobs(redis, workers)
    queue: dict[str, int] = defaultdict(int)
    online: dict[tuple[str, str], int] = defaultdict(int)
    load: dict[str, int] = defaultdict(int)
    capacity: dict[str, int] = defaultdict(int)
    for info, depth in zip(workers, depths, strict=True):
        queue[info.model] += depth
        online[(info.model, info.tee)] += 1
        load[info.model] += info.load
        capacity[info.model] += info.capacity
    snapshot.queue_depth = dict(queue)
    snapshot.workers = dict(online)
    snapshot.worker_load = dict(load)
    snapshot.worker_capacity = dict(capacity)


async def read_db_state(db: Database, snapshot: StateSnapshot) -> None:
    async with db.session() as session:
        count, amount = (
            await session.execute(
                select(func.count(Hold.id), func.coalesce(func.sum(Hold.amount), 0)).where(
                    Hold.state == HoldState.OPEN
                )
            )
        ).one()
        snapshot.holds_open = (int(count), int(amount))
        rows = await session.execute(
            select(
                TonDeposit.status,
                func.count(TonDeposit.id),
                func.coalesce(func.sum(TonDeposit.amount), 0),
            ).group_by(TonDeposit.status)
        )
        snapshot.deposits = {str(s): (int(n), int(a)) for s, n, a in rows}
        rows = await session.execute(
            select(
                Payout.state, func.count(Payout.id), func.coalesce(func.sum(Payout.amount), 0)
            ).group_by(Payout.state)
        )
        snapshot.payouts = {str(s): (int(n), int(a)) for s, n, a in rows}
        balances = await session.execute(
            select(Account.kind, func.coalesce(func.sum(Account.balance), 0)).group_by(Account.kind)
        )
        snapshot.balances = {str(k): int(total) for k, total in balances}


async def read_state(db: Database | None, redis: AsyncRedis | None) -> StateSnapshot:
    """Read the state gauges' values; a source that fails is marked down, the rest still read."""
    snapshot = StateSnapshot()
    readers: dict[str, Callable[[], Awaitable[None]]] = {}
    if redis is not None:
        readers["redis"] = partial(read_redis_state, redis, snapshot)
    if db is not None:
        readers["database"] = partial(read_db_state, db, snapshot)
    for name, read in readers.items():
        try:
            await read()
            snapshot.up[name] = True
        except Exception as error:  # a scrape must answer even when a source is down
            log.warning("metrics: could not read %s: %s", name, type(error).__name__)
            snapshot.up[name] = False
    return snapshot


class StateCollector(Collector):
    """Yields the last snapshot as gauges (the /metrics handler refreshes it before each scrape)."""

    def __init__(self) -> None:
        self.snapshot = StateSnapshot()

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot
        yield _family(
            "cocoon_state_up",
            "Whether the source of the state gauges could be read",
            ["source"],
            {source: 1.0 if ok else 0.0 for source, ok in s.up.items()},
        )
        yield _family(
            "cocoon_queue_depth",
            "Jobs waiting in the online workers' RQ queues",
            ["model"],
            s.queue_depth,
        )
        yield _family(
            "cocoon_workers_online", "Healthy workers in the registry", ["model", "tee"], s.workers
        )
        yield _family(
            "cocoon_worker_jobs_running",
            "Jobs running on the online workers",
            ["model"],
            s.worker_load,
        )
        yield _family(
            "cocoon_worker_capacity",
            "Jobs the online workers can run at once",
            ["model"],
            s.worker_capacity,
        )
        yield GaugeMetricFamily(
            "cocoon_holds_open", "Holds not yet settled or released", value=s.holds_open[0]
        )
        yield GaugeMetricFamily(
            "cocoon_holds_open_nano", "nanoTON in open holds", value=s.holds_open[1]
        )
        yield from _counted(
            "cocoon_ton_deposits",
            ("Transactions of the deposit wallet", "nanoTON of the deposit wallet's transactions"),
            "status",
            s.deposits,
        )
        yield from _counted("cocoon_payouts", ("Payouts", "nanoTON of payouts"), "state", s.payouts)
        yield _family(
            "cocoon_ledger_balance_nano",
            "Sum of the ledger's balances by account kind (all kinds sum to zero)",
            ["kind"],
            s.balances,
        )


def _family(
    name: str, documentation: str, labels: list[str], values: Mapping[Any, float]
) -> GaugeMetricFamily:
    """One gauge family with a sample per key of ``values`` (a label value, or a tuple of
    them), in sorted order."""
    family = GaugeMetricFamily(name, documentation, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key) if isinstance(key, tuple) else [key], value)
    return family


def _counted(
    name: str, what: tuple[str, str], label: str, rows: Mapping[str, tuple[int, int]]
) -> Iterator[GaugeMetricFamily]:
    """The two gauge families of rows counted and summed by ``label``: ``name``, how many, and
    ``name + "_nano"``, their nanoTON (``what`` describes each; ", by <label>" is added)."""
    yield _family(name, f"{what[0]}, by {label}", [label], {k: n for k, (n, _) in rows.items()})
    yield _family(
        f"{name}_nano", f"{what[1]}, by {label}", [label], {k: a for k, (_, a) in rows.items()}
    )


@dataclass
class TurnsEndpoint:
    """Turn metrics served on a port of their own (:func:`serve_turns`)."""

    metrics: TurnMetrics
    port: int
    server: HTTPServer

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_turns(host: str, port: int) -> TurnsEndpoint:
    """``GET /metrics`` of a process without a web server (``cocoon bot`` polling): its turn
    metrics, on a registry of their own, served from a thread on ``host:port`` (0: a free
    port). The state gauges stay on ``cocoon web``."""
    registry = CollectorRegistry()
    metrics = TurnMetrics(registry)
    server, _thread = start_http_server(port, host, registry=registry)
    return TurnsEndpoint(metrics, int(server.server_address[1]), server)


# ------------------------------------------------------------------------------ aiohttp


async def render(app: web.Application) -> web.Response:
    """The exposition of ``app``'s registry, its state gauges read afresh."""
    registry = app[REGISTRY]
    collector = app[_STATE]
    async with app[_LOCK]:
        dispatcher = app.get(appkeys.DISPATCHER)
        collector.snapshot = await read_state(
            app.get(appkeys.DATABASE), dispatcher.redis if dispatcher is not None else None
        )
        body = generate_latest(registry)
    response = web.Response(body=body)
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    response.charset = "utf-8"
    return response


async def _metrics(request: web.Request) -> web.Response:
    """``GET /metrics`` on the main port: only with ``Authorization: Bearer <COCOON_METRICS_TOKEN>``
    (it shows revenue and users' funds); 401 otherwise, compared in constant time."""
    token = request.app[_TOKEN]
    given = request.headers.get("Authorization", "")
    expected = f"Bearer {token}"
    if not hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode()):
        return web.json_response(
            {"error": "metrics need Authorization: Bearer COCOON_METRICS_TOKEN"},
            status=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
    return await render(request.app)


async def start_endpoint(app: web.Application, host: str, port: int) -> web.AppRunner:
    """``GET /metrics`` of ``app`` (made by :func:`setup`) alone, on ``host:port`` of its own
    (``COCOON_METRICS_PORT``): the main port's routes are not served there, and the port is
    meant for the operator's network only. Stop it with ``runner.cleanup()``."""
    endpoint = web.Application()

    async def get(_request: web.Request) -> web.Response:
        return await render(app)

    endpoint.router.add_get("/metrics", get)
    return await start_site(endpoint, host, port, access_log=None)


_STATE = web.AppKey("metrics_state", StateCollector)
_LOCK = web.AppKey("metrics_lock", asyncio.Lock)
_TOKEN = web.AppKey("metrics_token", str)
TURN_METRICS = web.AppKey("turn_metrics", TurnMetrics)


def setup(app: web.Application) -> CollectorRegistry:
    """Give an application made by ``backend.web.create_app`` a registry of this process's own,
    the turn metrics (``app[TURN_METRICS]``, handed to the dispatcher when the application
    starts), and the state gauges. ``GET /metrics`` is added to the main port only when
    ``COCOON_METRICS_TOKEN`` is set (and then asks for it); ``COCOON_METRICS_PORT`` serves it on
    a port of its own (:func:`start_endpoint`, started by ``backend.web.start_web``); with
    neither it is not served. Idempotent."""
    if REGISTRY in app:
        return app[REGISTRY]
    registry = CollectorRegistry()
    collector = StateCollector()
    registry.register(collector)
    app[REGISTRY] = registry
    app[_STATE] = collector
    app[_LOCK] = asyncio.Lock()
    app[TURN_METRICS] = TurnMetrics(registry)
    settings = app.get(appkeys.SETTINGS)
    if settings is not None and settings.metrics_token is not None:
        app[_TOKEN] = settings.metrics_token.get_secret_value()
        app.router.add_get("/metrics", _metrics)
    return registry
