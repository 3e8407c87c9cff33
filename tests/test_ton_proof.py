"""ton_proof: real proofs recorded from real wallets (``tests/fixtures/tonproof``, README there)
are accepted, each at its own time, domain and network, through the verifier, the bot's and
the Mini App's shapes and the linking itself; every tampered variant of each is refused with
its reason. Real ed25519 keys sign proofs for the wallets no recording covers (v3r1, v3r2,
W5 beta on mainnet, Telegram's wallet); the chain is a local TON Center on loopback. The server
accepts a payload once, and refuses a changed byte, a wrong domain, an old timestamp, a reused
payload and a foreign state init."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

from backend.db import Database
from backend.models import TonProofPayload
from backend.ton.comment import raw_address
from backend.ton.contracts import read_state_init
from backend.ton.localnet import LocalTonCenter, LocalTonCenterServer
from backend.ton.proof import (
    CHAIN_UNAVAILABLE,
    NO_KEY,
    NO_STATE_INIT,
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
from tests.support.wallets import DOMAIN, NOW, MemoryStorage, UserWallet

MAX_AGE = 900
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "tonproof"
REAL: list[dict[str, Any]] = json.loads((FIXTURES / "real_proofs.json").read_text())
STORE_PAYLOAD = 64  # the payload store keeps this server's payloads: 64 hex characters


def check(account: dict[str, Any], proof: dict[str, Any]) -> Any:
    return verify_proof(account, proof, allowed_domains=[DOMAIN], max_age_s=MAX_AGE, now=NOW + 10)


def own_rules(entry: dict[str, Any]) -> dict[str, Any]:
    """A recorded proof's own site, network and moment: checked as the server it was made
    for would have checked it, with its payload treated as issued."""
    proof = entry["proof"]
    return {
        "allowed_domains": [proof["domain"]["value"]],
        "max_age_s": MAX_AGE,
        "network": entry["account"]["network"],
        "now": proof["timestamp"],
    }


def contract_of(entry: dict[str, Any]) -> str:
    version = entry["version"]
    return {"v4r2": "wallet v4r2", "W5": "wallet W5 beta", "v5r1": "wallet v5r1 (W5)"}[
        version.split()[0]
    ]


def real_ids(entry: dict[str, Any]) -> str:
    return f"{entry['id']}-{entry['version'].split()[0]}"


@pytest.fixture
async def chain() -> AsyncIterator[tuple[LocalTonCenter, TonCenter]]:
    """A local TON Center on loopback and a TON Center client of it."""
    net = LocalTonCenter()
    async with LocalTonCenterServer(net) as url, TonCenter(url) as api:
        yield net, api


# ----------------------------------------------------------------- real recorded proofs


def test_the_fixture_holds_every_recorded_proof() -> None:
    assert [e["id"] for e in REAL] == ["P1", "P2", "P3", "P5", "P6", "P7", "P8", "P9", "P10"]
    assert {contract_of(e) for e in REAL} == {
        "wallet v4r2",
        "wallet W5 beta",
        "wallet v5r1 (W5)",
    }


@pytest.mark.parametrize("entry", REAL, ids=real_ids)
def test_every_real_proof_is_accepted_at_its_own_time_domain_and_network(
    entry: dict[str, Any],
) -> None:
    account, proof = entry["account"], entry["proof"]
    checked: list[str] = []
    verified = verify_proof(account, proof, **own_rules(entry), trace=checked.append)
    assert verified.address == raw_address(account["address"])
    assert verified.payload == proof["payload"]
    if account.get("publicKey"):
        assert verified.public_key.hex() == account["publicKey"]
    state = read_state_init(account["walletStateInit"], account["address"], account["network"])
    assert state.wallet.name == contract_of(entry) and state.public_key == verified.public_key
    assert checked[-1].startswith("signature: valid")


def connect_event(account: dict[str, Any], proof: dict[str, Any] | None) -> dict[str, Any]:
    """What a wallet sends through the bridge when it connects (TON Connect ``connect``)."""
    items: list[dict[str, Any]] = [{"name": "ton_addr", **account}]
    if proof is not None:
        items.append({"name": "ton_proof", "proof": proof})
    device = {
        "platform": "android",
        "appName": "Tonkeeper",
        "appVersion": "5.0.0",
        "maxProtocolVersion": 2,
        "features": ["SendTransaction", {"name": "SendTransaction", "maxMessages": 4}],
    }
    return {"event": "connect", "id": 1, "payload": {"items": items, "device": device}}


def bridge_delivers(event: dict[str, Any]) -> Any:
    """The bot's TON Connect client receiving ``event`` from the bridge: the wallet it sees."""
    from bot.tonconnect import CocoonTonConnect

    connector = CocoonTonConnect("https://cocoon.example/tonconnect-manifest.json", MemoryStorage())
    connector._wallet_events_listener(copy.deepcopy(event))
    assert connector.connected
    return connector.wallet


