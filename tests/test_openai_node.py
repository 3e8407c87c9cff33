"""The official ``openai`` Node SDK (pinned in tests/clients/node, installed by ``npm ci``)
against ``cocoon web`` on loopback with a real worker node (llama.cpp, SmolLM2): plain chat,
a stream with its usage chunk, a prompt over the context (the SDK's own ``BadRequestError``,
``context_length_exceeded``, not retried), 404/405 as OpenAI's JSON, a tool round trip, and a
429 whose ``Retry-After`` the SDK waits out before its retry is served. The script prints what
the SDK gave back as JSON (tests/clients/node/matrix.mjs); the test asserts on it and on the
ledger."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from backend.settings import DEFAULT_MODEL
from tests.support.api import ApiFactory, charged_turns
from tests.support.env import IN_CI, require_module
from tests.support.turns import Node

require_module("llama_cpp")

pytestmark = [pytest.mark.engine, pytest.mark.slow]

CLIENT = Path(__file__).resolve().parent / "clients" / "node"


def node_sdk() -> str:
    """The ``node`` binary, once the SDK is installed (skipped without, except in CI)."""
    node = shutil.which("node")
    if node is None or not (CLIENT / "node_modules" / "openai" / "package.json").is_file():
        message = "the openai Node SDK is missing: run npm ci in tests/clients/node"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return node


async def run_matrix(base_url: str, key: str, *cases: str) -> dict[str, Any]:
    env = {**os.environ, "COCOON_BASE_URL": base_url, "COCOON_API_KEY": key}
    env["COCOON_MODEL"] = DEFAULT_MODEL
    process = await asyncio.create_subprocess_exec(
        node_sdk(), str(CLIENT / "matrix.mjs"), *cases, cwd=CLIENT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode(errors="replace")
    results: dict[str, Any] = json.loads(out)
    return results


async def test_the_openai_node_sdk(v1_server: ApiFactory, node: Node) -> None:
    # One request at a time per key, so the SDK meets a 429 it can wait out.
    v1 = await v1_server(api_max_concurrent_per_key=1)
    result = await run_matrix(v1.base_url, v1.key)
    failed = {name: case["error"] for name, case in result.items() if "error" in case}
    assert not failed, failed  # what a case threw, rather than a KeyError on its missing fields

    plain = result["plain"]
    assert plain["content"] and plain["finish"] in ("stop", "length")
    assert plain["usage"]["completion_tokens"] > 0 and int(plain["cost"]) > 0

    streamed = result["streamed"]
    assert streamed["text"] and streamed["finish"] in ("stop", "length")
    # The usage chunk comes last with no choices, as stream_options.include_usage asks.
    assert streamed["usage"]["completion_tokens"] > 0 and streamed["usageChunkChoices"] == 0

    overflow = result["contextOverflow"]
    assert overflow["isBadRequest"] and overflow["status"] == 400
    assert overflow["code"] == "context_length_exceeded"
    assert overflow["attempts"] == 1  # the SDK's two retries were not spent on it

    probes = result["notFoundAndNotAllowed"]
    for name, status in (("model", 404), ("path", 404), ("method", 405)):
        probe = probes[name]
        assert probe["status"] == status, probe
        assert probe["contentType"].startswith("application/json")
        assert probe["body"]["message"] and probe["body"]["type"], probe  # OpenAI's error shape
    assert probes["model"]["isNotFound"] and probes["path"]["isNotFound"]

    tools = result["toolRoundTrip"]
    assert tools["finish"] == "tool_calls" and tools["content"] is None
    [call] = tools["calls"]
    assert call["type"] == "function" and call["name"] == "get_weather"
    assert isinstance(json.loads(call["arguments"])["city"], str)
    assert tools["answer"] and not tools["answerCalls"]

    limited = result["rateLimited"]
    refused = limited["refused"]
    assert refused["isRateLimit"] and refused["status"] == 429 and refused["retryAfter"] == "1"
    assert limited["statuses"][0] == 429 and limited["statuses"][-1] == 200
    assert limited["retryAfter"][0] == "1"
    # The SDK waited the Retry-After the server gave before it tried again (less a few ms:
    # Node's timers count from the event loop's cached clock, not Date.now()).
    assert limited["waitsMs"][0] >= 1000 - 50
    assert limited["served"] in ("stop", "length")

    # Billed: plain, streamed, the tool call and its answer, the stopped stream and the served
    # retry; nothing for the overflow, the refusals or the 429s.
    assert len(await charged_turns(v1)) == 6
