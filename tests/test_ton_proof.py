"""ton_proof on real recorded proofs (``tests/fixtures/tonproof``, README there): each is
accepted at its own time, domain and network, through the verifier, the bot's and the Mini
App's shapes and the linking itself; every tampered variant of each is refused with its reason;
one sent without its state init needs the chain (a local TON Center on loopback). The proofs
signed here, the payload store and the bot and Mini App on chain are in
tests/test_ton_proof_signed.py."""

from __future__ import annotations

import base64
import copy
from collections.abc import Callable
from typing import Any

import pytest

from backend.db import Database
from backend.models import TonProofPayload
from backend.ton.comment import raw_address
from backend.ton.contracts import read_state_init
from backend.ton.localnet import LocalTonCenter
from backend.ton.proof import (
    NO_STATE_INIT,
    ProofError,
    link_wallet,
    linked_wallet,
    verify_proof,
    verify_proof_on_chain,
)
from backend.ton.toncenter import TonCenter
from backend.users import get_or_create_user
from tests.support.tonproof import (
    MAX_AGE,
    REAL,
    STORE_PAYLOAD,
    bridge_delivers,
    connect_event,
    contract_of,
    own_rules,
    real_ids,
)


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