@pytest.mark.parametrize("entry", REAL, ids=real_ids)
def test_every_real_proof_is_accepted_through_the_bots_and_the_mini_apps_shapes(
    entry: dict[str, Any],
) -> None:
    from bot.tonconnect import account_dict, proof_dict
    from miniapp.protocol import TonAccount

    # The bot: the connect event through pytonconnect, then the bot's own dicts.
    wallet = bridge_delivers(connect_event(entry["account"], entry["proof"]))
    proof = proof_dict(wallet)
    assert proof is not None
    verified = verify_proof(account_dict(wallet), proof, **own_rules(entry))
    assert verified.address == raw_address(entry["account"]["address"])

    # The Mini App: the page posts TON Connect UI's wallet.account (``chain``, not network).
    page = {k: v for k, v in entry["account"].items() if k != "network"}
    body = TonAccount.model_validate({**page, "chain": entry["account"]["network"]})
    account = {
        "address": body.address,
        "network": body.chain,
        "walletStateInit": body.walletStateInit,
        "publicKey": body.publicKey,
    }
    assert verify_proof(account, entry["proof"], **own_rules(entry)) == verified


@pytest.mark.parametrize(
    "entry", [e for e in REAL if len(e["proof"]["payload"]) <= STORE_PAYLOAD], ids=real_ids
)
async def test_a_real_proof_links_its_wallet_once(db: Database, entry: dict[str, Any]) -> None:
    """Linking, with the recorded payload treated as issued by this server (those that fit
    the payload store: it keeps this server's 64-character payloads)."""
    account, proof = entry["account"], entry["proof"]
    rules = own_rules(entry)
    async with db.session() as session, session.begin():
        issued = proof["timestamp"] - 30
        session.add(
            TonProofPayload(payload=proof["payload"], issued_at=issued, expires_at=issued + MAX_AGE)
        )
    person = await get_or_create_user(db, 802)
    linked = await link_wallet(db, person.id, "payout", account, proof, **rules)
    assert linked.address == raw_address(account["address"])
    stored = await linked_wallet(db, person.id, "payout")
    assert stored is not None and stored.public_key == linked.public_key
    with pytest.raises(ProofError, match="already used"):  # a replay
        await link_wallet(db, person.id, "user", account, proof, **rules)
    assert await linked_wallet(db, person.id, "user") is None


def _flip(b64: str, index: int = 5) -> str:
    raw = bytearray(base64.b64decode(b64))
    raw[index] ^= 1
    return base64.b64encode(bytes(raw)).decode()


Tamper = Callable[[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]], None]


def _other_address(account: dict[str, Any], *_: Any) -> None:
    workchain, hash_hex = raw_address(account["address"]).split(":")
    last = "0" if hash_hex[-1] != "0" else "1"
    account["address"] = f"{workchain}:{hash_hex[:-1]}{last}"


def _masterchain(account: dict[str, Any], *_: Any) -> None:
    account["address"] = "-1:" + raw_address(account["address"]).split(":")[1]


def _other_network(_a: Any, _p: Any, rules: dict[str, Any], *_: Any) -> None:
    rules["network"] = "-3" if rules["network"] == "-239" else "-239"


def _other_state_init(account: dict[str, Any], _p: Any, _r: Any, other: dict[str, Any]) -> None:
    account["walletStateInit"] = other["account"]["walletStateInit"]


def _set(key: str, value: Any) -> Tamper:
    def tamper(account: dict[str, Any], proof: dict[str, Any], *_: Any) -> None:
        target = proof if key in proof else account
        if key == "domain":
            proof["domain"] = {"lengthBytes": len(value.encode()), "value": value}
        else:
            target[key] = value(target[key]) if callable(value) else value

    return tamper


def _rule(key: str, value: Callable[[Any], Any]) -> Tamper:
    def tamper(_a: Any, _p: Any, rules: dict[str, Any], *_: Any) -> None:
        rules[key] = value(rules[key])

    return tamper


