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
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from backend.attestation.policy import Policy
from backend.client import SealedClient
from backend.settings import DEFAULT_MODEL
from tests.support.canary import Stack, canary_stack, files_count, memory_count, redis_count

pytestmark = pytest.mark.slow  # cocoon web and a worker node as processes


@pytest.fixture
async def stack(redis_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    async with canary_stack(redis_url, tmp_path) as running:
        yield running


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
