"""What ends up in the notification outbox for the bot to tell: payout outcomes from the
payout sender, and attestation outcomes from onboarding (the provider's worker attested, or
refused)."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from backend import notifications
from backend.attestation import acl, store
from backend.attestation.onboarding import OnboardingError
from backend.db import Database
from backend.ledger import Ledger
from backend.models import WorkerRecord, WorkerState
from backend.notifications import pending_notifications
from backend.settings import Settings
from backend.ton.localnet import LocalTonCenter
from backend.ton.toncenter import TonCenter
from backend.ton.wallet import HotWallet
from backend.users import get_or_create_user
from tests.support.attest import attest, service
from tests.support.payouts import PROVIDER_WALLETS, Clock, earn, run_until_done, sender
from workers.wire import WorkerKeys

TON = 1_000_000_000


async def test_payout_outcomes_go_to_the_providers_outbox_once(
    db: Database,
    net: LocalTonCenter,
    api: TonCenter,
    hot: HotWallet,
    clock: Clock,
) -> None:
    ledger = Ledger(db, min_withdrawal=TON)
    good = await earn(db, 740, 5 * TON)
    bad = await earn(db, 741, 2 * TON)
    paid = await ledger.request_withdrawal(good, 3 * TON, "w:740", destination=PROVIDER_WALLETS[0])
    await ledger.request_withdrawal(bad, 2 * TON, "w:741", destination="not-an-address")
    await run_until_done(lambda: sender(db, api, hot, clock))
    await run_until_done(lambda: sender(db, api, hot, clock))  # a second pass tells nothing new
    told = {(n.user_id, n.kind, n.amount) for n in await pending_notifications(db)}
    assert told == {
        (good, notifications.NOTIFY_PAYOUT_CONFIRMED, 3 * TON),
        (bad, notifications.NOTIFY_PAYOUT_FAILED, 2 * TON),
    }
    (confirmed,) = [n for n in await pending_notifications(db) if n.user_id == good]
    assert notifications.notification_data(confirmed)["payout_id"] == paid.subject_id


@pytest.fixture
async def admin(redis_url: str):
    client = aioredis.Redis.from_url(redis_url)
    yield client
    for worker_id in await acl.worker_users(client):
        await acl.delete_worker_user(client, worker_id)
    await client.aclose()


async def test_onboarding_records_workers_and_tells_their_provider(
    settings: Settings, admin: aioredis.Redis, db: Database
) -> None:
    provider = await get_or_create_user(db, 750)
    refusing = service(settings, admin, allow_dev=False)
    refusing.db = db
    keys = WorkerKeys.generate()
    token = await store.issue_registration_token(admin, provider.id, 60)
    with pytest.raises(OnboardingError):
        await attest(refusing, token, keys)
    accepting = service(settings, admin, allow_dev=True)
    accepting.db = db
    await attest(accepting, token, keys)
    told = [(n.kind, notifications.notification_data(n)) for n in await pending_notifications(db)]
    assert [kind for kind, _ in told] == [
        notifications.NOTIFY_WORKER_FAILED,
        notifications.NOTIFY_WORKER_ATTESTED,
    ]
    assert told[0][1]["note"] and told[1][1]["tee"] == "dev"
    async with db.session() as session:
        row = await session.get(WorkerRecord, "w-" + keys.fingerprint())
    assert row is not None and row.state == WorkerState.ATTESTED
    assert row.provider_id == provider.id and row.expires_at is not None
    await accepting.revoke(row.worker_id)
    assert (await pending_notifications(db))[-1].kind == notifications.NOTIFY_WORKER_OFFLINE
