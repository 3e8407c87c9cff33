"""A user's wallet app for the ton_proof tests: a fresh ed25519 key and the wallet contract it
controls (any version the maintained library builds), signing proofs in Python; and a TON
Connect session store in memory for pytonconnect's connector."""

from __future__ import annotations

import base64
import os
from types import SimpleNamespace
from typing import Any

from nacl.signing import SigningKey

from backend.ton.comment import raw_address
from backend.ton.proof import proof_message
from backend.ton.wallet import HotWallet

DOMAIN = "cocoon.example"
NOW = 1_800_000_000
DEVICE = {
    "platform": "android",
    "appName": "Tonkeeper",
    "appVersion": "5.0.0",
    "maxProtocolVersion": 2,
    "features": ["SendTransaction", {"name": "SendTransaction", "maxMessages": 4}],
}
"""The device a test wallet app says it runs on when it connects over TON Connect."""


class UserWallet:
    """A user's wallet app: a key, and the wallet contract it controls (v4r2 by default;
    v3r1, v3r2, v5beta, v5r1 or tg, built by the maintained library)."""

    def __init__(self, version: str = "v4r2", network: str = "-239") -> None:
        seed = os.urandom(32)
        self.key = SigningKey(seed)
        self.network = network
        if version == "v4r2":
            wallet = HotWallet(seed)
            self.raw, self.state_init = wallet.raw, wallet.state_init
        else:
            from ton_core import NetworkGlobalID, PrivateKey
            from tonutils.contracts import (
                WalletTg,
                WalletV3R1,
                WalletV3R2,
                WalletV5Beta,
                WalletV5R1,
            )

            kind = {
                "v3r1": WalletV3R1,
                "v3r2": WalletV3R2,
                "v5beta": WalletV5Beta,
                "v5r1": WalletV5R1,
                "tg": WalletTg,
            }[version]
            client = SimpleNamespace(network=NetworkGlobalID(int(network)))
            built = kind.from_private_key(client, PrivateKey(seed))  # type: ignore[arg-type]
            self.raw, self.state_init = raw_address(built.address), built.state_init
        self.public_key = bytes(self.key.verify_key)

    def account(self) -> dict[str, Any]:
        return {
            "address": self.raw.lower(),
            "network": self.network,
            "walletStateInit": base64.b64encode(self.state_init.serialize().to_boc()).decode(),
            "publicKey": self.public_key.hex(),
        }

    def proof(
        self,
        payload: str,
        *,
        domain: str = DOMAIN,
        timestamp: int = NOW,
        key: SigningKey | None = None,
    ) -> dict[str, Any]:
        digest = proof_message(self.raw, domain, timestamp, payload)
        return {
            "timestamp": timestamp,
            "domain": {"lengthBytes": len(domain.encode()), "value": domain},
            "signature": base64.b64encode((key or self.key).sign(digest).signature).decode(),
            "payload": payload,
        }


class MemoryStorage:
    """pytonconnect's IStorage, in memory."""

    def __init__(self) -> None:
        self.items: dict[str, str] = {}

    async def set_item(self, key: str, value: str) -> None:
        self.items[key] = value

    async def get_item(self, key: str, default_value: str | None = None) -> str | None:
        return self.items.get(key, default_value)

    async def remove_item(self, key: str) -> None:
        self.items.pop(key, None)
