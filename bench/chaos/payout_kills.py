"""Chaos scenario ``payout-kills``: the payout sender killed after signing, after sending and
before confirming, over and over, with lost messages.
"""

from __future__ import annotations

import random
import time

from backend.db import Database
from backend.ledger import Ledger
from backend.models import AccountKind
from backend.ton.highload import HighloadPayoutSender
from backend.ton.localnet import LocalTonCenter, LocalTonCenterServer
from backend.ton.payouts import PayoutSender
from backend.ton.sending import Step
from backend.ton.toncenter import TonCenter, TonCenterError
from backend.ton.wallet import HighloadHotWallet, HotWallet, new_mnemonic
from backend.users import get_or_create_user
from bench.chaos.common import (
    TON,
    Crash,
    Figures,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


async def payout_kills(
    db: Database, *, payouts: int, kills: int, highload: bool = False
) -> Figures:
    """Payouts with the sender killed after signing, after sending and before confirming, and
    messages lost on the way. Each payout must leave the hot wallet exactly once. ``highload``:
    from a Highload Wallet v3 in batches (``payout-kills-highload``)."""
    figures = Figures("payout-kills-highload" if highload else "payout-kills", operations=payouts)
    started = time.monotonic()
    clock = Clock()
    hot = HotWallet.from_mnemonic(new_mnemonic())
    net = LocalTonCenter(clock=clock)
    net.add_wallet(hot.raw, hot.public_key, balance=10**6 * TON, subwallet_id=hot.subwallet_id)
    batches = HighloadHotWallet(hot.seed, timeout=600)
    net.add_highload_wallet(
        batches.raw,
        batches.public_key,
        balance=10**6 * TON,
        subwallet_id=batches.subwallet_id,
        timeout=600,
        deployed=False,
    )
    paying = batches.raw if highload else hot.raw
    ledger = Ledger(db, min_withdrawal=TON)
    destinations: dict[int, str] = {}
    for i in range(payouts):
        provider = await get_or_create_user(db, 30_000 + i)
        destination = "0:" + f"{(i % 250) + 1:02X}" * 32
        amount = random.randint(1, 20) * TON
        await ledger.credit_deposit(provider.id, amount, f"earn:{i}", source=AccountKind.OPERATOR)
        await ledger.hold(provider.id, amount, f"earn-hold:{i}")
        await ledger.settle(f"earn-hold:{i}", amount, provider_id=provider.id, share_bps=10_000)
        receipt = await ledger.request_withdrawal(
            provider.id, amount, f"withdraw:{i}", destination=destination
        )
        assert receipt.subject_id is not None
        destinations[receipt.subject_id] = destination
    points = ["signed", "sent", "before_confirm"]
    left = kills
    lost = 0

    def checkpoint(name: str) -> None:
        nonlocal left
        if left > 0 and name in points and random.random() < 0.5:
            left -= 1
            raise Crash(name)

    async with LocalTonCenterServer(net) as url, TonCenter(url) as api:

        def make() -> PayoutSender | HighloadPayoutSender:
            if highload:  # small batches, so that kills land between them too
                return HighloadPayoutSender(
                    db, ledger, api, batches, batch_size=3, clock=clock, resend_every_s=0,
                    checkpoint=checkpoint,
                )  # fmt: skip
            return PayoutSender(
                db, ledger, api, hot, ttl_s=60, clock=clock, resend_every_s=0,
                checkpoint=checkpoint,
            )  # fmt: skip

        sender = make()
        for _ in range(100 * payouts + 10 * kills + 100):
            if random.random() < 0.03:
                net.drop_messages += 1  # lost on its way: found never, signed again
                lost += 1
            try:
                step = await sender.step()
            except Crash:
                figures.faults += 1
                sender = make()  # the process restarts
                continue
            except TonCenterError:
                continue
            if step == Step.IDLE:
                break
            if step == Step.WAITING:
                clock.now += 60 if highload else 20
        else:
            figures.report.violations.append("payouts did not finish")
    figures.faults += lost
    figures.notes.append(f"{lost} messages lost")
    # On chain: each confirmed payout paid exactly once, failed ones never.
    paid: dict[str, int] = {}
    for tx in net.transactions_of(paying):
        for out in tx["out_msgs"]:
            if out["destination"] == paying:
                continue  # a highload batch's link to its own action list
            comment = (out["message_content"].get("decoded") or {}).get("comment") or ""
            paid[comment] = paid.get(comment, 0) + 1
    await figures.check(db, started)
    for payout_id in destinations:
        payout = await ledger.get_payout(payout_id)
        assert payout is not None
        times = paid.get(f"Cocoon payout #{payout_id}", 0)
        wanted = 1 if payout.state == "confirmed" else 0
        if times != wanted:
            figures.report.violations.append(
                f"payout #{payout_id} ({payout.state}) left the hot wallet {times} times"
            )
        figures.succeeded += payout.state == "confirmed"
    return figures
