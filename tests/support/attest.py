"""Attestation test data and the onboarding service over it: the real TDX quote and its
recorded Intel collateral (``tests/fixtures/tdx``, README there), an allow-list policy that
admits the quote's measurements (running the instant engine as configured by default) and the
weights ``WEIGHTS`` for ``MODEL``, and a worker's development-TEE or TDX evidence claiming them;
a plain onboarding service (no allow-list) for development-TEE workers; ``cocoon web`` on
loopback, and a dispatcher that sends turns to attested workers only."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import nacl.public
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from redis.exceptions import NoPermissionError

from backend.attestation import acl
from backend.attestation.collateral import CollateralSource
from backend.attestation.onboarding import Onboarding
from backend.attestation.policy import Policy
from backend.attestation.verifier import Verifier
from backend.db import Database
from backend.dispatch import Dispatcher
from backend.ledger import Ledger
from backend.settings import AttestationSettings, ModelPrice, Settings
from backend.web import create_app
from workers import evidence as ev
from workers.registry import WorkerInfo
from workers.wire import WorkerKeys

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "tdx"
QUOTE = (FIXTURES / "tdx_quote").read_bytes()
COLLATERAL = (FIXTURES / "tdx_quote_collateral.json").read_text()
AT = 1751624163  # inside the collateral's window
MODEL = "echo"
WEIGHTS = hashlib.sha256(b"the weights of echo").hexdigest()  # what the workers here claim
ENGINE_CONFIG = {"token_delay": 0.0}  # the instant engine's attested configuration, by default
MODELS = {MODEL: {"weights_sha256": [WEIGHTS]}}  # the policy's weights allow-list

# The one refusal of the real quote when it is offered for other claims (it was taken for others).
REPORT_DATA_REFUSAL = (
    "the quote's report data does not equal SHA-512 of the claims: the quote was not taken for "
    "these keys and this nonce"
)

MEASURED = {
    "mr_td": "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a"
    "3520c942a604a407de03ae6dc5f87f27428b2538873118b7",
    "rtmr0": "44c0197b39157fdd7a4dcc44767f9d6b0bb3977c7a8e347b"
    "8492f827fe9d9e5c48aca29b220b80b6a540cf994b9bc9c0",
    "rtmr1": "0084452c01668329d4bc06acdf58a7205c26743304509973"
    "949e5619bf81a6a7aea8c323c173019b3093d54e579e9378",
    "rtmr2": "d833feef2cd945148aa38ead2c53e9b7f138190aaaebfc55"
    "1dccd829fc207aa3ba80b70870d7330733642e01d48c3132",
    "rtmr3": "0" * 96,
}


def image(**changes: object) -> dict[str, object]:
    """The allow-list entry of the real quote's image (running the instant engine as configured
    by default), with ``changes``."""
    engines = [{"engine": "instant", "config": ENGINE_CONFIG}]
    return {"name": "cocoon-worker", "version": "0.1.0", **MEASURED, "engines": engines, **changes}


def policy(*images: dict[str, object], tcb: tuple[str, ...] = ("UpToDate",)) -> Policy:
    return Policy.model_validate(
        {"tcb_statuses": list(tcb), "images": list(images or [image()]), "models": MODELS}
    )


def with_attestation(settings: Settings, **values: object) -> Settings:
    """The test settings with these attestation settings and one model, ``MODEL``."""
    models = {MODEL: ModelPrice(prompt=1_000_000, completion=1_000_000)}
    attestation = AttestationSettings(**values)  # type: ignore[arg-type]
    return settings.model_copy(update={"attestation": attestation, "models": models})


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """The backend's Redis client; the worker users a test made are deleted after it."""
    client = aioredis.Redis.from_url(redis_url)
    before = set(await acl.worker_users(client))
    yield client
    for worker_id in set(await acl.worker_users(client)) - before:  # the users this test made
        await acl.delete_worker_user(client, worker_id)
    await client.aclose()


def service(
    settings: Settings, admin: aioredis.Redis, *, clock: float | None = None, **values: object
) -> Onboarding:
    """The onboarding service with the recorded collateral cached and the quote's image allowed."""
    s = with_attestation(settings, **values)
    collateral = CollateralSource("https://pccs.test", settings.data_dir / "collateral")
    collateral.store(CollateralSource.cache_key(QUOTE), COLLATERAL)  # recorded collateral
    verifier = Verifier(
        s.attestation,
        policy=policy(),
        collateral=collateral,
        models=s.models,
        clock=(lambda: clock) if clock else time.time,
    )
    return Onboarding(s, admin, verifier)


