"""ton_proof on proofs signed here by real ed25519 keys, for the wallets no recording covers
(v3r1, v3r2, W5 beta on mainnet, Telegram's wallet), the chain a local TON Center on loopback;
the bot reading a wallet that sends no state init; the payload store (a payload accepted once;
a changed byte, a wrong domain, an old timestamp, a reused payload and a foreign state init
refused); and the bot and the Mini App saying what is missing when a wallet sends no state
init. The real recorded proofs are in tests/test_ton_proof.py."""

from __future__ import annotations

import asyncio
import base64
import copy
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from nacl.signing import SigningKey

from backend.db import Database
from backend.models import TonWallet
from backend.ton.contracts import read_state_init
from backend.ton.localnet import LocalTonCenter, LocalTonCenterServer
from backend.ton.proof import (
    CHAIN_UNAVAILABLE,
    NO_KEY,
    ProofError,
    issue_payload,
    link_wallet,
    linked_wallet,
    proof_from_json,
    proof_message,
    verify_proof,
    verify_proof_on_chain,
)
from backend.ton.toncenter import TonCenter, TonCenterError
from backend.users import get_or_create_user
from tests.support.tonproof import MAX_AGE, REAL, bridge_delivers, check, connect_event
from tests.support.wallets import DOMAIN, NOW, MemoryStorage, UserWallet

# ---------------------------------------------------------- every wallet, signed here


@pytest.mark.parametrize(
    ("version", "network"),
    [
        ("v3r1", "-239"),
        ("v3r2", "-239"),
        ("v4r2", "-239"),
        ("v5beta", "-239"),
        ("v5beta", "-3"),
        ("v5r1", "-239"),
        ("v5r1", "-3"),
    ],
)
def test_a_valid_proof_gives_the_wallets_key(version: str, network: str) -> None:
    user = UserWallet(version, network)
    verified = check(user.account(), user.proof("p" * 64))
    assert verified.public_key == user.public_key
    assert verified.address == user.raw


async def test_a_telegram_wallet_is_checked_against_its_key_on_chain(
    chain: tuple[LocalTonCenter, TonCenter],
) -> None:
    net, api = chain
    user = UserWallet("tg")
    assert read_state_init(user.account()["walletStateInit"], user.raw).wallet.rotates
    rules = {"allowed_domains": [DOMAIN], "max_age_s": MAX_AGE, "now": NOW + 10}

    # Offline its key cannot be trusted: it may have been rotated since the state init.
    with pytest.raises(ProofError, match="current key must be read from the chain") as refused:
        check(user.account(), user.proof("p" * 64))
    assert refused.value.code == NO_KEY

    # Not deployed yet: its first key is its key.
    verified = await verify_proof_on_chain(
        user.account(), user.proof("p" * 64), **rules, chain=api.wallet_public_key
    )
    assert verified.public_key == user.public_key and verified.address == user.raw

    # Deployed, and the key rotated: only the new key proves ownership now.
    new_key = SigningKey(os.urandom(32))
    net.add_wallet(user.raw, bytes(new_key.verify_key), balance=10**9, subwallet_id=0)
    stale = {k: v for k, v in user.account().items() if k != "publicKey"}
    with pytest.raises(ProofError, match="signature is not valid"):
        await verify_proof_on_chain(
            stale, user.proof("p" * 64), **rules, chain=api.wallet_public_key
        )
    with pytest.raises(ProofError, match="does not match its key on the chain"):
        await verify_proof_on_chain(
            user.account(), user.proof("p" * 64), **rules, chain=api.wallet_public_key
        )
    rotated = {**stale, "publicKey": bytes(new_key.verify_key).hex()}
    verified = await verify_proof_on_chain(
        rotated, user.proof("p" * 64, key=new_key), **rules, chain=api.wallet_public_key
    )
    assert verified.public_key == bytes(new_key.verify_key)

    # TON Center down: refused for now, with a reason that says to try again.
    net.faults = [503]
    with pytest.raises(ProofError, match="right now; try again") as refused:
        await verify_proof_on_chain(
            rotated, user.proof("p" * 64, key=new_key), **rules, chain=api.wallet_public_key
        )
    assert refused.value.code == CHAIN_UNAVAILABLE


