"""Verify it yourself (issue 13): the public attestation report, receipts, and sealed turns, on
``cocoon up``'s network (``tests/support/network.py``: ``cocoon web`` on loopback, real Redis
with the worker ACL, a worker node process onboarded with development-TEE evidence).

The client side is the project's own: :mod:`backend.attestation.checks` (what ``cocoon attest
report`` and ``cocoon verify-receipt`` run) and :class:`backend.client.SealedClient`.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nacl.public import PrivateKey
from sqlalchemy import select

from backend.attestation.checks import WorkerCheck, check_receipt, check_report
from backend.attestation.policy import Policy
from backend.attestation.report import MAX_PER_CLIENT, REPORTS
from backend.cli import main as cocoon
from backend.client import SealedClient, SealedError
from backend.models import Hold, HoldState
from backend.settings import Settings
from tests.support.network import SERVED, Network, network
from workers.receipts import parse_signed_receipt
from workers.stream_crypto import StreamOpener
from workers.wire import (
    ChatMessage,
    FinalRecord,
    JobRequest,
    StreamChunk,
    new_reply_keypair,
    public_b64,
    seal_request,
)

pytestmark = pytest.mark.slow  # cocoon web, a worker node process

DEV = Policy()  # no released image: only development-TEE evidence, when allowed


@pytest.fixture
async def net(settings: Settings, redis_url: str, tmp_path: Path) -> AsyncIterator[Network]:
    async with network(settings, tmp_path / "net") as n:
        yield n


async def fetch(net: Network, nonce: str, model: str = SERVED) -> tuple[int, dict[str, Any]]:
    url = f"{net.url}/v1/attestation/report"
    async with net.session.get(url, params={"model": model, "nonce": nonce}) as reply:
        return reply.status, await reply.json()


async def trusted_report(net: Network) -> tuple[str, dict[str, Any]]:
    nonce = secrets.token_hex(32)
    status, report = await fetch(net, nonce)
    assert status == 200, report
    return nonce, report


async def hand_sealed(
    net: Network, content: str, *, model: str = SERVED, sealed_max: int, declared: int
) -> tuple[dict[str, Any], PrivateKey, WorkerCheck]:
    """A sealed request built here, as any client would (``"max_tokens": declared`` outside,
    ``sealed_max`` inside), to the honest worker of a fresh report: the body, the reply key."""
    nonce, report = await trusted_report(net)
    [worker] = await check_report(report, model=SERVED, nonce=nonce, policy=DEV, allow_dev=True)
    job_id = f"{net.honest_id}_{secrets.token_hex(16)}-1"
    reply_key = new_reply_keypair()
    request = JobRequest(
        job_id=job_id,
        model=model,
        messages=[ChatMessage(role="user", content=content)],
        max_tokens=sealed_max,
        reply_key=public_b64(reply_key),
    )
    body = {
        "model": SERVED,
        "worker_id": net.honest_id,
        "job_id": job_id,
        "max_tokens": declared,
        "sealed_request": base64.b64encode(seal_request(request, worker.box_public_key)).decode(),
    }
    return body, reply_key, worker


# -- the public report --------------------------------------------------------------------------


async def test_report_is_fresh_and_verifies_here(net: Network) -> None:
    nonce, report = await trusted_report(net)
    assert [w["worker_id"] for w in report["workers"]] == [net.honest_id]
    [check] = await check_report(report, model=SERVED, nonce=nonce, policy=DEV, allow_dev=True)
    assert check.trusted, check.reasons
    assert any("development TEE" in why for why in check.trusted_because)
    assert any("nonce is signed" in why for why in check.trusted_because)
    # Dev evidence proves nothing: a client that does not allow it refuses the worker.
    [strict] = await check_report(report, model=SERVED, nonce=nonce, policy=DEV)
    assert not strict.trusted and "development-TEE evidence is refused" in strict.reasons[0]
    # Another nonce than the one signed: a replayed report.
    [stale] = await check_report(
        report, model=SERVED, nonce=secrets.token_hex(32), policy=DEV, allow_dev=True
    )
    assert any("stale" in reason for reason in stale.reasons)


async def test_a_tampered_report_is_refused(net: Network) -> None:
    nonce, report = await trusted_report(net)
    box = report["workers"][0]["evidence"]["claims"]["box_public_key"]
    other = base64.b64encode(hashlib.sha256(b"the operator's own key").digest()).decode()
    tampered = copy.deepcopy(report)
    tampered["workers"][0]["evidence"]["claims"]["box_public_key"] = other
    [check] = await check_report(tampered, model=SERVED, nonce=nonce, policy=DEV, allow_dev=True)
    assert not check.trusted
    assert any("report data does not match" in r for r in check.reasons), check.reasons
    assert any("fingerprint" in r for r in check.reasons)
    flipped = copy.deepcopy(report)
    signature = bytearray(base64.b64decode(flipped["workers"][0]["signature"]))
    signature[0] ^= 1
    flipped["workers"][0]["signature"] = base64.b64encode(bytes(signature)).decode()
    [check] = await check_report(flipped, model=SERVED, nonce=nonce, policy=DEV, allow_dev=True)
    assert not check.trusted and any("stale" in r for r in check.reasons)
    assert box != other


async def test_a_worker_whose_weights_are_not_allowed_is_refused(net: Network) -> None:
    nonce, report = await trusted_report(net)
    policy = Policy.model_validate({"models": {SERVED: {"weights_sha256": ["ab" * 32]}}})
    [check] = await check_report(report, model=SERVED, nonce=nonce, policy=policy, allow_dev=True)
    assert not check.trusted
    assert any("claims no weights digest" in r for r in check.reasons), check.reasons


async def test_report_refuses_bad_queries(net: Network) -> None:
    assert (await fetch(net, "not hex"))[0] == 400
    assert (await fetch(net, "ab" * 8 + "A"))[0] == 400
    assert (await fetch(net, secrets.token_hex(16), model="no-such-model"))[0] == 404


async def test_cocoon_attest_report_exit_codes(net: Network, tmp_path: Path) -> None:
    saved = tmp_path / "report.json"
    args = ["attest", "report", "--url", net.url, "--model", SERVED, "--save", str(saved)]
    assert await asyncio.to_thread(cocoon, [*args, "--allow-dev"]) == 0
    assert json.loads(saved.read_text())["workers"][0]["worker_id"] == net.honest_id
    assert await asyncio.to_thread(cocoon, args) == 1  # dev evidence not allowed
    assert await asyncio.to_thread(cocoon, [*args[:3], "http://127.0.0.1:9", *args[4:]]) == 70
    with pytest.raises(SystemExit) as bad:
        await asyncio.to_thread(cocoon, [*args[:3], "127.0.0.1:9", *args[4:]])
    assert bad.value.code == 2


# -- receipts -----------------------------------------------------------------------------------


async def test_every_completion_carries_a_receipt_its_owner_can_fetch_and_check(
    net: Network, tmp_path: Path
) -> None:
    reply = await net.honest_turn()
    receipt = reply.body["cocoon"]["receipt"]
    signed = receipt["signed"]["receipt"]
    assert signed["reply_sha256"] == hashlib.sha256(reply.text.encode()).hexdigest()
    assert receipt["billed"]["completion_tokens"] == reply.body["usage"]["completion_tokens"]
    turn = reply.body["id"].removeprefix("chatcmpl-")
    headers = {"Authorization": f"Bearer {net.api_key}"}
    async with net.session.get(f"{net.url}/v1/receipts/{reply.body['id']}", headers=headers) as r:
        assert r.status == 200 and await r.json() == receipt
    _other, other_key = await net.user(9100)
    headers = {"Authorization": f"Bearer {other_key}"}
    async with net.session.get(f"{net.url}/v1/receipts/{turn}", headers=headers) as r:
        assert r.status == 404  # another user's receipt does not exist for them

    nonce, report = await trusted_report(net)
    checks = await check_report(report, model=SERVED, nonce=nonce, policy=DEV, allow_dev=True)
    reasons, _ = check_receipt(receipt, checks, turn_id=turn, reply=reply.text)
    assert reasons == []
    # One byte changed: the signature no longer verifies.
    changed = copy.deepcopy(receipt)
    changed["signed"]["receipt"]["completion_tokens"] += 1
    assert "not signed" in check_receipt(changed, checks, turn_id=turn)[0][0]
    # Another job's receipt offered for this turn.
    second = await net.honest_turn()
    other = second.body["cocoon"]["receipt"]
    reasons, _ = check_receipt(other, checks, turn_id=turn)
    assert reasons and "another turn" in reasons[0]
    # A reply that is not the one signed.
    assert check_receipt(receipt, checks, reply=reply.text + "!")[0]

    # The same, offline, with the project's command.
    report_file, completion = tmp_path / "report.json", tmp_path / "completion.json"
    report_file.write_text(json.dumps(report))
    completion.write_text(json.dumps(reply.body))
    check = ["verify-receipt", str(completion), "--report", str(report_file), "--allow-dev"]
    assert await asyncio.to_thread(cocoon, check) == 0
    body = copy.deepcopy(reply.body)
    raw = json.dumps(body["cocoon"]["receipt"]["signed"]["receipt"]).encode()
    body["cocoon"]["receipt"]["signed"]["receipt"]["request_sha256"] = hashlib.sha256(
        raw
    ).hexdigest()
    completion.write_text(json.dumps(body))
    assert await asyncio.to_thread(cocoon, check) == 1
    completion.write_text(json.dumps({**reply.body, "id": second.body["id"]}))
    assert await asyncio.to_thread(cocoon, check) == 1  # the receipt of another turn


# -- sealed turns -------------------------------------------------------------------------------


async def test_a_sealed_turn_is_verified_and_billed_from_its_receipt(net: Network) -> None:
    before = await net.available()
    async with SealedClient(net.url, net.api_key, policy=DEV, allow_dev=True) as client:
        reply = await client.chat(
            SERVED, [{"role": "user", "content": "sealed hello"}], max_tokens=8
        )
    assert reply.text == "sealed hello"
    assert reply.worker.worker_id == net.honest_id
    assert reply.receipt["sealed"] is True
    assert 0 < reply.cost_nanoton == before - await net.available()
    signed = parse_signed_receipt(json.dumps(reply.receipt["signed"]))
    assert signed.receipt.job_id == reply.job_id
    assert (await net.audit()).ok


async def test_sealed_requests_are_bounded_and_used_once(net: Network) -> None:
    headers = {"Authorization": f"Bearer {net.api_key}"}
    url = f"{net.url}/v1/sealed/chat/completions"
    body, _key, _worker = await hand_sealed(
        net, "hi", model="another-model", sealed_max=4, declared=4
    )
    body["stream"] = False
    before = await net.available()
    async with net.session.post(url, json=body, headers=headers) as reply:
        answer = await reply.json()
        assert reply.status == 502, answer  # a sealed error record and no receipt: no bill
    assert answer["error"]["code"] == "worker_error" and len(answer["events"]) == 1
    assert "without a valid receipt" in answer["error"]["message"]
    assert await net.available() == before
    async with net.session.post(url, json=body, headers=headers) as reply:
        assert reply.status == 400 and "used already" in (await reply.json())["error"]["message"]
    # Ciphertext the worker cannot open gets no answer: the turn times out, nothing billed.
    net.dispatcher.first_token_timeout_s = 1.0
    garbage = {**body, "job_id": f"{net.honest_id}_{secrets.token_hex(16)}-1"}
    garbage["sealed_request"] = base64.b64encode(b"x" * 64).decode()
    async with net.session.post(url, json=garbage, headers=headers) as reply:
        assert (await reply.json())["error"]["code"] == "timeout"
    assert await net.available() == before
    for change in (
        {"job_id": f"w-0000000000000000_{secrets.token_hex(16)}-1"},
        {"job_id": f"{net.honest_id}_{secrets.token_hex(16)}-2"},
        {"worker_id": "w-0000000000000000", "job_id": f"w-0000000000000000_{'a' * 32}-1"},
        {"sealed_request": "not base64!"},
        {"max_tokens": 10**6},
        {"extra": 1},
    ):
        async with net.session.post(url, json={**body, **change}, headers=headers) as reply:
            assert reply.status in (400, 503), await reply.text()
    assert await net.available() == before
    with pytest.raises(SealedError, match="no worker"):
        async with SealedClient(net.url, net.api_key, policy=DEV) as client:
            await client.chat(SERVED, [{"role": "user", "content": "x"}], max_tokens=4)
    assert (await net.audit()).ok


async def test_a_sealed_request_asking_more_than_it_declared_stops_at_the_declared_bound(
    net: Network,
) -> None:
    """Sealed max_tokens 4096, declared 2: the node generates 2 tokens (the bound it gets in the
    clear with the job), the turn is billed for them, and no reply is cut off unpaid."""
    words = " ".join(f"word{i:04d}" for i in range(300))  # 2,700 bytes: past 2 tokens' bound
    body, reply_key, worker = await hand_sealed(net, words, sealed_max=4096, declared=2)
    job_id = body["job_id"]
    body["stream"] = False
    before = await net.available()
    headers = {"Authorization": f"Bearer {net.api_key}"}
    url = f"{net.url}/v1/sealed/chat/completions"
    async with net.session.post(url, json=body, headers=headers) as reply:
        answer = await reply.json()
        assert reply.status == 200, answer
    opener = StreamOpener(reply_key, worker.verify_key, job_id)
    events = [opener.open(base64.b64decode(e)) for e in answer["events"]]
    assert "".join(e.text for e in events if isinstance(e, StreamChunk)) == "word0000 word0001"
    final = events[-1]
    assert isinstance(final, FinalRecord)
    assert (final.completion_tokens, final.finish_reason) == (2, "length")
    assert answer["usage"]["completion_tokens"] == 2
    assert answer["receipt"]["signed"]["receipt"]["completion_tokens"] == 2
    assert 0 < int(answer["cost_nanoton"]) == before - await net.available()
    assert (await net.audit()).ok


async def test_cocoon_chat_sealed(net: Network, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["chat", "--sealed", "--url", net.url, "--api-key", net.api_key, "--max-tokens", "8"]
    assert await asyncio.to_thread(cocoon, [*args, "--allow-dev", "sealed words"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "sealed words"
    assert "verified here" in err and "development TEE" in err and net.honest_id in err
    assert await asyncio.to_thread(cocoon, [*args, "sealed words"]) == 1  # dev not trusted
    assert "no_trusted_worker" in capsys.readouterr().err


async def test_a_sealed_turn_whose_client_leaves_settles_from_its_receipt(net: Network) -> None:
    words = " ".join(f"w{i}" for i in range(40))
    body, _key, _worker = await hand_sealed(net, words, sealed_max=64, declared=64)
    before = await net.available()
    headers = {"Authorization": f"Bearer {net.api_key}"}
    url = f"{net.url}/v1/sealed/chat/completions"
    async with net.session.post(url, json=body, headers=headers) as reply:
        assert reply.status == 200
        assert b"cocoon.sealed.start" in await reply.content.readline()
    # Gone after the first event: the turn settles in the background, from the receipt. The
    # test waits for its hold to close, however long a loaded machine takes (the test's own
    # timeout bounds it), not for a time it could overrun.
    hold = await closed_hold(net)
    assert hold.state == HoldState.SETTLED and hold.charged > 0
    assert await net.available() == before - hold.charged
    assert (await net.audit()).ok


async def closed_hold(net: Network) -> Hold:
    """The user's latest hold once it is closed."""
    while True:
        async with net.db.session() as session:
            hold = await session.scalar(
                select(Hold).where(Hold.user_id == net.user_id).order_by(Hold.id.desc()).limit(1)
            )
        if hold is not None and hold.state != HoldState.OPEN:
            return hold
        await asyncio.sleep(0.05)


async def test_sealed_turns_count_against_the_api_limits(net: Network) -> None:
    net.settings.api_rate_limit_per_key_per_minute = 1
    async with SealedClient(net.url, net.api_key, policy=DEV, allow_dev=True) as client:
        await client.chat(SERVED, [{"role": "user", "content": "one"}], max_tokens=4)
        with pytest.raises(SealedError, match="HTTP 429"):
            await client.chat(SERVED, [{"role": "user", "content": "two"}], max_tokens=4)


async def test_a_silent_worker_is_unanswered_and_reports_are_bounded(net: Network) -> None:
    rogue = await net.rogue()  # onboarded and dispatched to, but it answers no challenge
    net.server.app[REPORTS].timeout_s = 1.0
    nonces = [secrets.token_hex(16) for _ in range(MAX_PER_CLIENT + 1)]
    answers = await asyncio.gather(*(fetch(net, nonce) for nonce in nonces))
    statuses = sorted(status for status, _ in answers)
    assert statuses == [200] * MAX_PER_CLIENT + [429]
    report = next(body for status, body in answers if status == 200)
    assert [w["worker_id"] for w in report["workers"]] == [net.honest_id]
    assert report["unanswered"] == [rogue.worker_id]
