"""Attested configuration (issue 12, item 1): the evidence binds the weights a worker loaded and
the engine it runs, how and where it sends prompts; the policy allow-lists them; an engine that
sends prompts off the machine runs only with the development TEE, labelled so; and what users
are shown comes from the backend's attestation record, never from the worker's own entry.

Real parts: Redis, the onboarding service and ``cocoon web``, the worker node as a process, the
dispatcher, the bot (Telegram faked at its session layer), the Mini App service and the API's
receipt, the real TDX quote with its recorded collateral. The OpenAI-compatible server the
``openai`` engine talks to is a small aiohttp server on this machine, serving the instant
engine (the protocol as vLLM's server speaks it)."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestServer

from backend.attestation import store
from backend.attestation.onboarding import Onboarding, OnboardingError
from backend.cli import _served_by
from backend.dispatch import Dispatcher, TurnDone, TurnRequest, TurnText
from backend.ledger import Ledger
from backend.openai_api.protocol import CocoonExtra
from backend.settings import Settings
from backend.users import get_or_create_user
from bot.context import Conversation, LastTurn
from miniapp.service import MiniApp
from tests.support.attest import (
    AT,
    ENGINE_CONFIG,
    MODEL,
    QUOTE,
    REPORT_DATA_REFUSAL,
    WEIGHTS,
    attested_dispatch,
    base_url,
    claims_for,
    serve_backend,
    service,
    with_attestation,
)
from tests.support.bot import ALICE, Harness
from tests.support.redis_server import REPO, attested_worker, stop_process
from workers import evidence as ev
from workers import registry
from workers.engines import create_engine
from workers.engines.instant import InstantEngine
from workers.wire import ChatMessage, WorkerKeys

OFF_MACHINE = "http://203.0.113.7:8000"  # TEST-NET-3: an address outside this machine


# -- what each engine claims --------------------------------------------------------------------


def test_each_engine_states_what_runs_on_a_prompt_and_where_it_goes() -> None:
    llama = create_engine("llama-cpp", "m", n_ctx=4096, n_threads=3, top_k=20)
    assert llama.attested_config() == {
        "n_ctx": 4096,
        "n_batch": 512,
        "top_k": 20,
        "min_p": 0.05,
        "repeat_penalty": 1.0,
    }  # not n_threads: speed only
    vllm = create_engine(
        "vllm",
        "m",
        model_path="/models/m",
        max_concurrency=8,
        engine_args={"dtype": "bfloat16", "trust_remote_code": True},
    )
    assert vllm.attested_config() == {
        "enable_prefix_caching": True,
        "disable_log_stats": True,
        "dtype": "bfloat16",
        "trust_remote_code": True,
    }
    openai = create_engine(
        "openai", "m", base_url="http://user:secret@127.0.0.1:8000/v1", api_key="sk-secret"
    )
    config = openai.attested_config()
    assert config == {"base_url": "http://***@127.0.0.1:8000", "served_model": "m", "api_key": True}
    assert "secret" not in json.dumps(config)
    # Where prompts go, as both sides decide it.
    for url in ("http://127.0.0.1:8000", "http://localhost:8000/v1", "http://[::1]:8000"):
        assert ev.off_machine_reason("openai", {"base_url": url}) is None, url
    for url in (
        OFF_MACHINE,
        "https://api.openai.com/v1",
        "http://127.0.0.1.nip.io:8000",  # a name: it could resolve anywhere
        "http://127.0.0.1@evil.example",
        "http://127.0.0.1\\@evil.example",
        "ftp://127.0.0.1",
        config["base_url"],  # user:password@: refused rather than parsed two ways
    ):
        reason = ev.off_machine_reason("openai", {"base_url": url})
        assert reason is not None and "not a loopback address" in reason, url
    assert ev.off_machine_reason("vllm", {"base_url": OFF_MACHINE}) is None  # no such option


# -- the backend's verdict ----------------------------------------------------------------------


async def register(
    onboarding: Onboarding, tee: str = "dev", keys: WorkerKeys | None = None, **claims: object
) -> tuple[dict[str, Any], WorkerKeys]:
    token = await store.issue_registration_token(onboarding.redis, 7, 3600)
    keys = keys or WorkerKeys.generate()
    nonce = (await onboarding.nonce(token))["nonce"]
    c = claims_for(keys, nonce, **claims)
    if tee == "dev":
        evidence = ev.dev_evidence(c)
    else:
        evidence = ev.Evidence(tee="tdx", claims=c, quote=base64.b64encode(QUOTE).decode())
    return await onboarding.register(token, evidence.model_dump(mode="json")), keys


async def refusal(onboarding: Onboarding, tee: str = "dev", **claims: object) -> list[str]:
    with pytest.raises(OnboardingError) as caught:
        await register(onboarding, tee, **claims)
    assert caught.value.status == 403, caught.value.reasons
    return caught.value.reasons


async def test_the_honest_worker_is_accepted_and_its_record_binds_what_it_runs(
    settings: Settings, admin: aioredis.Redis
) -> None:
    reply, _ = await register(service(settings, admin, allow_dev=True))
    assert reply["accepted"] is True
    record = await registry.read_attestation(admin, reply["worker_id"])
    assert record is not None
    assert (record.model, record.model_sha256) == (MODEL, WEIGHTS)
    assert (record.engine, record.engine_version, record.off_machine) == ("instant", "1", False)
    assert record.engine_config_sha256 == ev.config_sha256(ENGINE_CONFIG)
    # The same honest claims in a TDX quote (the real one, at its collateral's time): its
    # weights and engine configuration are allowed; only the report data (the quote was taken
    # for other claims) is refused.
    assert await refusal(service(settings, admin, clock=AT), "tdx") == [REPORT_DATA_REFUSAL]


async def test_weights_not_on_the_allow_list_are_refused(
    settings: Settings, admin: aioredis.Redis
) -> None:
    other = hashlib.sha256(b"weights with a backdoor").hexdigest()
    dev = service(settings, admin, allow_dev=True)
    # The policy lists this model: even a development worker runs only listed weights.
    assert await refusal(dev, model_sha256=other) == [
        f"weights sha256 {other} are not on the allow-list of model '{MODEL}'"
    ]
    at_quote_time = service(settings, admin, clock=AT)
    assert f"weights sha256 {other} are not on the allow-list" in " ".join(
        await refusal(at_quote_time, "tdx", model_sha256=other)
    )
    # No digest at all (an engine that loads no file the node could hash): refused.
    reasons = await refusal(at_quote_time, "tdx", model_sha256="")
    assert any("claims no weights digest" in reason for reason in reasons), reasons
    # Decided without Intel's collateral: refused even when the quote cannot be checked now
    # (the same quote today, its collateral expired), not a 503 to come back with later.
    assert f"weights sha256 {other}" in " ".join(
        await refusal(service(settings, admin), "tdx", model_sha256=other)
    )
    assert await admin.zcard(registry.INDEX_KEY) == 0  # nothing was registered


async def test_a_model_the_policy_lists_no_weights_for_is_refused_to_attested_workers(
    settings: Settings, admin: aioredis.Redis
) -> None:
    onboarding = service(settings, admin, clock=AT)
    onboarding.verifier.policy = onboarding.verifier.policy.model_copy(update={"models": {}})
    reasons = await refusal(onboarding, "tdx")
    assert reasons[1:] == [
        f"the policy allow-lists no weights for model '{MODEL}': an attested worker must run "
        "weights whose digest the operator listed (cocoon attest digest PATH)"
    ]


async def test_an_engine_configuration_its_image_does_not_allow_is_refused(
    settings: Settings, admin: aioredis.Redis
) -> None:
    at_quote_time = service(settings, admin, clock=AT)
    slower = {"token_delay": 0.5}
    assert await refusal(at_quote_time, "tdx", engine_config=slower) == [
        REPORT_DATA_REFUSAL,
        f"engine instant 1 with configuration sha256 {ev.config_sha256(slower)} is not "
        "allow-listed for image cocoon-worker 0.1.0; the nearest allowed one differs in: "
        "token_delay",
    ]
    reasons = await refusal(at_quote_time, "tdx", engine="vllm", engine_config={})
    assert reasons[1:] == [
        "image cocoon-worker 0.1.0 allow-lists no configuration of engine vllm 1"
    ]


async def test_an_off_machine_engine_is_refused_for_attested_workers_and_labelled_for_dev(
    settings: Settings, admin: aioredis.Redis
) -> None:
    off = {"base_url": OFF_MACHINE, "served_model": MODEL, "api_key": False}
    reasons = await refusal(
        service(settings, admin, clock=AT), "tdx", engine="openai", engine_config=off
    )
    assert (
        f"the openai engine sends every prompt to '{OFF_MACHINE}', which is not a loopback "
        "address: off this machine, outside the TEE: refused for an attested worker (such an "
        "engine is allowed only with the development TEE)"
    ) in reasons
    # With the development TEE it is accepted, and its record says where prompts go.
    reply, _ = await register(
        service(settings, admin, allow_dev=True), engine="openai", engine_config=off
    )
    record = await registry.read_attestation(admin, reply["worker_id"])
    assert record is not None and record.tee == "dev" and record.off_machine is True
    # Pointed at loopback (a server inside the same TEE), it is not off the machine.
    on = {**off, "base_url": "http://127.0.0.1:8000"}
    reply, _ = await register(
        service(settings, admin, allow_dev=True), engine="openai", engine_config=on
    )
    record = await registry.read_attestation(admin, reply["worker_id"])
    assert record is not None and record.off_machine is False


# -- the node -----------------------------------------------------------------------------------


def node_command(url: str, token: str, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "workers.node", "--model", MODEL, "--register-url", url,
        "--token", token, "--heartbeat", "0.5", "--grace", "1", "--register-wait", "5", *args,
    ]  # fmt: skip


def start_node(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "COCOON_DIGEST_CACHE": "off"}
    with log.open("wb") as out:
        return subprocess.Popen(command, cwd=REPO, stdout=out, stderr=out, env=env)


@pytest.mark.slow
def test_the_node_will_not_send_prompts_off_the_machine_outside_the_dev_tee(
    tmp_path: Path,
) -> None:
    """``--tee tdx`` with the openai engine pointed off the machine: exit 3 before anything
    loads or any backend is asked (there is none at that URL)."""
    log = tmp_path / "node.log"
    command = node_command(
        "http://127.0.0.1:9", "cct_x", "--engine", "openai", "--tee", "tdx",
        "--engine-option", f"base_url={OFF_MACHINE}",
    )  # fmt: skip
    node = start_node(command, log)
    try:
        assert node.wait(60) == 3, log.read_text()
    finally:
        stop_process(node)
    text = log.read_text()
    assert "the engine is refused" in text and "not a loopback address" in text, text
    assert "--tee dev" in text and "backend not reachable" not in text


# -- end to end: what users are shown ----------------------------------------------------------


def lan_address() -> str:
    """An address of this machine that is not loopback (skip when it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: it only picks a route
            address = probe.getsockname()[0]
        except OSError:
            address = "127.0.0.1"
    if ipaddress.ip_address(address).is_loopback:
        pytest.skip("this machine has no address but loopback")
    return address


def openai_server_app() -> web.Application:
    """An OpenAI-compatible server (``/v1/models``, streamed ``/v1/chat/completions`` with
    ``stream_options.include_usage``) serving the instant engine."""
    engine = InstantEngine(MODEL)

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL}]})

    async def completions(request: web.Request) -> web.StreamResponse:
        from workers.engines import GenerationRequest, TextDelta

        body = await request.json()
        await engine.start()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        generation = GenerationRequest(messages=body["messages"], max_tokens=body["max_tokens"])
        async for item in engine.generate(generation):
            if isinstance(item, TextDelta):
                choice = {"index": 0, "delta": {"content": item.text}, "finish_reason": None}
                chunk: dict[str, Any] = {"choices": [choice]}
            else:
                choice = {"index": 0, "delta": {}, "finish_reason": item.finish_reason}
                await response.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
                usage = {
                    "prompt_tokens": item.prompt_tokens,
                    "completion_tokens": item.completion_tokens,
                }
                chunk = {"choices": [], "usage": usage}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", completions)
    return app