async def test_a_wallet_whose_chain_key_cannot_be_read_is_refused() -> None:
    user = UserWallet()
    account = {k: v for k, v in user.account().items() if k != "walletStateInit"}

    async def v3r1_deployed(_address: str) -> bytes | None:  # as TonCenter.wallet_public_key
        raise TonCenterError("get_public_key failed with exit code 11", transient=False)

    with pytest.raises(ProofError, match="exit code 11") as refused:
        await verify_proof_on_chain(
            account,
            user.proof("p" * 64),
            allowed_domains=[DOMAIN],
            max_age_s=MAX_AGE,
            now=NOW,
            chain=v3r1_deployed,
        )
    assert refused.value.code == NO_KEY


async def test_ton_center_get_methods_over_the_local_ton_center(
    chain: tuple[LocalTonCenter, TonCenter],
) -> None:
    net, api = chain
    user = UserWallet()
    assert await api.wallet_public_key(user.raw) is None  # no code: not deployed
    net.add_wallet(user.raw, user.public_key, balance=5, subwallet_id=7)
    assert await api.wallet_public_key(user.raw) == user.public_key
    seqno = await api.run_get_method(user.raw, "seqno")
    assert (seqno.exit_code, seqno.number(0)) == (0, 0)
    missing = await api.run_get_method(user.raw, "get_plugin_list")
    assert missing.exit_code == 11 and missing.number(0) is None


async def test_linking_asks_the_chain_only_for_a_payload_that_can_be_spent(
    db: Database, chain: tuple[LocalTonCenter, TonCenter]
) -> None:
    net, api = chain
    person = await get_or_create_user(db, 803)
    user = UserWallet()
    account = {k: v for k, v in user.account().items() if k != "walletStateInit"}
    net.add_wallet(user.raw, user.public_key, balance=10**9, subwallet_id=0)
    rules = {"allowed_domains": [DOMAIN], "max_age_s": MAX_AGE, "now": NOW + 5}

    async def link(payload: str) -> TonWallet:
        """The wallet linked with its proof of ``payload``, the chain asked for its key."""
        proof = user.proof(payload)
        return await link_wallet(
            db, person.id, "user", account, proof, **rules, chain=api.wallet_public_key
        )

    before = net.requests
    with pytest.raises(ProofError, match="unknown"):
        await link("f" * 64)
    assert net.requests == before

    payload = await issue_payload(db, MAX_AGE, now=NOW)
    linked = await link(payload)
    assert linked.public_key == user.public_key.hex() and net.requests == before + 1
    with pytest.raises(ProofError, match="already used"):
        await link(payload)


def test_proofs_are_read_from_every_tonconnect_shape() -> None:
    entry = REAL[0]
    account, proof = entry["account"], entry["proof"]
    event = connect_event(account, proof)
    page = {k: v for k, v in account.items() if k != "network"} | {"chain": account["network"]}
    shapes = [
        entry,
        {"account": page, "proof": proof},
        {"account": page, "connectItems": {"tonProof": {"name": "ton_proof", "proof": proof}}},
        event,
        event["payload"],
    ]
    for shape in shapes:
        found_account, found_proof = proof_from_json(shape)
        assert found_proof == proof
        assert found_account["network"] == account["network"]
        assert found_account["walletStateInit"] == account["walletStateInit"]
    bad_shapes = (
        ([], "JSON object"),
        ({"proof": proof}, "no account"),
        ({"account": page}, "no ton"),
    )
    for bad, reason in bad_shapes:
        with pytest.raises(ProofError, match=reason):
            proof_from_json(bad)


