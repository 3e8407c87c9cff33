"""TLS between workers and Redis (issue 12, item 5), against a real redis-server that listens
with TLS only, on loopback, with certificates made for the test: outside the development TEE a
worker is given, and accepts, only ``rediss://``; its credentials carry the CA to check the
server with."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nacl.public
import pytest
import redis
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestServer

from backend.attestation import acl, store
from backend.attestation.onboarding import OnboardingError
from backend.attestation.policy import Policy
from backend.attestation.verifier import Verdict, Verifier
from backend.db import Database
from backend.dispatch import Dispatcher, TurnDone, TurnRequest, TurnText
from backend.ledger import Ledger
from backend.settings import Settings
from backend.users import get_or_create_user
from backend.web import create_app
from tests.support.attest import (
    MODEL,
    QUOTE,
    plain_claims,
    plain_service,
    register_plain,
    with_attestation,
)
from tests.support.redis_server import (
    RedisServer,
    TlsFiles,
    attested_worker,
    exit_status,
    free_port,
    make_certificates,
    start_node,
    stop_process,
)
from workers import evidence as ev
from workers import registry
from workers.wire import ChatMessage, WorkerKeys


@pytest.fixture
def tls(tmp_path: Path) -> TlsFiles:
    return make_certificates(tmp_path / "tls")


@pytest.fixture
def tls_redis(tmp_path: Path, tls: TlsFiles) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", tls=tls)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def admin(tls_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(tls_redis.url())
    yield client
    await client.aclose()


def with_tls(settings: Settings, server: RedisServer, tls: TlsFiles) -> Settings:
    s = with_attestation(
        settings,
        allow_dev=True,
        worker_redis_url=f"rediss://127.0.0.1:{server.port}/0",
        worker_redis_ca_file=tls.ca,
    )
    # The backend's own connection is TLS as well.
    return s.model_copy(update={"redis_url": server.url()})


@pytest.mark.slow  # a redis-server of its own
async def test_a_worker_is_told_a_rediss_url_and_the_ca_that_checks_it(
    settings: Settings, tls_redis: RedisServer, tls: TlsFiles, admin: aioredis.Redis
) -> None:
    onboarding = plain_service(with_tls(settings, tls_redis, tls), admin)
    token = await store.issue_registration_token(admin, None, 60)
    reply, credentials = await register_plain(onboarding, token, WorkerKeys.generate())
    assert credentials["redis_url"].startswith(f"rediss://cocoon-worker-0-{reply['worker_id']}:")
    assert credentials["redis_ca_pem"] == tls.ca.read_text()
    worker = redis.Redis.from_url(credentials["redis_url"], ssl_ca_data=credentials["redis_ca_pem"])
    try:
        assert worker.ping()
        with pytest.raises(redis.ConnectionError):  # no CA: the server is not trusted
            redis.Redis.from_url(credentials["redis_url"]).ping()
    finally:
        worker.close()
        await acl.delete_worker_user(admin, reply["worker_id"])


@pytest.mark.slow  # real processes
async def test_an_onboarded_node_serves_a_turn_over_tls_only(
    settings: Settings,
    tls_redis: RedisServer,
    tls: TlsFiles,
    admin: aioredis.Redis,
    tmp_path: Path,
) -> None:
    s = with_tls(settings, tls_redis, tls)
    db = Database.from_settings(s)
    await db.upgrade()
    server = TestServer(create_app(s))
    await server.start_server()
    log = tmp_path / "node.log"
    token = await store.issue_registration_token(admin, None, 60)
    node = start_node(str(server.make_url("")).rstrip("/"), token, log, model=MODEL)
    ledger = Ledger(db)
    dispatcher = Dispatcher.from_settings(s, ledger)
    try:
        await attested_worker(admin, node, log, MODEL)
        user = await get_or_create_user(db, 7001)
        await ledger.credit_deposit(user.id, 10**9, "dep:7001")
        turn = await dispatcher.start_turn(
            TurnRequest(user.id, MODEL, [ChatMessage(role="user", content="over TLS")], 8)
        )
        events = [event async for event in turn.events()]
        assert isinstance(events[-1], TurnDone)
        assert "".join(e.text for e in events if isinstance(e, TurnText)).strip()
        assert "NOPERM" not in log.read_text()
        # The server has no plaintext listener: a client without TLS gets nowhere.
        with pytest.raises(redis.ConnectionError):
            redis.Redis(port=tls_redis.port, socket_timeout=2, retry=None).ping()
    finally:
        stop_process(node)
        await dispatcher.close()
        await server.close()
        await db.close()


class GenuineQuote(Verifier):
    """Stands in for Intel's verification of a genuine TDX quote for these very claims (one
    cannot be taken here): it accepts TDX evidence, as the real verifier would such a quote."""

    async def verify(self, evidence: ev.Evidence) -> Verdict:
        assert evidence.tee == "tdx" and evidence.quote
        return Verdict(tee="tdx")


async def test_a_backend_without_tls_gives_no_attested_worker_a_plain_url(
    settings: Settings, redis_url: str
) -> None:
    s = with_attestation(settings, worker_redis_url="redis://redis.example:6379/0")
    client = aioredis.Redis.from_url(redis_url)
    try:
        onboarding = plain_service(s, client)
        onboarding.verifier = GenuineQuote(s.attestation, policy=Policy(), collateral=None)  # type: ignore[arg-type]
        token = await store.issue_registration_token(client, None, 60)
        nonce = (await onboarding.nonce(token))["nonce"]
        tdx = ev.Evidence(
            tee="tdx",
            claims=plain_claims(WorkerKeys.generate(), nonce),
            quote=base64.b64encode(QUOTE).decode(),
        )
        with pytest.raises(OnboardingError) as caught:
            await onboarding.register(token, tdx.model_dump(mode="json"))
        assert caught.value.status == 503 and "rediss://" in str(caught.value)
        # Nothing was decided: the token and the nonce are as they were.
        grant = await store.lookup_token(client, token)
        assert grant is not None and await store.check_nonce(client, nonce, grant) is None
        assert await client.zcard(registry.INDEX_KEY) == 0
    finally:
        await client.aclose()


@pytest.mark.slow  # real processes
async def test_an_attested_node_refuses_a_plain_redis_url(tmp_path: Path) -> None:
    """A backend (here a stand-in on loopback, harsher than ours: ours never does this) that
    tells a TDX worker ``redis://``: the node does not connect, says why and exits 3."""

    async def nonce(request: web.Request) -> web.Response:
        return web.json_response({"nonce": "ab" * 16, "expires_in": 60})

    async def register(request: web.Request) -> web.Response:
        body = await request.json()
        box = base64.b64decode(body["evidence"]["claims"]["box_public_key"])
        credentials = {
            "worker_id": "w-0123456789abcdef",
            "redis_url": f"redis://cocoon-worker-0-w-0123456789abcdef:pw@127.0.0.1:{free_port()}/0",
            "expires_at": time.time() + 3600,
            "renewal_token": "ccr_x",
            "tee": "tdx",
        }
        sealed = nacl.public.SealedBox(nacl.public.PublicKey(box)).encrypt(
            json.dumps(credentials).encode()
        )
        return web.json_response(
            {"accepted": True, "worker_id": credentials["worker_id"], "tee": "tdx",
             "sealed": base64.b64encode(sealed).decode()}
        )  # fmt: skip

    app = web.Application()
    app.router.add_post("/v1/workers/nonce", nonce)
    app.router.add_post("/v1/workers/register", register)
    backend = TestServer(app)
    await backend.start_server()
    log = tmp_path / "node.log"
    node = start_node(str(backend.make_url("")).rstrip("/"), "cct_x", log, model=MODEL)
    try:
        assert await exit_status(node, log) == 3, log.read_text()
        assert "rediss://" in log.read_text()
    finally:
        stop_process(node)
        await backend.close()
