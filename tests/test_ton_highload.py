"""Payouts in batches from a Highload Wallet v3 against a local TON Center that runs the
contract's rules (query ids, replay window, internal_transfer): each payout paid exactly once
through crashes at every step, lost messages and a lagging index; a query id never given
twice; the money of a transfer that did not go returns to its provider."""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from sqlalchemy import select

from backend.db import Database
from backend.ledger import Ledger
from backend.models import AccountKind, PayoutState, TonMessageState, TonPayoutBatch
from backend.ton.highload import HighloadPayoutSender
from backend.ton.localnet import LocalTonCenter
from backend.ton.sending import Step, payout_comment
from backend.ton.toncenter import TonCenter
from backend.ton.wallet import (
    BatchTransfer,
    HighloadHotWallet,
    HotWallet,
    WalletError,
    highload_query_id,
    parse_highload,
)
from tests.support.payouts import TON, Clock, Crash, run_until_done, withdraw

TIMEOUT = 600
DESTINATIONS = ["0:" + f"{i:02X}" * 32 for i in range(0x40, 0x48)]


@pytest.fixture(scope="module")
def highload(hot: HotWallet) -> HighloadHotWallet:
    return HighloadHotWallet(hot.seed, timeout=TIMEOUT)


@pytest.fixture
def net(highload: HighloadHotWallet, clock: Clock) -> LocalTonCenter:
    """The local chain with the highload wallet (not the v4r2 one of tests/support/payouts.py):
    ``api`` is a TON Center client of it."""
    chain = LocalTonCenter(clock=clock)
    chain.add_highload_wallet(
        highload.raw,
        highload.public_key,
        balance=100_000 * TON,
        subwallet_id=highload.subwallet_id,
        timeout=TIMEOUT,
        deployed=False,  # the first batch deploys it
    )
    return chain


@dataclass
class Highload:
    """One highload hot wallet's payouts: the database and its ledger, the local chain that
    runs the contract, the wallet, the clock, and fresh senders over a client of the chain."""

    db: Database
    ledger: Ledger
    net: LocalTonCenter
    api: TonCenter
    wallet: HighloadHotWallet
    clock: Clock

    def sender(self, **kw: object) -> HighloadPayoutSender:
        return HighloadPayoutSender(
            self.db, Ledger(self.db, min_withdrawal=TON), self.api, self.wallet,
            clock=self.clock, resend_every_s=0, **kw,  # type: ignore[arg-type]
        )  # fmt: skip

    async def drive(self, make: Callable[[], HighloadPayoutSender] | None = None) -> int:
        """Fresh senders (``make()``) until nothing is left, a minute passing while a batch is
        out; returns the crashes seen."""
        return await run_until_done(make or self.sender, clock=self.clock, max_steps=2_000)


@pytest.fixture
def hl(
    db: Database, net: LocalTonCenter, api: TonCenter, highload: HighloadHotWallet, clock: Clock
) -> Highload:
    return Highload(db, Ledger(db, min_withdrawal=TON), net, api, highload, clock)


def paid(net: LocalTonCenter, wallet: str) -> list[tuple[str, int, str | None]]:
    """Every transfer that left ``wallet`` for someone else: (destination, value, comment)."""
    return [
        (
            out["destination"],
            int(out["value"]),
            ((out["message_content"] or {}).get("decoded") or {}).get("comment"),
        )
        for tx in net.transactions_of(wallet)
        for out in tx["out_msgs"]
        if out["destination"] != wallet
    ]


async def batches(db: Database) -> list[TonPayoutBatch]:
    async with db.session() as session:
        return list(await session.scalars(select(TonPayoutBatch).order_by(TonPayoutBatch.id)))


