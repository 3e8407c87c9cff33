"""Onboarding with the recorded TDX hosts' quotes (tests/support/tdx_hosts.py, a recorded PCCS
on loopback): a v5 quote gets a refusal with reasons, not a server error; the backend's own
faults (Intel's collateral service down, a verifier crash, a Redis fault after the decision)
are not refusals and spend no nonce or token; a renewal that meets one revokes nothing; and
the node reads a 5xx as "try again", a 4xx as refused."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import dcap_qvl
import pytest
import redis.asyncio as aioredis
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer

from backend.attestation import store
from backend.attestation.onboarding import ONBOARDING
from backend.settings import Settings
from tests.support.attest import (
    MODELS,
    REPORT_DATA_REFUSAL,
    base_url,
    claims_for,
    open_credentials,
    serve_backend,
    with_attestation,
)
from tests.support.tdx_hosts import AT_90C06F, HOST_A, HOST_B, IMAGES, TD15, RecordedPccs, image
from workers import evidence as ev
from workers import registry
from workers.wire import WorkerKeys


@pytest.fixture
async def backend(
    settings: Settings, pccs: RecordedPccs, tmp_path: Path, admin: aioredis.Redis
) -> AsyncIterator[tuple[str, web.Application]]:
    """``cocoon web`` with the local PCCS and an allow-list of the recorded images, its verifier
    at the 90C06F collateral's time."""
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(
        json.dumps({"images": [image(name) for name in IMAGES], "models": MODELS})
    )
    s = with_attestation(
        settings,
        allow_dev=True,
        pccs_url=pccs.url,
        policy_file=policy_file,
        collateral_dir=tmp_path / "collateral",
    )
    server = await serve_backend(s)
    server.app[ONBOARDING].verifier.clock = lambda: AT_90C06F
    yield base_url(server), server.app
    await server.close()


async def register(
    http: ClientSession, url: str, token: str, evidence: ev.Evidence
) -> tuple[int, dict[str, Any]]:
    payload = {"token": token, "evidence": evidence.model_dump(mode="json")}
    async with http.post(f"{url}/v1/workers/register", json=payload) as reply:
        return reply.status, await reply.json()


async def fresh_nonce(http: ClientSession, url: str, token: str) -> str:
    async with http.post(f"{url}/v1/workers/nonce", json={"token": token}) as reply:
        return (await reply.json())["nonce"]


def tdx_evidence(keys: WorkerKeys, nonce: str, raw: bytes) -> ev.Evidence:
    quote = base64.b64encode(raw).decode()
    return ev.Evidence(tee="tdx", claims=claims_for(keys, nonce), quote=quote)


async def test_a_v5_quote_gets_a_refusal_with_reasons_not_a_server_error(
    backend: tuple[str, web.Application], admin: aioredis.Redis
) -> None:
    url, _app = backend
    token = await store.issue_registration_token(admin, None, 600)
    async with ClientSession() as http:
        for raw in (TD15, HOST_B, HOST_A):
            nonce = await fresh_nonce(http, url, token)
            status, body = await register(
                http, url, token, tdx_evidence(WorkerKeys.generate(), nonce, raw)
            )
            # Verified, allow-listed, UpToDate: only the report data (not our claims) is wrong.
            assert (status, body["reasons"]) == (403, [REPORT_DATA_REFUSAL]), body