def assert_no_permission(*attempts: Callable[[], object]) -> None:
    """Each of ``attempts`` (a worker's Redis commands) is refused by its ACL: NOPERM."""
    for attempt in attempts:
        with pytest.raises(NoPermissionError):
            attempt()


def worker_info(worker_id: str, keys: WorkerKeys, /, **changes: object) -> WorkerInfo:
    """A worker's registry entry: ``MODEL`` on the instant engine 1 with ``keys``, 4 jobs at
    once, with ``changes``."""
    values: dict[str, object] = {
        "worker_id": worker_id,
        "model": MODEL,
        "engine": "instant",
        "engine_version": "1",
        "box_public_key": keys.box_public_b64,
        "verify_key": keys.verify_key_b64,
        "capacity": 4,
    }
    return WorkerInfo(**{**values, **changes})  # type: ignore[arg-type]


def claims_for(keys: WorkerKeys, nonce: str, **changes: object) -> ev.Claims:
    """An honest worker's claims (allow-listed weights and engine configuration), with
    ``changes``."""
    values: dict[str, object] = {
        "box_public_key": keys.box_public_b64,
        "verify_key": keys.verify_key_b64,
        "model": MODEL,
        "model_sha256": WEIGHTS,
        "engine": "instant",
        "engine_version": "1",
        "engine_config": ENGINE_CONFIG,
        "worker_version": "0.1.0",
        "nonce": nonce,
    }
    return ev.Claims(**{**values, **changes})  # type: ignore[arg-type]


async def attest(
    onboarding: Onboarding, token: str, keys: WorkerKeys, *, tee: str = "dev", nonce: str = ""
) -> dict:
    """Register a worker with ``token``: development-TEE evidence, or the real quote (``tdx``)."""
    nonce = nonce or (await onboarding.nonce(token))["nonce"]
    claims = claims_for(keys, nonce)
    if tee == "dev":
        evidence = ev.dev_evidence(claims)
    else:
        evidence = ev.Evidence(tee="tdx", claims=claims, quote=base64.b64encode(QUOTE).decode())
    return await onboarding.register(token, evidence.model_dump(mode="json"))


def plain_service(
    s: Settings, admin: aioredis.Redis, *, policy: Policy | None = None
) -> Onboarding:
    """The onboarding service of the settings ``s`` under ``policy`` (by default one that lists
    no image and no weights), no collateral recorded: development-TEE workers pass."""
    collateral = CollateralSource("https://pccs.test", s.data_dir / "collateral")
    verifier = Verifier(
        s.attestation, policy=policy or Policy(), collateral=collateral, models=s.models
    )
    return Onboarding(s, admin, verifier)


def plain_claims(keys: WorkerKeys, nonce: str) -> ev.Claims:
    """A development worker's claims for ``MODEL`` on the instant engine, no weights digest."""
    return ev.Claims(
        box_public_key=keys.box_public_b64,
        verify_key=keys.verify_key_b64,
        model=MODEL,
        engine="instant",
        engine_version="1",
        worker_version="0.1.0",
        nonce=nonce,
    )


def open_credentials(reply: dict, keys: WorkerKeys) -> dict:
    """The credentials an accepted registration sealed to the worker's box key."""
    sealed = base64.b64decode(reply["sealed"])
    return json.loads(nacl.public.SealedBox(keys.box_key).decrypt(sealed))


async def register_plain(onboarding: Onboarding, token: str, keys: WorkerKeys) -> tuple[dict, dict]:
    """Register a development worker (:func:`plain_claims`) with ``token``: the reply, and the
    credentials it sealed."""
    nonce = (await onboarding.nonce(token))["nonce"]
    evidence = ev.dev_evidence(plain_claims(keys, nonce))
    reply = await onboarding.register(token, evidence.model_dump(mode="json"))
    return reply, open_credentials(reply, keys)


async def serve_backend(s: Settings) -> TestServer:
    """``cocoon web`` with the settings ``s`` on loopback, its database upgraded first (the app
    is ``server.app``, its URL :func:`base_url`)."""
    db = Database.from_settings(s)
    await db.upgrade()
    await db.close()
    server = TestServer(create_app(s))
    await server.start_server()
    return server


def base_url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


@contextlib.asynccontextmanager
async def attested_dispatch(settings: Settings) -> AsyncIterator[tuple[Ledger, Dispatcher]]:
    """A ledger on the test database and a dispatcher that sends turns to attested workers only
    (dev mode off), closed on the way out."""
    s = with_attestation(settings, allow_dev=False)
    db = Database.from_settings(s)
    await db.upgrade()
    ledger = Ledger(db)
    dispatcher = Dispatcher.from_settings(s, ledger)
    try:
        yield ledger, dispatcher
    finally:
        await dispatcher.close()
        await db.close()