@pytest.mark.parametrize("point", ["signed", "sent", "before_confirm"])
async def test_crashes_at_every_step_pay_each_payout_of_a_batch_exactly_once(
    hl: Highload, point: str
) -> None:
    wanted = []
    for i, wallet in enumerate(DESTINATIONS[:5]):
        provider, payout_id = await withdraw(hl.ledger, 900 + i, 9 * TON, (1 + i) * TON, wallet)
        wanted.append((provider, payout_id, wallet, (1 + i) * TON))
    budget = {"left": 6}

    def checkpoint(name: str) -> None:
        if name == point and budget["left"] > 0:
            budget["left"] -= 1
            raise Crash(name)

    if point == "sent":
        hl.net.drop_messages = 3  # the first sends are lost; the process dies after each
    crashes = await hl.drive(lambda: hl.sender(checkpoint=checkpoint))

    # "signed" is reached once: after the crash the stored batch is resent, never signed
    # again; "sent" four times (three sends lost, the fourth lands and is found).
    assert crashes == {"signed": 1, "sent": 4, "before_confirm": 6}[point]
    assert sorted(paid(hl.net, hl.wallet.raw)) == sorted(
        (wallet, amount, payout_comment(payout_id)) for _p, payout_id, wallet, amount in wanted
    )
    for provider, payout_id, _wallet, amount in wanted:
        assert (await hl.ledger.get_payout(payout_id)).state == PayoutState.CONFIRMED
        assert (await hl.ledger.balances(provider)).earned == 9 * TON - amount
    assert len(hl.net.executed_highload) == 1  # one external message paid all five
    assert [b.state for b in await batches(hl.db)] == [TonMessageState.LANDED]
    assert await hl.ledger.balance(AccountKind.TON_OUT) == sum(w[3] for w in wanted)
    assert (await hl.ledger.audit()).ok


@pytest.mark.slow
async def test_253_payouts_go_in_one_message_and_one_transaction(hl: Highload) -> None:
    ids = []
    for i in range(260):
        _provider, payout_id = await withdraw(
            hl.ledger, 2_000 + i, 2 * TON, TON + i, DESTINATIONS[i % 8], key=f"w:{i}"
        )
        ids.append(payout_id)

    assert await hl.drive() == 0

    assert len(hl.net.executed_highload) == 2  # 253 + 7
    runs = [tx for tx in hl.net.transactions_of(hl.wallet.raw) if len(tx["out_msgs"]) > 1]
    assert sorted(len(tx["out_msgs"]) for tx in runs) == [7, 253]
    assert len(paid(hl.net, hl.wallet.raw)) == 260
    for payout_id in ids:
        assert (await hl.ledger.get_payout(payout_id)).state == PayoutState.CONFIRMED
    assert [b.query_id for b in await batches(hl.db)] == [
        highload_query_id(0),
        highload_query_id(1),
    ]
    assert (await hl.ledger.audit()).ok


async def test_a_lost_batch_is_signed_again_only_when_it_can_never_land_under_a_new_query_id(
    hl: Highload,
) -> None:
    _provider, payout_id = await withdraw(hl.ledger, 950, 3 * TON, 3 * TON, DESTINATIONS[0])
    hl.net.drop_messages = 1_000  # the network loses everything for now
    s = hl.sender()
    assert await s.step() == Step.PROGRESS
    for _ in range(4):
        assert await s.step() == Step.WAITING  # resent: the same bytes
    assert len(set(hl.net.received)) == 1 and len(hl.net.received) == 5
    hl.clock.now += TIMEOUT - 30 + 5  # past created_at + timeout, within the grace: wait
    assert await s.step() == Step.WAITING
    assert len(await batches(hl.db)) == 1

    hl.net.drop_messages = 0
    first = hl.net.received[0]
    hl.clock.now += 60  # past the grace; processed? says no: it can never land
    assert await s.step() == Step.PROGRESS  # expired
    # The old message, replayed by anyone now, is refused: its created_at is out of the window.
    with pytest.raises(ValueError, match="created_at"):
        hl.net.accept_external(first)
    assert await hl.drive(lambda: s) == 0
    old, new = await batches(hl.db)
    assert (old.state, new.state) == (TonMessageState.EXPIRED, TonMessageState.LANDED)
    assert (old.query_id, new.query_id) == (highload_query_id(0), highload_query_id(1))
    assert paid(hl.net, hl.wallet.raw) == [(DESTINATIONS[0], 3 * TON, payout_comment(payout_id))]
    # And the message that landed, replayed within its window, is refused by its query id.
    with pytest.raises(ValueError, match="already executed"):
        hl.net.accept_external(new.boc)
    assert (await hl.ledger.get_payout(payout_id)).state == PayoutState.CONFIRMED


