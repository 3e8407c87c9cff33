"""Reusable enrollment tokens (issue 18): one token onboards several workers for its provider,
each through real development-TEE attestation on the real Redis and the real database (SQLite
and PostgreSQL); revoked, expired and over-the-hour tokens are refused with their reason; only
the token's SHA-256 is stored; revoking it leaves the workers it onboarded serving."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import html
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from sqlalchemy import text

from backend.attestation import enrollment
from backend.attestation.onboarding import Onboarding, OnboardingError
from backend.db import Database
from backend.settings import Settings
from backend.users import get_or_create_user
from tests.support.attest import (
    MODEL,
    attest,
    base_url,
    open_credentials,
    serve_backend,
    service,
    with_attestation,
)
from tests.support.bot import Harness
from tests.support.redis_server import (
    attested_worker,
    exit_status,
    read_log,
    start_node,
    stop_process,
)
from workers import registry
from workers.wire import WorkerKeys


class Clock:
    """The onboarding service's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC).timestamp()

    def __call__(self) -> float:
        return self.now


def with_db(
    settings: Settings, admin: aioredis.Redis, db: Database, clock: Clock, **values: object
) -> Onboarding:
    onboarding = service(settings, admin, allow_dev=True, **values)
    onboarding.db = db
    onboarding.clock = clock
    return onboarding


async def provider(db: Database) -> int:
    return (await get_or_create_user(db, secrets.randbelow(10**9) + 1)).id


async def refusal(call) -> OnboardingError:
    with pytest.raises(OnboardingError) as caught:
        await call
    return caught.value


async def test_one_reusable_token_onboards_two_workers_for_its_provider(
    settings: Settings, admin: aioredis.Redis, db: Database
) -> None:
    provider_id = await provider(db)
    onboarding = with_db(settings, admin, db, Clock())
    token, issued = await enrollment.issue(db, provider_id, 30)
    assert token.startswith("cce_")
    ids = []
    for _ in range(2):
        keys = WorkerKeys.generate()
        reply = await attest(onboarding, token, keys)
        assert reply["accepted"] and reply["tee"] == "dev"
        assert open_credentials(reply, keys)["worker_id"] == reply["worker_id"]
        record = await registry.read_attestation(admin, reply["worker_id"])
        assert record is not None and record.provider_id == provider_id
        ids.append(reply["worker_id"])
    assert len(set(ids)) == 2
    [listed] = await enrollment.active(db, provider_id)
    assert listed.id == issued.id and listed.onboarded == 2
    # Each worker renews with its own renewal token, as a one-time onboarded worker does.
    # Revoking the enrollment token refuses new workers and leaves these two attested.
    assert await enrollment.revoke(db, provider_id, issued.id)
    error = await refusal(attest(onboarding, token, WorkerKeys.generate()))
    assert error.status == 401 and "revoked by its provider" in error.reasons[0]
    for worker_id in ids:
        assert await registry.read_attestation(admin, worker_id) is not None
    assert await enrollment.active(db, provider_id) == []
    assert not await enrollment.revoke(db, provider_id, issued.id)  # already revoked


async def test_only_its_hash_is_stored_and_a_stranger_cannot_revoke_it(
    settings: Settings, db: Database
) -> None:
    owner, stranger = await provider(db), await provider(db)
    token, issued = await enrollment.issue(db, owner, 30)
    async with db.session() as session:
        rows = (await session.execute(text("SELECT * FROM enrollment_tokens"))).all()
    assert [row.token_hash for row in rows] == [hashlib.sha256(token.encode()).hexdigest()]
    secret = token.removeprefix("cce_")
    assert not [row for row in rows if any(secret in str(value) for value in row)]
    assert not await enrollment.revoke(db, stranger, issued.id)
    assert [e.id for e in await enrollment.active(db, owner)] == [issued.id]


async def test_an_expired_token_is_refused_with_its_date(
    settings: Settings, admin: aioredis.Redis, db: Database
) -> None:
    clock = Clock()
    onboarding = with_db(settings, admin, db, clock)
    token, issued = await enrollment.issue(db, await provider(db), 1)
    nonce = (await onboarding.nonce(token))["nonce"]
    clock.now += 86_400 + 1
    error = await refusal(attest(onboarding, token, WorkerKeys.generate(), nonce=nonce))
    assert error.status == 401
    assert error.reasons == [
        f"this enrollment token expired at {issued.expires_at:%Y-%m-%d %H:%M} UTC: ask its "
        "provider for a new one"
    ]
    unknown = await refusal(onboarding.nonce("cce_" + secrets.token_urlsafe(32)))
    assert unknown.status == 401 and unknown.reasons == ["unknown enrollment token"]
    # the worst a caller can send: a huge "token" is never even looked up
    assert (await refusal(onboarding.nonce("cce_" + "x" * 100_000))).status == 401


