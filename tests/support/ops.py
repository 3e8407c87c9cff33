"""Helpers of the operations tests (metrics, logs, sweeper, chaos): a worker node process on the
instant engine, the web application on loopback with a funded user's API key, ``cocoon up`` as
a process (and its environment with the stand-in Bot API), and free ports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import redis
from aiohttp.test_utils import TestServer

from backend import metrics
from backend.apikeys import create_key
from backend.db import Database
from backend.ledger import Ledger
from backend.settings import DEFAULT_MODEL, AttestationSettings, Settings
from backend.users import get_or_create_user
from backend.web import create_app
from tests.support.fake_telegram import FakeTelegram
from workers import registry

TON = 1_000_000_000


async def admin_sql(url: str, *statements: str) -> None:
    """Run statements outside a transaction (CREATE/DROP DATABASE) on a PostgreSQL server."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            for statement in statements:
                await conn.execute(text(statement))
    finally:
        await engine.dispose()


@dataclass
class UpPlace:
    """Where a test's ``cocoon up`` lives: the environment to start it with, the URL it answers
    on, its data folder and its own Redis."""

    env: dict[str, str]
    base: str
    data: Path
    redis_url: str


def cocoon_up_with_bot(
    tmp_path: Path, telegram_url: str, *, token: str, secret: str, user: int, **extra: str
) -> UpPlace:
    """``cocoon up``'s environment for a test: its data, secrets, Redis and web port of its own,
    the bot in webhook mode against the stand-in Bot API at ``telegram_url``, ``user`` the
    local Telegram user with 1 TON of dev credit, short replies (a busy machine's turns end);
    ``extra`` more COCOON_ settings. Nothing of the caller's COCOON_ environment leaks in."""
    redis_port, web_port = free_port(), free_port()
    base = f"http://127.0.0.1:{web_port}"
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COCOON_")}
    env.update(
        COCOON_DATA_DIR=str(data),
        COCOON_SECRETS_DIR=str(tmp_path / "secrets"),
        COCOON_REDIS_URL=redis_url,
        COCOON_WEB_PORT=str(web_port),
        COCOON_PUBLIC_URL=base,
        COCOON_BOT_TOKEN=token,
        COCOON_BOT_MODE="webhook",
        COCOON_WEBHOOK_SECRET=secret,
        COCOON_TELEGRAM_API_URL=telegram_url,
        COCOON_LOCAL_TELEGRAM_ID=str(user),
        COCOON_DEV_CREDIT_NANO=str(10**9),
        COCOON_MAX_TOKENS_DEFAULT="16",
        **extra,
    )
    return UpPlace(env, base, data, redis_url)