async def test_a_batch_the_index_has_not_seen_but_the_contract_has_is_never_signed_again(
    hl: Highload,
) -> None:
    _provider, payout_id = await withdraw(hl.ledger, 960, 3 * TON, 2 * TON, DESTINATIONS[1])
    s = hl.sender()
    # It executes, but the indexer serves none of the wallet's transactions for now.
    hl.net.match_raw_hashes = hl.net.match_normalized_hashes = False
    assert await s.step() == Step.PROGRESS
    hl.clock.now += TIMEOUT + 120  # long past expiry: processed? says the query id is used
    for _ in range(3):
        assert await s.step() == Step.WAITING
    assert len(await batches(hl.db)) == 1 and len(hl.net.executed_highload) == 1
    hl.net.match_raw_hashes = hl.net.match_normalized_hashes = True
    assert await hl.drive(lambda: s) == 0
    assert paid(hl.net, hl.wallet.raw) == [(DESTINATIONS[1], 2 * TON, payout_comment(payout_id))]
    assert (await hl.ledger.get_payout(payout_id)).state == PayoutState.CONFIRMED


async def test_transfers_the_wallet_cannot_cover_fail_one_by_one_and_give_the_money_back(
    hl: Highload,
) -> None:
    small, small_id = await withdraw(hl.ledger, 970, 2 * TON, 2 * TON, DESTINATIONS[2])
    big, big_id = await withdraw(hl.ledger, 971, 50 * TON, 40 * TON, DESTINATIONS[3])
    other, other_id = await withdraw(hl.ledger, 972, 3 * TON, 3 * TON, DESTINATIONS[4])
    s = hl.sender()
    assert await s.step() == Step.PROGRESS  # signed, sent: deploys the wallet
    # The wallet holds 45 TON when its transfers run: 2 + 40 fit, then 3 does not.
    hl.net.balances[hl.wallet.raw] = 45 * TON
    hl.net.statuses[hl.wallet.raw] = "active"
    # (the batch is re-sent as is; its internal transfer carries the whole 45 TON)
    assert await hl.drive(lambda: s) == 0
    states = {p: (await hl.ledger.get_payout(p)).state for p in (small_id, big_id, other_id)}
    assert sum(state == PayoutState.CONFIRMED for state in states.values()) >= 1
    for provider, payout_id, earned, amount, dest in (
        (small, small_id, 2 * TON, 2 * TON, DESTINATIONS[2]),
        (big, big_id, 50 * TON, 40 * TON, DESTINATIONS[3]),
        (other, other_id, 3 * TON, 3 * TON, DESTINATIONS[4]),
    ):
        sent = [p for p in paid(hl.net, hl.wallet.raw) if p[0] == dest]
        if states[payout_id] == PayoutState.CONFIRMED:
            assert sent == [(dest, amount, payout_comment(payout_id))]
            assert (await hl.ledger.balances(provider)).earned == earned - amount
        else:
            assert sent == []
            assert (await hl.ledger.balances(provider)).earned == earned  # money back
    assert (await hl.ledger.audit()).ok


async def test_the_local_contract_refuses_what_the_real_one_refuses(
    net: LocalTonCenter, highload: HighloadHotWallet, hot: HotWallet, clock: Clock
) -> None:
    now = int(clock())
    transfer = [BatchTransfer(DESTINATIONS[0], TON, "Cocoon payout #1")]
    first = await highload.sign_batch(transfer, query_id=5, created_at=now - 10)
    with pytest.raises(ValueError, match="not deployed"):
        net.accept_external(first.boc)  # no state init for an undeployed wallet
    deploy = await highload.sign_batch(transfer, query_id=5, created_at=now - 10, deploy=True)
    net.accept_external(deploy.boc)
    with pytest.raises(ValueError, match="already executed"):
        net.accept_external(first.boc)  # same query id, other bytes: refused
    future = await highload.sign_batch(transfer, query_id=6, created_at=now + 5)
    with pytest.raises(ValueError, match="created_at"):
        net.accept_external(future.boc)
    other_timeout = HighloadHotWallet(hot.seed, timeout=TIMEOUT + 1)
    assert other_timeout.raw != highload.raw  # the timeout is part of the address
    stranger = HighloadHotWallet(bytes(32), timeout=TIMEOUT)
    forged = await stranger.sign_batch(transfer, query_id=7, created_at=now)
    tampered = parse_highload(forged.boc)
    assert not tampered.verifies(highload.public_key)
    with pytest.raises(WalletError):
        await highload.sign_batch(transfer, query_id=1023, created_at=now)  # bit 1023
    with pytest.raises(WalletError):
        await highload.sign_batch(transfer * 255, query_id=8, created_at=now)
    assert len(net.executed_highload) == 1
    assert [highload_query_id(n) for n in (0, 1022, 1023, 1023 * 8192)] == [0, 1022, 1024, 0]
    assert base64.b64decode(deploy.boc)  # a real BOC