# ----------------------------------------------- a wallet that sends no state init: the bot


def test_the_bot_reads_a_wallet_that_sends_no_state_init() -> None:
    from pytonconnect import TonConnect

    user = UserWallet()
    account = {k: v for k, v in user.account().items() if k != "walletStateInit"}
    event = connect_event(account, user.proof("p" * 64))
    plain = TonConnect("https://cocoon.example/tonconnect-manifest.json", MemoryStorage())
    with pytest.raises(KeyError):  # pytonconnect itself: when this stops, drop CocoonTonConnect
        plain._wallet_events_listener(copy.deepcopy(event))
    wallet = bridge_delivers(event)
    assert wallet.account.wallet_state_init is None and wallet.account.address == account["address"]


# --------------------------------------------- the payload store, and proofs tampered here


def test_a_changed_byte_anywhere_is_refused() -> None:
    user = UserWallet()
    proof = user.proof("p" * 64)
    signature = bytearray(base64.b64decode(proof["signature"]))
    signature[5] ^= 1
    with pytest.raises(ProofError, match="signature"):
        check(user.account(), {**proof, "signature": base64.b64encode(bytes(signature)).decode()})
    with pytest.raises(ProofError, match="signature"):
        check(user.account(), {**proof, "payload": "q" + "p" * 63})
    with pytest.raises(ProofError, match="signature"):
        check(user.account(), {**proof, "timestamp": NOW + 1})


def test_a_wrong_domain_and_an_old_timestamp_are_refused() -> None:
    user = UserWallet()
    with pytest.raises(ProofError, match="another site"):
        check(user.account(), user.proof("p" * 64, domain="evil.example"))
    with pytest.raises(ProofError, match="too old"):
        check(user.account(), user.proof("p" * 64, timestamp=NOW - 3600))
    with pytest.raises(ProofError, match="another network"):
        verify_proof(
            user.account(),
            user.proof("p" * 64),
            allowed_domains=[DOMAIN],
            max_age_s=900,
            network="-3",
            now=NOW,
        )


def test_a_state_init_that_is_not_the_addresss_is_refused() -> None:
    user, other = UserWallet(), UserWallet()
    # The attacker's own state init (their key) presented for the victim's address.
    forged = {**user.account(), "walletStateInit": other.account()["walletStateInit"]}
    forged.pop("publicKey")
    digest = proof_message(user.raw, DOMAIN, NOW, "p" * 64)
    proof = {
        **user.proof("p" * 64),
        "signature": base64.b64encode(other.key.sign(digest).signature).decode(),
    }
    with pytest.raises(ProofError, match="does not match its address"):
        check(forged, proof)
    with pytest.raises(ProofError, match="public key"):
        check({**user.account(), "publicKey": other.public_key.hex()}, user.proof("p" * 64))


async def test_a_payload_is_single_use_and_links_the_wallet(db: Database) -> None:
    person = await get_or_create_user(db, 801)
    user = UserWallet()
    payload = await issue_payload(db, 900, now=NOW)
    rules = {"allowed_domains": [DOMAIN], "max_age_s": 900, "now": NOW + 5}

    linked = await link_wallet(
        db, person.id, "payout", user.account(), user.proof(payload), **rules
    )
    assert linked.address == user.raw
    assert (await linked_wallet(db, person.id, "payout")).address == user.raw  # type: ignore[union-attr]

    with pytest.raises(ProofError, match="already used"):
        await link_wallet(db, person.id, "payout", user.account(), user.proof(payload), **rules)
    with pytest.raises(ProofError, match="unknown"):
        await link_wallet(db, person.id, "user", user.account(), user.proof("f" * 64), **rules)
    stale = await issue_payload(db, 60, now=NOW - 600)
    with pytest.raises(ProofError, match="expired"):
        await link_wallet(db, person.id, "user", user.account(), user.proof(stale), **rules)
    assert await linked_wallet(db, person.id, "user") is None


