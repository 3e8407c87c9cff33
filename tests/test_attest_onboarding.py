"""Onboarding on the real Redis: token → nonce → evidence → registered with its own Redis user;
refusals with reasons; expiry and revocation; and dispatch only to attested workers."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer

from backend.attestation import acl, store
from backend.attestation.onboarding import OnboardingError
from backend.attestation.verifier import DEV_REFUSED
from backend.db import Database
from backend.dispatch import TurnDone, TurnError, TurnRequest, TurnText
from backend.settings import AttestationSettings, Settings
from backend.users import get_or_create_user
from tests.support.attest import (
    AT,
    MODEL,
    REPORT_DATA_REFUSAL,
    attest,
    attested_dispatch,
    base_url,
    claims_for,
    open_credentials,
    serve_backend,
    service,
    with_attestation,
    worker_info,
)
from tests.support.redis_server import (
    REPO,
    attested_worker,
    exit_status,
    start_node,
    stop_process,
)
from tests.support.turns import funded_user
from workers import evidence as ev
from workers import registry
from workers.wire import ChatMessage, WorkerKeys


async def refused(call) -> list[str]:
    with pytest.raises(OnboardingError) as caught:
        await call
    return caught.value.reasons


# -- the service --------------------------------------------------------------------------------


async def test_dev_worker_is_registered_with_its_own_redis_user(
    settings: Settings, admin: aioredis.Redis, redis_url: str
) -> None:
    onboarding = service(settings, admin, allow_dev=True)
    token = await store.issue_registration_token(admin, 7, 3600)
    keys = WorkerKeys.generate()
    reply = await attest(onboarding, token, keys)
    worker_id = "w-" + keys.fingerprint()
    assert reply["accepted"] and reply["tee"] == "dev" and reply["worker_id"] == worker_id
    record = await registry.read_attestation(admin, worker_id)
    assert record is not None and record.tee == "dev" and record.provider_id == 7
    assert abs(record.expires_at - (time.time() + 86_400)) < 60  # default lifetime: 24 h
    credentials = open_credentials(reply, keys)
    assert credentials["worker_id"] == worker_id and credentials["tee"] == "dev"
    worker = redis.Redis.from_url(credentials["redis_url"])
    try:
        assert worker.ping()
        with pytest.raises(redis.exceptions.NoPermissionError):
            worker.get(registry.attestation_key(worker_id))
    finally:
        worker.close()
    # The token was for one registration.
    assert "already used token" in (await refused(onboarding.nonce(token)))[0]


async def test_refusals_each_with_a_reason(settings: Settings, admin: aioredis.Redis) -> None:
    strict = service(settings, admin, allow_dev=False)
    token = await store.issue_registration_token(admin, 1, 3600)
    keys = WorkerKeys.generate()

    # dev evidence while dev mode is off
    assert "dev mode is off" in (await refused(attest(strict, token, keys)))[0]
    # an unknown nonce, and a replayed one (the nonce was used by the refusal above)
    assert (
        "unknown, expired or already used"
        in (await refused(attest(strict, token, keys, nonce="f" * 64)))[0]
    )
    used = (await strict.nonce(token))["nonce"]
    dev = service(settings, admin, allow_dev=True)
    with pytest.raises(OnboardingError):
        await attest(strict, token, keys, nonce=used)
    assert "already used" in (await refused(attest(dev, token, keys, nonce=used)))[0]
    # a real TDX quote, verified at its collateral's time, whose report data is not our claims
    at_quote_time = service(settings, admin, clock=AT)
    reasons = await refused(attest(at_quote_time, token, keys, tee="tdx"))
    assert reasons == [REPORT_DATA_REFUSAL]
    # the same quote now: the backend's collateral has expired, so it cannot decide (503, its
    # own fault, not a refusal of the worker)
    with pytest.raises(OnboardingError) as caught:
        await attest(service(settings, admin), token, keys, tee="tdx")
    assert caught.value.status == 503
    assert "outside its validity window" in caught.value.reasons[0]
    # an unknown token
    with pytest.raises(OnboardingError) as caught:
        await strict.nonce("cct_nonsense")
    assert caught.value.status == 401
    # nothing was registered
    assert await registry.read_attestation(admin, "w-" + keys.fingerprint()) is None
    assert "w-" + keys.fingerprint() not in await acl.worker_users(admin)


async def test_evidence_past_its_lifetime_leaves_dispatch_and_loses_its_user(
    settings: Settings, admin: aioredis.Redis
) -> None:
    onboarding = service(settings, admin, allow_dev=True, lifetime_s=3)
    keys = WorkerKeys.generate()
    reply = await attest(onboarding, await store.issue_registration_token(admin, 1, 60), keys)
    worker_id = reply["worker_id"]
    await registry.register(admin, worker_info(worker_id, keys), ttl_s=30)
    picked = await registry.pick_worker(admin, MODEL, attested_only=True)
    assert picked is not None and picked.attested and picked.tee == "dev"
    async with asyncio.timeout(30):  # the record expires (in Redis) 3 s after it was taken
        while await registry.read_attestation(admin, worker_id) is not None:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    assert await registry.pick_worker(admin, MODEL, attested_only=True) is None
    listed = await registry.get_worker(admin, worker_id)
    assert listed is None or not listed.attested
    # The sweep (every web server runs it) revokes the expired worker's Redis user.
    await onboarding.sweep()
    assert worker_id not in await acl.worker_users(admin)
    assert await registry.get_worker(admin, worker_id) is None


async def test_failed_reattestation_revokes_the_worker(
    settings: Settings, admin: aioredis.Redis
) -> None:
    keys = WorkerKeys.generate()
    first = await attest(
        service(settings, admin, allow_dev=True),
        await store.issue_registration_token(admin, 1, 60),
        keys,
    )
    worker_id = first["worker_id"]
    renewal = open_credentials(first, keys)["renewal_token"]
    # Renewal works while the evidence is good ...
    second = await attest(service(settings, admin, allow_dev=True), renewal, keys)
    renewal = open_credentials(second, keys)["renewal_token"]
    assert worker_id in await acl.worker_users(admin)
    # ... and a refused one revokes: record, registry entry and Redis user are gone.
    reasons = await refused(attest(service(settings, admin, allow_dev=False), renewal, keys))
    assert "dev mode is off" in reasons[0]
    assert await registry.read_attestation(admin, worker_id) is None
    assert worker_id not in await acl.worker_users(admin)


# -- end to end: real node processes over HTTP --------------------------------------------------


@pytest.fixture
async def web(settings: Settings, admin: aioredis.Redis) -> AsyncIterator[object]:
    servers: list[TestServer] = []

    async def start(**values: object) -> str:
        server = await serve_backend(with_attestation(settings, **values))
        servers.append(server)
        return base_url(server)

    yield start
    for server in servers:
        await server.close()


def start_direct_node(redis_url: str, worker_id: str) -> subprocess.Popen[bytes]:
    """A development node that registers itself directly, unattested."""
    command = [
        sys.executable, "-m", "workers.node", "--model", MODEL, "--engine", "instant",
        "--redis-url", redis_url, "--worker-id", worker_id,
    ]  # fmt: skip
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
async def test_an_onboarded_worker_serves_turns_through_its_own_redis_user(
    settings: Settings,
    admin: aioredis.Redis,
    web,
    tmp_path: Path,
) -> None:
    url = await web(allow_dev=True)
    token = await store.issue_registration_token(admin, None, 60)
    node = start_node(url, token, tmp_path / "node.log", model=MODEL)
    try:
        await attested_worker(admin, node, tmp_path / "node.log", MODEL)
        async with attested_dispatch(settings) as (ledger, dispatcher):
            user_id = await funded_user(ledger, 5150)
            turn = await dispatcher.start_turn(
                TurnRequest(user_id, MODEL, [ChatMessage(role="user", content="hello attested")], 8)
            )
            events = [event async for event in turn.events()]
        done = events[-1]
        assert isinstance(done, TurnDone) and done.worker.tee == "dev"
        assert done.worker.worker_id.startswith("w-") and turn.job_id.startswith(
            done.worker.worker_id
        )
        assert "".join(e.text for e in events if isinstance(e, TurnText)).strip()
        log = (tmp_path / "node.log").read_text()
        assert "tee=dev (development TEE" in log and "NOPERM" not in log
    finally:
        stop_process(node)


@pytest.mark.slow
async def test_a_refused_worker_receives_no_job(
    settings: Settings,
    admin: aioredis.Redis,
    web,
    tmp_path: Path,
    redis_url: str,
) -> None:
    url = await web(allow_dev=False)
    token = await store.issue_registration_token(admin, None, 60)
    node = start_node(url, token, tmp_path / "refused.log", model=MODEL)
    assert await exit_status(node, tmp_path / "refused.log") == 3  # refused: says why, exits
    assert "dev mode is off" in (tmp_path / "refused.log").read_text()
    assert not [w for w in await registry.list_workers(admin) if w.attested]

    # A node that registers itself directly, unattested, is not dispatched either.
    direct = start_direct_node(redis_url, "t-direct")
    try:
        deadline = time.monotonic() + 30
        while await registry.get_worker(admin, "t-direct") is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        async with attested_dispatch(settings) as (ledger, dispatcher):
            user_id = await funded_user(ledger, 5151)
            with pytest.raises(TurnError) as caught:
                await dispatcher.start_turn(
                    TurnRequest(user_id, MODEL, [ChatMessage(role="user", content="hi")], 8)
                )
            assert caught.value.code == "no_worker"
            assert not await admin.keys("rq:job:t-direct_*")  # nothing was enqueued for it
            assert (await ledger.balances(user_id)).held == 0
    finally:
        stop_process(direct)


@pytest.mark.slow
async def test_a_node_attests_again_before_expiry_and_stops_when_refused(
    settings: Settings, admin: aioredis.Redis, tmp_path: Path
) -> None:
    from backend.attestation.onboarding import ONBOARDING

    server = await serve_backend(with_attestation(settings, allow_dev=True, lifetime_s=4))
    log = tmp_path / "renew.log"
    token = await store.issue_registration_token(admin, None, 60)
    node = start_node(base_url(server), token, log, model=MODEL)
    try:

        async def record() -> registry.AttestationRecord | None:
            for worker in await registry.list_workers(admin, MODEL):
                if worker.attested:
                    return await registry.read_attestation(admin, worker.worker_id)
            return None

        deadline = time.monotonic() + 30
        while (first := await record()) is None:
            assert node.poll() is None and time.monotonic() < deadline, log.read_text()
            await asyncio.sleep(0.1)
        await asyncio.sleep(6)  # past the first evidence's lifetime
        renewed = await record()
        assert renewed is not None and renewed.expires_at > first.expires_at, log.read_text()
        # The operator turns dev mode off: the next re-attestation is refused, the worker revoked.
        server.app[ONBOARDING].verifier.settings = AttestationSettings(allow_dev=False)
        assert await exit_status(node, log, timeout_s=20) == 3, log.read_text()
        assert "re-attestation refused" in log.read_text()
        assert await registry.read_attestation(admin, first.worker_id) is None
        assert first.worker_id not in await acl.worker_users(admin), log.read_text()
        assert await registry.get_worker(admin, first.worker_id) is None
    finally:
        stop_process(node)
        await server.close()


@pytest.mark.slow
def test_cli_provider_token_prints_a_token_for_the_provider(redis_url: str, tmp_path: Path) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("COCOON_")}
    env.update(COCOON_DATA_DIR=str(tmp_path / "cli"), COCOON_REDIS_URL=redis_url)
    cli = [sys.executable, "-m", "backend.cli"]
    subprocess.run([*cli, "db", "upgrade"], env=env, cwd=tmp_path, check=True, capture_output=True)
    done = subprocess.run(
        [*cli, "provider", "token", "--telegram-id", "4711"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert token.startswith("cct_") and "--register-url" in done.stderr

    async def check() -> None:
        client = aioredis.Redis.from_url(redis_url)
        cli_settings = Settings(_env_file=None, data_dir=tmp_path / "cli", redis_url=redis_url)
        db = Database.from_settings(cli_settings)
        try:
            grant = await store.lookup_token(client, token)
            user = await get_or_create_user(db, 4711)
            assert grant is not None and grant.kind == "registration"
            assert grant.provider_id == user.id
        finally:
            await client.aclose()
            await db.close()

    asyncio.run(check())
    bad = subprocess.run(
        [*cli, "provider", "token", "--telegram-id", "-3"], env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "--telegram-id" in bad.stderr


async def test_the_http_api_answers_json_with_reasons(
    admin: aioredis.Redis,
    web,
) -> None:
    from aiohttp import ClientSession

    url = await web(allow_dev=False)
    token = await store.issue_registration_token(admin, None, 60)
    keys = WorkerKeys.generate()
    async with ClientSession() as http:
        reply = await http.post(f"{url}/v1/workers/nonce", json={"token": "cct_unknown"})
        assert reply.status == 401 and "token" in (await reply.json())["error"]
        reply = await http.post(f"{url}/v1/workers/nonce", data=b"not json")
        assert reply.status == 400
        nonce = (await (await http.post(f"{url}/v1/workers/nonce", json={"token": token})).json())[
            "nonce"
        ]
        reply = await http.post(
            f"{url}/v1/workers/register", json={"token": token, "evidence": {"tee": "sgx"}}
        )
        assert reply.status == 400 and "malformed evidence" in (await reply.json())["error"]
        evidence = ev.dev_evidence(claims_for(keys, nonce)).model_dump(mode="json")
        bad_keys = {**evidence, "claims": {**evidence["claims"], "box_public_key": "xx"}}
        reply = await http.post(
            f"{url}/v1/workers/register", json={"token": token, "evidence": bad_keys}
        )
        assert reply.status == 400
        reply = await http.post(  # its nonce was used up by the attempt above
            f"{url}/v1/workers/register", json={"token": token, "evidence": evidence}
        )
        body = await reply.json()
        assert reply.status == 403 and body["accepted"] is False
        assert "already used" in body["reasons"][0]
        fresh = await (await http.post(f"{url}/v1/workers/nonce", json={"token": token})).json()
        evidence = ev.dev_evidence(claims_for(keys, fresh["nonce"])).model_dump(mode="json")
        reply = await http.post(
            f"{url}/v1/workers/register", json={"token": token, "evidence": evidence}
        )
        body = await reply.json()
        assert reply.status == 403 and body == {
            "error": "evidence refused",
            "reasons": [DEV_REFUSED],
            "accepted": False,
        }


async def test_a_workers_own_claims_count_for_nothing(admin: aioredis.Redis) -> None:
    keys = WorkerKeys.generate()
    claimed = worker_info("w-claims", keys, capacity=2, tee="tdx", provider_id=99)  # claimed
    await registry.register(admin, claimed, ttl_s=30)
    listed = await registry.get_worker(admin, "w-claims")
    assert listed is not None and listed.tee == "dev" and not listed.attested
    picked = await registry.pick_worker(admin, MODEL, attested_only=True)
    assert picked is None or picked.worker_id != "w-claims"
    now = time.time()
    record = registry.AttestationRecord(
        worker_id="w-claims",
        tee="tdx",
        box_public_key=keys.box_public_b64,
        verify_key=keys.verify_key_b64,
        model=MODEL,
        provider_id=5,
        attested_at=now,
        expires_at=now + 60,
    )
    await registry.write_attestation(admin, record)
    listed = await registry.get_worker(admin, "w-claims")
    assert listed is not None and listed.attested and listed.tee == "tdx"
    assert listed.provider_id == 5  # the backend's record, not the worker's claim
    # An entry whose keys differ from the attested ones is not listed at all.
    other = WorkerKeys.generate()
    swapped = claimed.model_copy(update={"box_public_key": other.box_public_b64})
    await registry.register(admin, swapped, ttl_s=30)
    assert await registry.get_worker(admin, "w-claims") is None