def start_cocoon_up(env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    """``cocoon up`` in a session of its own (SIGINT to its process group stops it and all it
    started), its output in ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "backend.cli", "up"],
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_cocoon_up(up: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    """Stop ``cocoon up`` and all it started (SIGINT to its process group); SIGKILL the group
    when it is not gone within ``timeout_s``."""
    if up.poll() is not None:
        return
    os.killpg(up.pid, signal.SIGINT)
    try:
        up.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(up.pid, signal.SIGKILL)
        up.wait()


async def deliver_to_webhook(
    http: aiohttp.ClientSession, base: str, secret: str, telegram: FakeTelegram, update: Any
) -> None:
    """``update`` delivered to the bot's webhook under ``base`` as Telegram delivers it (with
    the webhook's ``secret``); ``telegram`` is told first, so the bot may reply to it."""
    telegram.saw(update)
    async with http.post(
        f"{base}/telegram/webhook",
        headers={"X-Telegram-Bot-Api-Secret-Token": secret},
        json=update,
    ) as reply:
        assert reply.status == 200, await reply.text()


def _text(path: Path) -> str:
    return path.read_text(errors="replace")


def _exists(path: str) -> bool:
    return os.path.exists(path)


async def until_healthy(
    base: str,
    process: subprocess.Popen[bytes],
    log: Path,
    *,
    timeout_s: float,
    also: Callable[[], bool] = lambda: True,
    every_s: float = 0.3,
) -> None:
    """Return once ``base`` answers /healthz (and ``also()`` holds); fail with the process's
    ``log`` if it exits or takes longer than ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while True:
            assert process.poll() is None, _text(log)
            assert time.monotonic() < deadline, _text(log)
            try:
                async with http.get(f"{base}/healthz") as reply:
                    if reply.status == 200 and also():
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(every_s)


async def wait_cocoon_up_ready(
    up: subprocess.Popen[bytes], log: Path, base: str, key: str, timeout_s: float = 180
) -> None:
    """Return once ``cocoon up`` answers /healthz and has written its local API key ``key``;
    fail with its log if it exits or takes longer than ``timeout_s``."""
    await until_healthy(base, up, log, timeout_s=timeout_s, also=lambda: _exists(key))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class InstantNode:
    """A worker node process (``python -m workers.node``) on the instant engine: it echoes the
    last user message word by word, so turns take milliseconds."""

    def __init__(
        self,
        redis_url: str,
        *,
        model: str = DEFAULT_MODEL,
        provider_id: int | None = None,
        token_delay: float = 0.0,
        metrics_port: int | None = None,
        log_file: Path | None = None,
        log_json: bool = False,
        log_level: str = "WARNING",
        heartbeat: float = 0.5,
        ttl: int = 3,
        grace: float = 2,
        wait: bool = True,
    ) -> None:
        self.worker_id = f"t-{uuid.uuid4().hex[:10]}"
        self.redis_url = redis_url
        command = [
            sys.executable, "-m", "workers.node", "--model", model, "--engine", "instant",
            "--redis-url", redis_url, "--worker-id", self.worker_id, "--log-level", log_level,
            "--heartbeat", str(heartbeat), "--ttl", str(ttl), "--grace", str(grace),
            "--engine-option", f"token_delay={token_delay}",
        ]  # fmt: skip
        if provider_id is not None:
            command += ["--provider-id", str(provider_id)]
        if metrics_port is not None:
            command += ["--metrics-port", str(metrics_port)]
        if log_json:
            command.append("--log-json")
        # The child keeps its own copy of the log's descriptor: ours closes at once.
        with open(log_file, "ab") if log_file else contextlib.nullcontext() as log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stderr=log,
                env={k: v for k, v in os.environ.items() if k != "COCOON_WORKER_METRICS_PORT"},
            )
        if wait:
            self.wait_registered()

    def wait_registered(self, timeout_s: float = 30) -> None:
        client = redis.Redis.from_url(self.redis_url)
        deadline = time.monotonic() + timeout_s
        try:
            while not client.exists(registry.worker_key(self.worker_id)):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the worker node did not start")
                time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: the node dies at once, mid-job or not, and cleans nothing up."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@dataclass
class Api:
    """The web server on loopback and what its tests need."""

    url: str
    key: str
    user_id: int
    ledger: Ledger
    db: Database
    server: TestServer


def dev_settings(settings: Settings, **update: object) -> Settings:
    """The test settings with dev mode on (the tests' nodes register directly)."""
    return settings.model_copy(
        update={"attestation": AttestationSettings(allow_dev=True), **update}
    )


@contextlib.asynccontextmanager
async def api_server(
    settings: Settings, *, balance: int = TON, with_metrics: bool = True, telegram_id: int = 4242
) -> AsyncIterator[Api]:
    """``create_app`` (plus ``metrics.setup``) on loopback, over a fresh database with one
    funded user (Telegram user ``telegram_id``) and an API key for it."""
    db = Database.from_settings(settings)
    await db.upgrade()
    ledger = Ledger(db)
    user = await get_or_create_user(db, telegram_id)
    if balance:
        await ledger.credit_deposit(user.id, balance, f"dep:{telegram_id}")
    key, _row = await create_key(db, user.id)
    app = create_app(settings)
    if with_metrics:
        metrics.setup(app)
    server = TestServer(app)
    await server.start_server()
    try:
        yield Api(str(server.make_url("")).rstrip("/"), key, user.id, ledger, db, server)
    finally:
        await server.close()
        await db.close()


async def api_serves(session: aiohttp.ClientSession, root_url: str, model: str) -> bool:
    """Whether the API at ``root_url`` says, as a client reads it (``GET /health``), that a
    worker serves ``model`` now: its copy of the registry may list a worker a moment after the
    registry does."""
    async with session.get(f"{root_url}/health") as reply:
        return bool((await reply.json())["models"].get(model))