@pytest.fixture
async def bot_on_chain(
    settings: Any, redis_url: str
) -> AsyncIterator[tuple[Any, LocalTonCenter, Any]]:
    """The bot (as tests/support/bot.py runs it) with TON Center and a TON Connect bridge
    on loopback."""
    from tests.support.bot import bot_settings, running_harness
    from tests.support.tonconnect_bridge import running_bridge

    net = LocalTonCenter()
    async with LocalTonCenterServer(net) as url, running_bridge() as bridge:
        s = bot_settings(settings, tonconnect_wallets_url=bridge.wallets_url)
        s = s.model_copy(update={"ton": s.ton.model_copy(update={"api_url": url})})
        async with running_harness(s) as harness:
            yield harness, net, bridge


async def test_the_bot_says_what_is_missing_when_a_wallet_sends_no_state_init(
    bot_on_chain: tuple[Any, LocalTonCenter, Any],
) -> None:
    from tests.support.tonconnect_bridge import BridgeWallet

    bot, net, bridge = bot_on_chain
    user = UserWallet()
    await bot.send("/provider", language="ru")
    for deployed, expected in ((False, "ещё не развёрнут"), (True, "Кошелёк для выплат привязан")):
        if deployed:
            net.add_wallet(user.raw, user.public_key, balance=10**9, subwallet_id=0)
        await bot.press("tcw:p", language="ru")
        await bot.press(bot.last().reply_markup.inline_keyboard[0][0].callback_data, language="ru")
        wallet = BridgeWallet(bridge, user, state_init=False)
        await wallet.connect(
            bot.last().reply_markup.inline_keyboard[0][0].url, timestamp=int(time.time())
        )
        await asyncio.wait_for(asyncio.gather(*bot.app.services.wallets.tasks.values()), 30)
        assert expected in bot.last().text
    linked = await linked_wallet(bot.db, (await bot.user()).id, "payout")
    assert linked is not None and linked.public_key == user.public_key.hex()


@pytest.fixture
async def app_on_chain(settings: Any, db_url: str) -> AsyncIterator[tuple[Any, LocalTonCenter]]:
    """``cocoon web`` (as tests/test_miniapp_api.py runs it) with TON Center on loopback."""
    from aiohttp.test_utils import TestClient, TestServer

    from backend import appkeys
    from backend.web import create_app
    from tests.support.miniapp_helpers import app_settings

    net = LocalTonCenter()
    async with LocalTonCenterServer(net) as url:
        s = app_settings(settings, db_url)
        s = s.model_copy(update={"ton": s.ton.model_copy(update={"api_url": url})})
        client = TestClient(TestServer(create_app(s)))
        await client.start_server()
        try:
            await client.app[appkeys.DATABASE].upgrade()
            yield client, net
        finally:
            await client.close()


async def test_the_mini_app_says_what_is_missing_when_a_wallet_sends_no_state_init(
    app_on_chain: tuple[Any, LocalTonCenter],
) -> None:
    from tests.support.miniapp_helpers import auth, init_data

    client, net = app_on_chain
    headers = auth(init_data(7101, language="ru"))
    user = UserWallet()
    page = {"address": user.raw.lower(), "chain": "-239", "publicKey": user.public_key.hex()}
    response = await client.post("/app/api/wallet/payload", headers=headers)
    payload = (await response.json())["payload"]
    body = {"account": page, "proof": user.proof(payload, timestamp=int(time.time()))}
    response = await client.post("/app/api/wallet", headers=headers, json=body)
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["code"] == "proof_refused" and "ещё не развёрнут" in error["message"]

    net.add_wallet(user.raw, user.public_key, balance=10**9, subwallet_id=0)  # deployed now
    response = await client.post("/app/api/wallet", headers=headers, json=body)
    assert response.status == 200, await response.text()
    assert (await response.json())["raw"] == user.raw
