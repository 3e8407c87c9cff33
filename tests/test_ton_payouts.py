"""Payouts from the hot wallet against a local TON Center that executes wallet v4r2 messages:
exactly one transfer per payout through crashes, lost messages and API errors; failed payouts
give the money back."""

from __future__ import annotations

import base64

import pytest
from sqlalchemy import select

from backend.db import Database
from backend.ledger import Ledger
from backend.models import AccountKind, PayoutState, TonMessageState, TonPayoutMessage
from backend.ton.comment import raw_address
from backend.ton.localnet import LocalTonCenter
from backend.ton.payouts import PayoutSender
from backend.ton.sending import Step, payout_comment
from backend.ton.toncenter import TonCenter, TonCenterError
from backend.ton.wallet import HotWallet, SignedTransfer, new_mnemonic, parse_external
from tests.support.payouts import (
    PROVIDER_WALLETS,
    TON,
    Clock,
    Crash,
    run_until_done,
    sender,
    transfers_to,
    withdraw,
)


@pytest.mark.parametrize("point", ["signed", "sent", "before_confirm"])
async def test_crashes_at_every_step_pay_each_payout_exactly_once(
    db: Database, net: LocalTonCenter, api: TonCenter, hot: HotWallet, clock: Clock, point: str
) -> None:
    ledger = Ledger(db, min_withdrawal=TON)
    payouts = []
    for i, wallet in enumerate(PROVIDER_WALLETS[:3]):
        amount = (2 + i) * TON
        provider, payout_id = await withdraw(
            ledger, 700 + i, (5 + i) * TON, amount, wallet, key=f"withdraw:{i}"
        )
        payouts.append((provider, payout_id, wallet, amount))

    budget = {"left": 7}  # the process dies each time it reaches the point, seven times

    def checkpoint(name: str) -> None:
        if name == point and budget["left"] > 0:
            budget["left"] -= 1
            raise Crash(name)

    if point == "sent":
        net.drop_messages = 4  # the first sends are lost: the process dies after each resend
    crashes = await run_until_done(lambda: sender(db, api, hot, clock, checkpoint=checkpoint))

    # "signed" is reached once per payout: after a crash the stored message is resent, never
    # signed again.
    assert crashes == (3 if point == "signed" else 7)
    for provider, payout_id, wallet, amount in payouts:
        assert transfers_to(net, wallet) == [amount]  # exactly one transfer
        assert (await ledger.get_payout(payout_id)).state == PayoutState.CONFIRMED
        balances = await ledger.balances(provider)
        assert balances.pending_payout == 0
        assert (
            balances.earned
            == (5 + payouts.index((provider, payout_id, wallet, amount))) * TON - amount
        )
    assert net.wallets[hot.raw].seqno == 3
    assert await ledger.balance(AccountKind.TON_OUT) == sum(p[3] for p in payouts)
    assert (await ledger.audit()).ok


async def test_a_lost_message_is_resigned_only_after_it_expired_unseen(
    db: Database, net: LocalTonCenter, api: TonCenter, hot: HotWallet, clock: Clock
) -> None:
    ledger = Ledger(db, min_withdrawal=TON)
    wallet = PROVIDER_WALLETS[3]
    _provider, payout_id = await withdraw(ledger, 710, 3 * TON, 3 * TON, wallet)
    net.drop_messages = 1_000  # the network loses everything for now
    s = sender(db, api, hot, clock)

    assert await s.step() == Step.PROGRESS  # signed and sent
    for _ in range(5):
        assert await s.step() == Step.WAITING  # resent, the same bytes
    assert len(set(net.received)) == 1 and len(net.received) == 6
    clock.now += 60 + 5  # expired, but within the grace: still no new signature
    assert await s.step() == Step.WAITING
    async with db.session() as session:
        assert len(list(await session.scalars(select(TonPayoutMessage)))) == 1

    net.drop_messages = 0
    clock.now += 60  # past the grace; seqno unchanged: it never landed
    assert await s.step() == Step.PROGRESS  # a new signature, same seqno, new valid_until
    assert await run_until_done(lambda: s) == 0
    async with db.session() as session:
        messages = list(
            await session.scalars(select(TonPayoutMessage).order_by(TonPayoutMessage.id))
        )
    assert [m.state for m in messages] == [TonMessageState.EXPIRED, TonMessageState.LANDED]
    assert messages[0].seqno == messages[1].seqno == 0
    assert messages[1].valid_until > messages[0].valid_until
    assert transfers_to(net, wallet) == [3 * TON]
    assert (await ledger.get_payout(payout_id)).state == PayoutState.CONFIRMED