@pytest.fixture
async def backend(settings: Settings, admin: aioredis.Redis) -> AsyncIterator[str]:
    """``cocoon web`` with dev mode on (its policy lists no weights: dev workers pass)."""
    server = await serve_backend(with_attestation(settings, allow_dev=True))
    yield base_url(server)
    await server.close()


async def one_turn(ledger: Ledger, dispatcher: Dispatcher) -> tuple[TurnDone, str]:
    user = await get_or_create_user(ledger.db, ALICE)
    await ledger.credit_deposit(user.id, 10**9, f"dep:{time.monotonic_ns()}")
    turn = await dispatcher.start_turn(
        TurnRequest(user.id, MODEL, [ChatMessage(role="user", content="who serves me")], 8)
    )
    events = [event async for event in turn.events()]
    done = events[-1]
    assert isinstance(done, TurnDone)
    return done, "".join(e.text for e in events if isinstance(e, TurnText))


async def shown(done: TurnDone, ledger: Ledger, dispatcher: Dispatcher, bot: Harness) -> dict:
    """What each surface shows of the worker that served ``done``."""
    record = await registry.read_attestation(dispatcher.redis, done.worker.worker_id)
    miniapp = MiniApp(bot.settings, ledger.db, ledger, dispatcher)
    await bot.app.services.contexts.save(
        ALICE,
        Conversation(
            messages=[{"role": "user", "content": "who serves me"}],
            last=LastTurn(done.turn_id, done.model, done.worker),
        ),
    )
    await bot.send("/privacy")
    return {
        "bot": bot.last().text,
        "miniapp": (await miniapp.privacy(done)).model_dump(),
        "api": CocoonExtra.of(done, record).worker.model_dump(),
        "cli": await _served_by(dispatcher, done),
    }