async def test_the_backends_own_faults_are_not_refusals_and_spend_no_nonce(
    backend: tuple[str, web.Application],
    pccs: RecordedPccs,
    admin: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, _app = backend
    token = await store.issue_registration_token(admin, None, 600)
    keys = WorkerKeys.generate()
    port = int(pccs.url.rsplit(":", 1)[1])
    async with ClientSession() as http:
        nonce = await fresh_nonce(http, url, token)
        evidence = tdx_evidence(keys, nonce, TD15)
        # Intel's collateral service is down and nothing is cached: 503, nothing decided.
        await pccs.stop()
        status, body = await register(http, url, token, evidence)
        assert status == 503 and "accepted" not in body, body
        assert "cannot verify evidence right now" in body["error"]
        assert "cannot fetch collateral from" in body["reasons"][0]
        # A crash in the verifier: 500, said as such, nothing decided.
        await pccs.start(port)

        def crash(*_args: Any) -> Any:
            raise RuntimeError("library fault")

        with monkeypatch.context() as patched:
            patched.setattr(dcap_qvl, "verify", crash)
            status, body = await register(http, url, token, evidence)
        assert status == 500 and "accepted" not in body, body
        assert body["error"].startswith("internal error on the backend (RuntimeError)")
        # The same evidence, same nonce, once the backend is well: decided (and only then used).
        status, body = await register(http, url, token, evidence)
        assert (status, body["reasons"]) == (403, [REPORT_DATA_REFUSAL]), body
        status, body = await register(http, url, token, evidence)
        assert status == 403 and "already used" in body["reasons"][0]


async def test_a_renewal_that_meets_a_backend_fault_revokes_nothing(
    backend: tuple[str, web.Application], pccs: RecordedPccs, admin: aioredis.Redis
) -> None:
    url, _app = backend
    keys = WorkerKeys.generate()
    async with ClientSession() as http:
        token = await store.issue_registration_token(admin, None, 600)
        nonce = await fresh_nonce(http, url, token)
        status, body = await register(http, url, token, ev.dev_evidence(claims_for(keys, nonce)))
        assert status == 200, body
        worker_id = body["worker_id"]
        renewal = open_credentials(body, keys)["renewal_token"]
        await pccs.stop()
        nonce = await fresh_nonce(http, url, renewal)
        status, body = await register(http, url, renewal, tdx_evidence(keys, nonce, HOST_A))
        assert status == 503, body
        # Still attested, with its renewal token good: a PCS outage revokes no worker.
        assert await registry.read_attestation(admin, worker_id) is not None
        assert await store.lookup_token(admin, renewal) is not None


async def test_a_worker_reads_a_backend_fault_as_try_again_not_as_refused() -> None:
    """The node side: a 5xx is :class:`BackendUnavailable` (retried like an unreachable backend),
    a 4xx is a refusal that stops it."""
    answers = iter([(503, ["cannot fetch collateral"]), (403, ["dev mode is off"])])

    async def nonce(_request: web.Request) -> web.Response:
        status, reasons = next(answers)
        return web.json_response({"error": "x", "reasons": reasons}, status=status)

    app = web.Application()
    app.router.add_post("/v1/workers/nonce", nonce)
    server = TestServer(app)
    await server.start_server()
    keys = WorkerKeys.generate()
    claims = claims_for(keys, "n" * 32).model_dump(exclude={"nonce"})
    url = str(server.make_url("")).rstrip("/")
    try:
        with pytest.raises(ev.BackendUnavailable, match="HTTP 503: cannot fetch collateral"):
            await ev.register_with_backend(url, "cct_x", claims, keys.box_key, tee="dev")
        with pytest.raises(ev.AttestationRefused, match="dev mode is off"):
            await ev.register_with_backend(url, "cct_x", claims, keys.box_key, tee="dev")
    finally:
        await server.close()


async def test_a_redis_fault_after_the_decision_gives_back_the_token_and_the_nonce(
    settings: Settings, admin: aioredis.Redis, redis_url: str
) -> None:
    """The backend's Redis user may not create ACL users (a misconfigured deployment): the
    accepted worker gets 503-worthy RedisError, and keeps its token and nonce to try again."""
    from backend.attestation.onboarding import OnboardingError
    from tests.support.attest import service

    # ACL users are the server's, not a database's: a name of this test's own, so a test run
    # beside another (on the same server) never deletes the other's user.
    name = f"cocoon-test-no-acl-{uuid.uuid4().hex[:12]}"
    password = "pw-" + WorkerKeys.generate().fingerprint()
    await admin.execute_command(
        "ACL", "SETUSER", name, "reset", "on", f">{password}", "~*", "&*", "+@all", "-acl"
    )
    limited = aioredis.Redis.from_url(redis_url.replace("redis://", f"redis://{name}:{password}@"))
    try:
        onboarding = service(settings, limited, allow_dev=True)
        token = await store.issue_registration_token(admin, None, 600)
        nonce = (await onboarding.nonce(token))["nonce"]
        evidence = ev.dev_evidence(claims_for(WorkerKeys.generate(), nonce))
        with pytest.raises(Exception) as caught:
            await onboarding.register(token, evidence.model_dump(mode="json"))
        assert not isinstance(caught.value, OnboardingError)  # not a refusal: a Redis fault
        assert "acl" in str(caught.value).lower() or "permission" in str(caught.value).lower()
        grant = await store.lookup_token(admin, token)
        assert grant is not None and await store.check_nonce(admin, nonce, grant) is None
        assert 0 < await store.token_ttl_ms(admin, token) <= 600_000  # its life, not a new one
        # With a backend allowed to manage ACL users, the same token and nonce now succeed.
        reply = await service(settings, admin, allow_dev=True).register(
            token, evidence.model_dump(mode="json")
        )
        assert reply["accepted"] is True
    finally:
        await admin.execute_command("ACL", "DELUSER", name)
        await limited.aclose()