async def test_api_errors_while_sending_resend_the_same_message(
    db: Database, net: LocalTonCenter, api: TonCenter, hot: HotWallet, clock: Clock
) -> None:
    ledger = Ledger(db, min_withdrawal=TON)
    wallet = PROVIDER_WALLETS[4]
    await withdraw(ledger, 720, 2 * TON, 2 * TON, wallet)
    s = sender(db, api, hot, clock)
    net.faults.extend([502])  # the seqno read fails: nothing is signed
    with pytest.raises(TonCenterError):
        await s.step()
    net.faults.extend([None, 429])  # the seqno read works, the send fails: resent later
    await s.step()
    assert net.executed == []
    await run_until_done(lambda: s)
    assert transfers_to(net, wallet) == [2 * TON]
    assert len(set(net.received)) == 1


@pytest.mark.parametrize("indexed_by", ["raw", "normalized"])
async def test_a_payout_is_found_by_whichever_message_hash_the_indexer_knows(
    db: Database,
    net: LocalTonCenter,
    api: TonCenter,
    hot: HotWallet,
    clock: Clock,
    indexed_by: str,
) -> None:
    ledger = Ledger(db, min_withdrawal=TON)
    # TON Center matches both hashes; an indexer that knows only one must still confirm.
    net.match_raw_hashes = indexed_by == "raw"
    net.match_normalized_hashes = indexed_by == "normalized"
    paid = []
    for i, wallet in enumerate(PROVIDER_WALLETS[:2]):  # seqno 0 carries the state init
        _provider, payout_id = await withdraw(ledger, 740 + i, 3 * TON, 2 * TON, wallet)
        paid.append((payout_id, wallet))

    assert await run_until_done(lambda: sender(db, api, hot, clock)) == 0

    for payout_id, wallet in paid:
        assert (await ledger.get_payout(payout_id)).state == PayoutState.CONFIRMED
        assert transfers_to(net, wallet) == [2 * TON]
    async with db.session() as session:
        messages = list(await session.scalars(select(TonPayoutMessage)))
    assert [m.state for m in messages] == [TonMessageState.LANDED] * 2
    landed = {tx["in_msg"]["hash_norm"] for tx in net.transactions_of(hot.raw)}
    assert {base64.b64encode(bytes.fromhex(m.msg_hash)).decode() for m in messages} == landed
    assert (await ledger.audit()).ok


async def test_failed_payouts_give_the_money_back(
    db: Database, net: LocalTonCenter, api: TonCenter, hot: HotWallet, clock: Clock
) -> None:
    ledger = Ledger(db, min_withdrawal=TON)
    net.wallets[hot.raw].balance = 10 * TON  # the hot wallet cannot cover 40 TON
    poor, big = await withdraw(ledger, 730, 50 * TON, 40 * TON, PROVIDER_WALLETS[5])
    nowhere, bad = await withdraw(ledger, 731, 2 * TON, 2 * TON, "not-an-address")
    assert (await ledger.balances(poor)).earned == 10 * TON

    await run_until_done(lambda: sender(db, api, hot, clock))

    assert (await ledger.get_payout(big)).state == PayoutState.FAILED
    assert (await ledger.get_payout(bad)).state == PayoutState.FAILED
    assert (await ledger.balances(poor)).earned == 50 * TON
    assert (await ledger.balances(nowhere)).earned == 2 * TON
    assert transfers_to(net, PROVIDER_WALLETS[5]) == []
    assert await ledger.balance(AccountKind.TON_OUT) == 0
    assert (await ledger.audit()).ok