@pytest.mark.slow  # real processes
async def test_users_are_shown_the_engine_the_record_holds_not_the_workers_claim(
    settings: Settings, admin: aioredis.Redis, backend: str, bot: Harness, tmp_path: Path
) -> None:
    log = tmp_path / "node.log"
    token = await store.issue_registration_token(admin, None, 60)
    node = start_node(node_command(backend, token, "--engine", "instant", "--tee", "dev"), log)
    try:
        worker_id = await attested_worker(admin, node, log, MODEL)
        # The worker rewrites its own entry (its key: it may) to claim another engine.
        raw = await admin.hget(registry.worker_key(worker_id), "info")
        entry = json.loads(raw)
        await admin.hset(
            registry.worker_key(worker_id),
            "info",
            json.dumps({**entry, "engine": "vllm", "engine_version": "0.11.0-h100"}),
        )
        listed = await registry.get_worker(admin, worker_id)
        assert listed is not None and (listed.engine, listed.engine_version) == ("instant", "1")

        async with attested_dispatch(settings) as (ledger, dispatcher):
            done, text = await one_turn(ledger, dispatcher)
            views = await shown(done, ledger, dispatcher, bot)
        assert text.strip() == "who serves me" and done.worker.worker_id == worker_id
        assert (done.worker.engine, done.worker.engine_version) == ("instant", "1")
        assert "Engine: instant 1" in views["bot"] and "vllm" not in views["bot"]
        assert (views["miniapp"]["engine"], views["miniapp"]["engine_version"]) == ("instant", "1")
        assert (views["api"]["engine"], views["api"]["engine_version"]) == ("instant", "1")
        assert "instant 1" in views["cli"] and "vllm" not in views["cli"]
        for view in views.values():
            assert "off the machine" not in json.dumps(view).lower()
    finally:
        stop_process(node)


