"""The payout tests' hot wallet and chain: a local TON Center (with its clock) that executes
wallet v4r2 messages, a payout sender over them, and providers with earnings."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from backend.db import Database
from backend.ledger import Ledger
from backend.models import AccountKind
from backend.ton.localnet import LocalTonCenter, LocalTonCenterServer
from backend.ton.payouts import PayoutSender
from backend.ton.sending import Step
from backend.ton.toncenter import TonCenter
from backend.ton.wallet import HotWallet, new_mnemonic
from backend.users import get_or_create_user

TON = 1_000_000_000
PROVIDER_WALLETS = ["0:" + f"{i:02X}" * 32 for i in range(0x30, 0x36)]


class Crash(Exception):
    pass


class Clock:
    """The chain's and the sender's time, moved by the test (it starts in 2027)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def hot() -> HotWallet:
    return HotWallet.from_mnemonic(new_mnemonic())


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def net(hot: HotWallet, clock: Clock) -> LocalTonCenter:
    chain = LocalTonCenter(clock=clock)
    chain.add_wallet(hot.raw, hot.public_key, balance=1_000 * TON, subwallet_id=hot.subwallet_id)
    return chain


@pytest.fixture
async def api(net: LocalTonCenter) -> AsyncIterator[TonCenter]:
    async with LocalTonCenterServer(net) as url, TonCenter(url) as client:
        yield client


def sender(
    db: Database, api: TonCenter, hot: HotWallet, clock: Clock, **kw: object
) -> PayoutSender:
    return PayoutSender(
        db,
        Ledger(db, min_withdrawal=TON),
        api,
        hot,
        ttl_s=60,
        clock=clock,
        resend_every_s=0,
        **kw,  # type: ignore[arg-type]
    )


async def earn(db: Database, telegram_id: int, amount: int) -> int:
    """A provider with ``amount`` of earnings: a turn it served, paid at a 100 % share."""
    user = await get_or_create_user(db, telegram_id)
    ledger = Ledger(db, min_withdrawal=TON)
    await ledger.credit_deposit(user.id, amount, f"seed:{telegram_id}", source=AccountKind.OPERATOR)
    hold = f"job:{telegram_id}"
    await ledger.hold(user.id, amount, hold)
    await ledger.settle(hold, amount, provider_id=user.id, share_bps=10_000)
    return user.id


async def withdraw(
    ledger: Ledger, telegram_id: int, earned: int, amount: int, destination: str, key: str = ""
) -> tuple[int, int]:
    """A provider (``telegram_id``) with ``earned`` of earnings asks for ``amount`` to be paid
    to ``destination`` (idempotency key ``key``, by default ``w:<telegram_id>``): the
    provider's user id and the payout's id."""
    provider = await earn(ledger.db, telegram_id, earned)
    receipt = await ledger.request_withdrawal(
        provider, amount, key or f"w:{telegram_id}", destination=destination
    )
    return provider, receipt.subject_id


async def run_until_done(make: object, *, max_steps: int = 500, clock: Clock | None = None) -> int:
    """Drive fresh senders (``make()``) until nothing is left; returns the crashes seen. With
    ``clock``, a minute passes each time a message or batch is out (the sender waits)."""
    crashes = 0
    s = make()  # type: ignore[operator]
    for _ in range(max_steps):
        try:
            step = await s.step()
        except Crash:
            crashes += 1
            s = make()  # type: ignore[operator]  # the process restarts
            continue
        if step == Step.IDLE:
            return crashes
        if step == Step.WAITING and clock is not None:
            clock.now += 60
    raise AssertionError("payouts did not finish")


def transfers_to(net: LocalTonCenter, destination: str) -> list[int]:
    """Value that actually left the hot wallet for ``destination``, one item per transfer."""
    return [
        int(out["value"])
        for wallet in net.wallets
        for tx in net.transactions_of(wallet)
        for out in tx["out_msgs"]
        if out["destination"] == destination
    ]