async def test_a_token_onboards_at_most_its_hourly_bound(
    settings: Settings, admin: aioredis.Redis, db: Database
) -> None:
    clock = Clock()
    clock.now = (clock.now // 3600) * 3600 + 10  # early in a clock hour
    onboarding = with_db(settings, admin, db, clock, enrollment_per_hour=2)
    provider_id = await provider(db)
    token, _issued = await enrollment.issue(db, provider_id, 30)
    for _ in range(2):
        assert (await attest(onboarding, token, WorkerKeys.generate()))["accepted"]
    error = await refusal(attest(onboarding, token, WorkerKeys.generate()))
    assert error.status == 429
    assert error.reasons == [
        "this enrollment token has onboarded 2 workers this hour, its limit; try again in 3590 s"
    ]
    # Two racing registrations with nonces taken before the bound was reached: one more
    # onboarding at most, never past the bound.
    other, _ = await enrollment.issue(db, provider_id, 30)
    nonces = [(await onboarding.nonce(other))["nonce"] for _ in range(3)]
    accepted = 0
    for nonce in nonces:
        try:
            accepted += (await attest(onboarding, other, WorkerKeys.generate(), nonce=nonce))[
                "accepted"
            ]
        except OnboardingError as refused:
            assert refused.status == 429
    assert accepted == 2
    # Next hour, the token onboards again; another provider's token was never affected.
    clock.now += 3600
    assert (await attest(onboarding, token, WorkerKeys.generate()))["accepted"]


async def test_nonces_are_bounded_too(
    settings: Settings, admin: aioredis.Redis, db: Database
) -> None:
    clock = Clock()
    clock.now = (clock.now // 3600) * 3600 + 10
    onboarding = with_db(settings, admin, db, clock, enrollment_per_hour=1)
    token, _ = await enrollment.issue(db, await provider(db), 30)
    for _ in range(enrollment.NONCES_PER_ONBOARDING):
        await onboarding.nonce(token)
    error = await refusal(onboarding.nonce(token))
    assert error.status == 429 and "too many nonces" in error.reasons[0]


async def test_without_a_database_an_enrollment_token_decides_nothing(
    settings: Settings, admin: aioredis.Redis
) -> None:
    onboarding = service(settings, admin, allow_dev=True)
    error = await refusal(onboarding.nonce("cce_" + secrets.token_urlsafe(32)))
    assert error.status == 503


@pytest.mark.slow
def test_the_cli_issues_and_revokes_a_reusable_token(redis_url: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COCOON_")}
    env.update(COCOON_DATA_DIR=str(tmp_path / "cli"), COCOON_REDIS_URL=redis_url)
    cli = [sys.executable, "-m", "backend.cli"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cli, *args], env=env, cwd=tmp_path, capture_output=True, text=True, check=False
        )

    assert run("db", "upgrade").returncode == 0
    done = run("provider", "token", "--telegram-id", "4711", "--reusable")
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert token.startswith("cce_") and "good for 30 days" in done.stderr

    async def listed() -> list[enrollment.Enrollment]:
        s = Settings(_env_file=None, data_dir=tmp_path / "cli", redis_url=redis_url)
        db = Database.from_settings(s)
        try:
            record = await enrollment.lookup(db, token)
            assert record is not None
            assert record.provider_id == (await get_or_create_user(db, 4711)).id
            return await enrollment.active(db, record.provider_id)
        finally:
            await db.close()

    [record] = asyncio.run(listed())
    assert run("provider", "revoke-token", "--telegram-id", "4712", str(record.id)).returncode == 1
    revoked = run("provider", "revoke-token", "--telegram-id", "4711", str(record.id))
    assert revoked.returncode == 0 and "keep serving" in revoked.stdout
    assert asyncio.run(listed()) == []


# -- the bot ------------------------------------------------------------------------------------

PROVIDER, STRANGER = 801, 802


def token_in(text: str) -> str:
    line = html.unescape(text.split("<pre>")[1].split("</pre>")[0])
    return line.split("--token ")[1].split()[0]


async def test_the_bot_gives_a_reusable_token_lists_it_and_revokes_it(bot: Harness) -> None:
    await bot.send("/provider", user=PROVIDER)
    await bot.send("/addworker smollm2-135m", user=PROVIDER)
    one_time = bot.last()
    assert token_in(one_time.text).startswith("cct_") and "works once" in one_time.text
    [[button]] = one_time.reply_markup.inline_keyboard
    assert "Reusable" in button.text
    await bot.press(button.callback_data, user=PROVIDER)
    text = bot.last().text
    pressed = token_in(text)
    assert pressed.startswith("cce_") and "--model smollm2-135m" in text
    assert "30 days" in text and "20 new workers an hour" in text and "Keep it secret" in text
    await bot.send("/addworker reusable smollm2-135m", user=PROVIDER)
    typed = token_in(bot.last().text)
    assert typed.startswith("cce_") and typed != pressed

    first = await enrollment.lookup(bot.db, pressed)
    second = await enrollment.lookup(bot.db, typed)
    assert first is not None and second is not None
    assert first.provider_id == second.provider_id == (await bot.user(PROVIDER)).id

    await bot.send("/workers", user=PROVIDER)
    listing = bot.last()
    assert "No workers yet" in listing.text and "Reusable tokens:" in listing.text
    assert f"#{first.id}: until" in listing.text and "0 workers added" in listing.text
    buttons = [row[0] for row in listing.reply_markup.inline_keyboard]
    assert [b.callback_data for b in buttons] == [f"ewr:{first.id}", f"ewr:{second.id}"]

    # Someone else's press, or a forged one, revokes nothing.
    await bot.send("/provider", user=STRANGER)
    await bot.press(f"ewr:{first.id}", user=STRANGER)
    assert bot.last("answerCallbackQuery").show_alert
    await bot.press("ewr:1" + "9" * 40, user=PROVIDER)
    assert bot.last("answerCallbackQuery").show_alert
    assert len(await enrollment.active(bot.db, first.provider_id)) == 2

    await bot.press(buttons[0].callback_data, user=PROVIDER)
    assert f"Token #{first.id} revoked" in bot.last().text
    assert [e.id for e in await enrollment.active(bot.db, first.provider_id)] == [second.id]
    await bot.press(buttons[0].callback_data, user=PROVIDER)  # twice: nothing left to revoke
    assert bot.last("answerCallbackQuery").show_alert
    # A user who is no provider gets no token.
    await bot.send("/addworker reusable", user=803)
    assert "for providers" in bot.last().text


# -- end to end: real node processes over HTTP --------------------------------------------------


@pytest.mark.slow
async def test_a_restarted_node_onboards_again_with_the_same_token_over_http(
    settings: Settings, admin: aioredis.Redis, tmp_path: Path
) -> None:
    """What a container restart (or `docker compose down` / `up`) does: a new process with new
    keys, the same reusable token; then the token revoked, and the next node is told why."""
    s = with_attestation(settings, allow_dev=True)
    server = await serve_backend(s)
    db = Database.from_settings(s)
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        provider_id = await provider(db)
        token, issued = await enrollment.issue(db, provider_id, 30)
        seen: list[str] = []
        for n in range(2):
            log = tmp_path / f"node{n}.log"
            node = start_node(base_url(server), token, log, model=MODEL)
            nodes.append(node)
            deadline = asyncio.get_running_loop().time() + 30
            while True:
                worker_id = await attested_worker(admin, node, log, MODEL)
                if worker_id not in seen:
                    break
                assert asyncio.get_running_loop().time() < deadline, await read_log(log)
                await asyncio.sleep(0.1)
            record = await registry.read_attestation(admin, worker_id)
            assert record is not None and record.provider_id == provider_id
            seen.append(worker_id)
            stop_process(node)  # the container goes away; its keys with it
        assert len(set(seen)) == 2
        assert await enrollment.revoke(db, provider_id, issued.id)
        log = tmp_path / "node-after-revoke.log"
        node = start_node(base_url(server), token, log, model=MODEL)
        nodes.append(node)
        assert await exit_status(node, log) != 0
        assert "revoked by its provider" in await read_log(log)
    finally:
        for node in nodes:
            stop_process(node)
        await db.close()
        await server.close()
