"""ton_proof: a real ed25519 wallet key signs a proof; the server accepts it once, and refuses
a changed byte, a wrong domain, an old timestamp, a reused payload and a foreign state init."""

from __future__ import annotations

import base64
import os
from typing import Any

import pytest
from nacl.signing import SigningKey

from backend.db import Database
from backend.ton.comment import raw_address
from backend.ton.proof import (
    ProofError,
    issue_payload,
    link_wallet,
    linked_wallet,
    proof_message,
    verify_proof,
)
from backend.ton.wallet import HotWallet
from backend.users import get_or_create_user

DOMAIN = "cocoon.example"
NOW = 1_800_000_000


class UserWallet:
    """A user's wallet app: a key, and the wallet (v4r2 or v5r1) it controls."""

    def __init__(self, version: str = "v4r2") -> None:
        seed = os.urandom(32)
        self.key = SigningKey(seed)
        if version == "v4r2":
            wallet = HotWallet(seed)
            self.raw, self.state_init = wallet.raw, wallet.state_init
        else:
            from types import SimpleNamespace

            from ton_core import NetworkGlobalID, PrivateKey
            from tonutils.contracts.wallet.versions.v5 import WalletV5R1

            client = SimpleNamespace(network=NetworkGlobalID.MAINNET)
            v5 = WalletV5R1.from_private_key(client, PrivateKey(seed))  # type: ignore[arg-type]
            self.raw, self.state_init = raw_address(v5.address), v5.state_init
        self.public_key = bytes(self.key.verify_key)

    def account(self) -> dict[str, Any]:
        return {
            "address": self.raw.lower(),
            "network": "-239",
            "walletStateInit": base64.b64encode(self.state_init.serialize().to_boc()).decode(),
            "publicKey": self.public_key.hex(),
        }

    def proof(self, payload: str, *, domain: str = DOMAIN, timestamp: int = NOW) -> dict[str, Any]:
        digest = proof_message(self.raw, domain, timestamp, payload)
        return {
            "timestamp": timestamp,
            "domain": {"lengthBytes": len(domain.encode()), "value": domain},
            "signature": base64.b64encode(self.key.sign(digest).signature).decode(),
            "payload": payload,
        }


def check(account: dict[str, Any], proof: dict[str, Any]) -> object:
    return verify_proof(account, proof, allowed_domains=[DOMAIN], max_age_s=900, now=NOW + 10)


@pytest.mark.parametrize("version", ["v4r2", "v5r1"])
def test_a_valid_proof_gives_the_wallets_key(version: str) -> None:
    user = UserWallet(version)
    verified = check(user.account(), user.proof("p" * 64))
    assert verified.public_key == user.public_key  # type: ignore[attr-defined]
    assert verified.address == user.raw  # type: ignore[attr-defined]


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