@pytest.mark.slow  # real processes
async def test_a_dev_worker_that_sends_prompts_off_the_machine_is_labelled_everywhere(
    settings: Settings, admin: aioredis.Redis, backend: str, bot: Harness, tmp_path: Path
) -> None:
    address = lan_address()
    server = TestServer(openai_server_app(), host=address)
    await server.start_server()
    base_url = f"http://{address}:{server.port}"
    log = tmp_path / "node.log"
    token = await store.issue_registration_token(admin, None, 60)
    command = node_command(
        backend, token, "--engine", "openai", "--tee", "dev",
        "--engine-option", f"base_url={base_url}",
    )  # fmt: skip
    node = start_node(command, log)
    try:
        worker_id = await attested_worker(admin, node, log, MODEL)
        assert "allowed with the development TEE only" in log.read_text()
        record = await registry.read_attestation(admin, worker_id)
        assert record is not None and record.off_machine and record.engine == "openai"

        async with attested_dispatch(settings) as (ledger, dispatcher):
            done, text = await one_turn(ledger, dispatcher)
            views = await shown(done, ledger, dispatcher, bot)
        assert text.strip() == "who serves me" and done.worker.tee == "dev"
        assert "sends prompts off its machine" in views["bot"]
        assert "development TEE" in views["bot"]
        assert views["miniapp"]["off_machine"] is True and views["miniapp"]["tee"] == "dev"
        assert views["api"]["off_machine"] is True and views["api"]["tee"] == "dev"
        assert "sends prompts OFF the machine" in views["cli"]
        assert "development TEE" in views["cli"]
    finally:
        stop_process(node)
        await server.close()


def test_the_node_takes_its_default_redis_url_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker image carries no operator code: ``cocoon worker`` without ``--redis-url``
    reads ``COCOON_REDIS_URL`` itself."""
    from workers.node import build_parser
    from workers.node_cli import config_from_args

    parser = build_parser()
    args = parser.parse_args(["--model", MODEL, "--engine", "instant"])
    monkeypatch.setenv("COCOON_REDIS_URL", "redis://10.0.0.5:6380/3")
    assert config_from_args(parser, args).redis_url == "redis://10.0.0.5:6380/3"
    monkeypatch.delenv("COCOON_REDIS_URL")
    assert config_from_args(parser, args).redis_url == "redis://127.0.0.1:6379/0"