def test_the_signed_message_verifies_and_says_what_it_pays(hot: HotWallet) -> None:
    other = HotWallet.from_mnemonic(new_mnemonic())

    def sign() -> SignedTransfer:
        return hot.sign_transfer(
            PROVIDER_WALLETS[0],
            1_500_000_000,
            seqno=7,
            valid_until=1_800_000_060,
            comment=payout_comment(9),
        )

    signed = sign()
    parsed = parse_external(signed.boc)
    assert parsed.verifies(hot.public_key)
    assert not parsed.verifies(other.public_key)
    assert parsed.wallet == hot.raw and parsed.seqno == 7 and parsed.valid_until == 1_800_000_060
    (transfer,) = parsed.transfers
    assert transfer.destination == raw_address(PROVIDER_WALLETS[0])
    assert transfer.amount == 1_500_000_000
    assert transfer.comment == "Cocoon payout #9"
    assert parsed.msg_hash == signed.msg_hash
    assert parsed.state_init is None  # seqno 7: the wallet is deployed
    # Same inputs, same bytes: a resend is the same message.
    assert sign().boc == signed.boc
    tampered = bytearray(base64.b64decode(signed.boc))
    tampered[-5] ^= 1
    forged = parse_external(base64.b64encode(bytes(tampered)).decode())
    assert not forged.verifies(hot.public_key)


async def test_two_senders_at_once_never_hold_two_live_signatures(
    db: Database, net: LocalTonCenter, api: TonCenter, hot: HotWallet, clock: Clock
) -> None:
    ledger = Ledger(db, min_withdrawal=TON)
    import asyncio

    wanted = {}
    for i, wallet in enumerate(PROVIDER_WALLETS[:4]):
        await withdraw(ledger, 740 + i, 5 * TON, (1 + i) * TON, wallet)
        wanted[wallet] = [(1 + i) * TON]
    net.drop_messages = 2  # some sends are lost too
    live_seen: list[int] = []

    async def drive(s: PayoutSender) -> None:
        for _ in range(200):
            async with db.session() as session:
                live = await session.scalars(
                    select(TonPayoutMessage.id).where(
                        TonPayoutMessage.state.in_((TonMessageState.SIGNED, TonMessageState.SENT))
                    )
                )
                live_seen.append(len(list(live)))
            step = await s.step()
            if step == Step.IDLE:
                return
            if step == Step.WAITING:
                clock.now += 20  # time passes while a message is out

    await asyncio.gather(drive(sender(db, api, hot, clock)), drive(sender(db, api, hot, clock)))

    assert max(live_seen) == 1
    assert {wallet: transfers_to(net, wallet) for wallet in wanted} == wanted
    assert (await ledger.audit()).ok


async def test_a_lagging_seqno_read_does_not_make_a_message_that_cannot_land(
    db: Database, net: LocalTonCenter, api: TonCenter, hot: HotWallet, clock: Clock
) -> None:
    ledger = Ledger(db, min_withdrawal=TON)
    for i, wallet in enumerate(PROVIDER_WALLETS[:2]):
        await withdraw(ledger, 750 + i, 3 * TON, 2 * TON, wallet)
    s = sender(db, api, hot, clock)
    while (await s.step()) != Step.IDLE and not net.executed:
        pass
    net.stale_seqno_reads = 100  # the node still says seqno 0 after the first payout landed
    assert await run_until_done(lambda: s) == 0
    assert [p.seqno for p in net.executed] == [0, 1]
    assert transfers_to(net, PROVIDER_WALLETS[1]) == [2 * TON]


async def test_a_payout_failed_by_hand_while_out_is_not_resent_nor_resigned(
    db: Database, net: LocalTonCenter, api: TonCenter, hot: HotWallet, clock: Clock
) -> None:
    ledger = Ledger(db, min_withdrawal=TON)
    provider, payout_id = await withdraw(ledger, 760, 3 * TON, 3 * TON, PROVIDER_WALLETS[2])
    net.drop_messages = 1
    s = sender(db, api, hot, clock)
    assert await s.step() == Step.PROGRESS  # signed, sent, lost
    await ledger.fail_payout(payout_id, reason="operator: provider asked to cancel")
    sent_before = len(net.received)
    assert await s.step() == Step.WAITING
    assert len(net.received) == sent_before  # not resent
    clock.now += 60 + 31
    assert await run_until_done(lambda: s) == 0
    async with db.session() as session:
        states = list(await session.scalars(select(TonPayoutMessage.state)))
    assert states == [TonMessageState.EXPIRED]  # and no new signature
    assert transfers_to(net, PROVIDER_WALLETS[2]) == []
    assert (await ledger.balances(provider)).earned == 3 * TON