def _signed_elsewhere(_a: Any, proof: dict[str, Any], rules: dict[str, Any], *_: Any) -> None:
    proof["domain"] = {"lengthBytes": 12, "value": "evil.example"}
    rules["allowed_domains"] = [*rules["allowed_domains"], "evil.example"]


TAMPERED: dict[str, tuple[Tamper, str]] = {
    "signature-bit": (_set("signature", _flip), "signature is not valid"),
    "signature-of-another-proof": (
        lambda a, p, r, other: p.update(signature=other["proof"]["signature"]),
        "signature is not valid",
    ),
    "payload": (_set("payload", lambda payload: payload + "0"), "signature is not valid"),
    "timestamp": (_set("timestamp", lambda ts: ts + 1), "signature is not valid"),
    "domain-that-was-not-signed": (_signed_elsewhere, "signature is not valid"),
    "workchain": (_masterchain, "signature is not valid"),
    "domain-not-allowed": (_set("domain", "evil.example"), r"another site \(evil.example\)"),
    "length-bytes": (
        lambda a, p, r, o: p["domain"].update(lengthBytes=p["domain"]["lengthBytes"] + 1),
        "domain length is wrong",
    ),
    "address": (_other_address, "state init does not match its address"),
    "state-init-of-another-wallet": (
        _other_state_init,
        "state init does not match its address",
    ),
    "state-init-garbage": (_set("walletStateInit", "te6cckEBAQEAAgAAAEysuc0="), "not readable"),
    "key": (_set("publicKey", "ab" * 32), "public key does not match its state init"),
    "network": (_other_network, "another network"),
    "network-unknown": (_set("network", "-7"), "not a TON network"),
    "old": (_rule("now", lambda now: now + MAX_AGE + 1), "too old"),
    "future": (_rule("now", lambda now: now - 61), r"too old \(or from the future\)"),
    "incomplete": (lambda a, p, r, o: p.pop("signature"), "incomplete"),
}


@pytest.mark.parametrize("variant", sorted(TAMPERED))
@pytest.mark.parametrize("entry", REAL, ids=real_ids)
def test_every_tampered_real_proof_is_refused_with_its_reason(
    entry: dict[str, Any], variant: str
) -> None:
    tamper, reason = TAMPERED[variant]
    account, proof = copy.deepcopy(entry["account"]), copy.deepcopy(entry["proof"])
    rules = own_rules(entry)
    other = REAL[(REAL.index(entry) + 1) % len(REAL)]
    tamper(account, proof, rules, other)
    with pytest.raises(ProofError, match=reason) as refused:
        verify_proof(account, proof, **rules)
    assert refused.value.code == "refused"


@pytest.mark.parametrize("entry", REAL, ids=real_ids)
async def test_a_real_proof_without_its_state_init_needs_the_chain(
    entry: dict[str, Any], chain: tuple[LocalTonCenter, TonCenter]
) -> None:
    account = {k: v for k, v in entry["account"].items() if k != "walletStateInit"}
    with pytest.raises(ProofError, match="sent no state init") as refused:
        verify_proof(account, entry["proof"], **own_rules(entry))
    assert refused.value.code == NO_STATE_INIT

    net, api = chain  # not deployed here: nothing can vouch for the key
    with pytest.raises(ProofError, match="not deployed yet") as refused:
        await verify_proof_on_chain(
            account, entry["proof"], **own_rules(entry), chain=api.wallet_public_key
        )
    assert refused.value.code == NO_STATE_INIT

    key = read_state_init(
        entry["account"]["walletStateInit"], account["address"], account["network"]
    ).public_key
    net.add_wallet(account["address"], key, balance=10**9, subwallet_id=0)  # deployed
    verified = await verify_proof_on_chain(
        account, entry["proof"], **own_rules(entry), chain=api.wallet_public_key
    )
    assert verified.public_key == key


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
    before = net.requests
    with pytest.raises(ProofError, match="unknown"):
        await link_wallet(
            db,
            person.id,
            "user",
            account,
            user.proof("f" * 64),
            **rules,
            chain=api.wallet_public_key,
        )
    assert net.requests == before

    payload = await issue_payload(db, MAX_AGE, now=NOW)
    linked = await link_wallet(
        db, person.id, "user", account, user.proof(payload), **rules, chain=api.wallet_public_key
    )
    assert linked.public_key == user.public_key.hex() and net.requests == before + 1
    with pytest.raises(ProofError, match="already used"):
        await link_wallet(
            db,
            person.id,
            "user",
            account,
            user.proof(payload),
            **rules,
            chain=api.wallet_public_key,
        )


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
