"""The ton_proof tests' shared kit: the real proofs recorded from real wallets
(``tests/fixtures/tonproof``, README there) and the rules each was made under, the check a
proof signed here goes through, a local TON Center on loopback (the ``chain`` fixture, registered
in tests/conftest.py), and a wallet's TON Connect ``connect`` event as the bot receives it."""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from backend.ton.localnet import LocalTonCenter, LocalTonCenterServer
from backend.ton.proof import verify_proof
from backend.ton.toncenter import TonCenter
from tests.support.wallets import DEVICE, DOMAIN, NOW, MemoryStorage

MAX_AGE = 900
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "tonproof"
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


def connect_event(account: dict[str, Any], proof: dict[str, Any] | None) -> dict[str, Any]:
    """What a wallet sends through the bridge when it connects (TON Connect ``connect``)."""
    items: list[dict[str, Any]] = [{"name": "ton_addr", **account}]
    if proof is not None:
        items.append({"name": "ton_proof", "proof": proof})
    return {"event": "connect", "id": 1, "payload": {"items": items, "device": DEVICE}}


def bridge_delivers(event: dict[str, Any]) -> Any:
    """The bot's TON Connect client receiving ``event`` from the bridge: the wallet it sees."""
    from bot.tonconnect import CocoonTonConnect

    connector = CocoonTonConnect("https://cocoon.example/tonconnect-manifest.json", MemoryStorage())
    connector._wallet_events_listener(copy.deepcopy(event))
    assert connector.connected
    return connector.wallet
