"""The sealed canary's stage and scanners, shared by its tests (``tests/test_sealed_canary.py``,
``tests/test_miniapp_sealed.py``): ``cocoon web`` as its own process with a worker node, and
counts of a canary in a process's memory, in Redis (every key and DUMPed value) and in files."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from backend.apikeys import create_key
from backend.attestation.store import issue_registration_token
from backend.db import Database
from backend.ledger import Ledger
from backend.settings import DEFAULT_MODEL
from backend.users import get_or_create_user
from tests.support.ops import free_port, until_healthy
from tests.support.redis_server import REPO, start_node, stop_process

CANARY_USER = 4242

TON = 1_000_000_000


@dataclass
class Stack:
    url: str
    web: subprocess.Popen[bytes]
    node: subprocess.Popen[bytes]
    api_key: str
    files: list[Path]  # the database files and the logs


def _mem_regions(pid: int) -> list[tuple[int, int]]:
    regions = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        span, perms, *rest = line.split()
        name = rest[3] if len(rest) > 3 else ""
        if perms.startswith("r") and not name.startswith("[vsyscall") and not name.startswith("/"):
            start, end = (int(part, 16) for part in span.split("-"))
            regions.append((start, end))
    return regions


def memory_count(pid: int, needle: bytes) -> int:
    """Occurrences of ``needle`` in the process's anonymous readable memory (heap, stacks,
    arenas: where a request's text would be; mapped files are code and data on disk)."""
    found = 0
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for start, end in _mem_regions(pid):
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except OSError:
                continue
            found += data.count(needle)
    return found


async def redis_count(url: str, needle: bytes) -> int:
    """Occurrences in every key name and DUMPed value of the Redis database at ``url``."""
    client = aioredis.Redis.from_url(url)
    found = 0
    try:
        async for key in client.scan_iter(count=500):
            found += key.count(needle)
            value = await client.dump(key)
            found += (value or b"").count(needle)
    finally:
        await client.aclose()
    return found


def files_count(files: list[Path], needle: bytes) -> int:
    return sum(path.read_bytes().count(needle) for path in files if path.exists())


@asynccontextmanager
async def canary_stack(
    redis_url: str, tmp_path: Path, extra_env: dict[str, str] | None = None
) -> AsyncIterator[Stack]:
    """``cocoon web`` as its own process (the development TEE allowed, SQLite, debug logs) and
    a worker node process onboarded over HTTP; Telegram user 4242 holds 10 GRAM and an API key."""
    if not os.access("/proc/self/mem", os.R_OK):
        pytest.skip("/proc/<pid>/mem cannot be read here")
    port = free_port()
    data = tmp_path / "data"
    env = {
        **os.environ,
        "COCOON_DATA_DIR": str(data),
        "COCOON_SECRETS_DIR": str(tmp_path / "secrets"),
        "COCOON_REDIS_URL": redis_url,
        "COCOON_WEB_PORT": str(port),
        "COCOON_ATTESTATION__ALLOW_DEV": "true",
        "COCOON_LOG_LEVEL": "DEBUG",
        "COCOON_BOT_MODE": "off",
        **(extra_env or {}),
    }
    db = Database(f"sqlite+aiosqlite:///{data / 'cocoon.db'}")
    data.mkdir(parents=True, exist_ok=True)
    await db.upgrade()
    user = await get_or_create_user(db, CANARY_USER)
    await Ledger(db).credit_deposit(user.id, 10 * TON, "dep:canary")
    key, _row = await create_key(db, user.id)
    provider = await get_or_create_user(db, 4243)
    await db.close()
    web_log, node_log = tmp_path / "web.log", tmp_path / "node.log"
    web = _start_web(env, web_log)
    url = f"http://127.0.0.1:{port}"
    node = None
    try:
        await until_healthy(url, web, web_log, timeout_s=60, every_s=0.2)
        admin = aioredis.Redis.from_url(redis_url)
        token = await issue_registration_token(admin, provider.id, 600)
        await admin.aclose()
        node = start_node(url, token, node_log, model=DEFAULT_MODEL)
        files = [data / "cocoon.db", data / "cocoon.db-wal", web_log, node_log]
        yield Stack(url, web, node, key, files)
    finally:
        if node is not None:
            stop_process(node)
        stop_process(web)


def _start_web(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``cocoon web`` as its own process, its output in ``log``."""
    with log.open("wb") as out:
        command = [sys.executable, "-m", "backend.cli", "web"]
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


async def worker_ready(stack: Stack, model: str = DEFAULT_MODEL, timeout_s: float = 60) -> None:
    """Wait until the public report lists a worker of ``model`` that answered its challenge."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while True:
            assert stack.node.poll() is None and time.monotonic() < deadline
            params = {"model": model, "nonce": os.urandom(16).hex()}
            async with http.get(f"{stack.url}/v1/attestation/report", params=params) as reply:
                if reply.status == 200 and (await reply.json())["workers"]:
                    return
            await asyncio.sleep(0.2)
