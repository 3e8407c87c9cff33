"""The sealed canary (issue 13, item 6): a sealed turn from the Python client carrying a canary
prompt, through ``cocoon web`` run as its own process (as ``cocoon up`` runs it: the development
TEE allowed, a worker node process onboarded over HTTP with its own Redis user, SQLite, debug
logs). Afterwards the canary appears 0 times in every Redis key and value (DUMP of every key),
in the database files, in the logs of the web server and the worker, and in the web server's
own memory (``/proc/<pid>/mem``, every readable mapping), while the client read it back.

The scan is shown to see: a plain (unsealed) API turn carrying another canary, sent through the
same process, is found in its memory (the operator's process held that prompt in plaintext).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from backend.apikeys import create_key
from backend.attestation.policy import Policy
from backend.attestation.store import issue_registration_token
from backend.client import SealedClient
from backend.db import Database
from backend.ledger import Ledger
from backend.settings import DEFAULT_MODEL, Settings
from backend.users import get_or_create_user
from tests.support.ops import free_port
from tests.support.redis_server import REPO, start_node, stop_process

pytestmark = pytest.mark.slow  # cocoon web and a worker node as processes

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


@pytest.fixture
async def stack(settings: Settings, redis_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
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
    }
    db = Database(f"sqlite+aiosqlite:///{data / 'cocoon.db'}")
    data.mkdir(parents=True, exist_ok=True)
    await db.upgrade()
    user = await get_or_create_user(db, 4242)
    await Ledger(db).credit_deposit(user.id, 10 * TON, "dep:canary")
    key, _row = await create_key(db, user.id)
    provider = await get_or_create_user(db, 4243)
    await db.close()
    web_log, node_log = tmp_path / "web.log", tmp_path / "node.log"
    web = _start_web(env, web_log)
    url = f"http://127.0.0.1:{port}"
    node = None
    try:
        await _until_up(url, web, web_log)
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


def _read(path: Path) -> str:
    return path.read_text(errors="replace")


async def _until_up(url: str, web: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as http:
        while True:
            assert web.poll() is None, _read(log)
            assert time.monotonic() < deadline, _read(log)
            try:
                async with http.get(f"{url}/healthz") as reply:
                    if reply.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)


async def _sealed_turn(stack: Stack, text: str) -> str:
    deadline = time.monotonic() + 60
    async with SealedClient(stack.url, stack.api_key, policy=Policy(), allow_dev=True) as client:
        while not any(w.trusted for w in await client.workers(DEFAULT_MODEL)):
            assert stack.node.poll() is None and time.monotonic() < deadline
            await asyncio.sleep(0.2)
        reply = await client.chat(DEFAULT_MODEL, [{"role": "user", "content": text}], max_tokens=16)
    return reply.text


async def test_a_sealed_canary_is_nowhere_but_with_the_client(stack: Stack, redis_url: str) -> None:
    canary = f"sealedcanary{uuid.uuid4().hex}"
    assert canary in await _sealed_turn(stack, f"{canary} stays sealed")
    # The positive control: the same process, a plain turn, another canary.
    plain = f"plaincanary{uuid.uuid4().hex}"
    body = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": plain}]}
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{stack.url}/v1/chat/completions", json={**body, "max_tokens": 16}, headers=headers
        ) as reply:
            assert reply.status == 200, await reply.text()
    await asyncio.sleep(0.5)  # the web server's logs and database writes settle

    needle = canary.encode()
    assert memory_count(stack.web.pid, plain.encode()) > 0  # the scan sees a plaintext prompt
    assert memory_count(stack.web.pid, needle) == 0
    assert await redis_count(redis_url, needle) == 0
    assert files_count(stack.files, needle) == 0
    # The route names in Redis are keyed: no route is named after a hash anyone can recompute.
    client = aioredis.Redis.from_url(redis_url)
    routes = [key async for key in client.scan_iter(match="cocoon:route:*")]
    await client.aclose()
    assert routes and all(key.startswith(b"cocoon:route:r-") for key in routes)
