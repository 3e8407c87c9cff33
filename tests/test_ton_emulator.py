"""The payout messages Cocoon signs, run on the real wallet contracts' code in the TON emulator
(``@ton/sandbox``, pinned in tests/ton_emulator): the Highload Wallet v3 batch pays the right
addresses the right amounts with the right comments, a replay is refused (query id, then the
replay window), and the v4r2 payout transfer pays the same way.

The contract code is the maintained library's (``ton_core``), checked against the hash of the
official repository's compiled highload-wallet-contract-v3."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from ton_core import CONTRACT_CODES, Cell, ContractVersion

from backend.ton.comment import raw_address
from backend.ton.wallet import BatchTransfer, HighloadHotWallet, HotWallet, new_mnemonic

EMULATOR = Path(__file__).parent / "ton_emulator"
TON = 1_000_000_000
NOW = 1_800_000_000
HIGHLOAD_V3_CODE_HASH = "11acad7955844090f283bf238bc1449871f783e7cc0979408d3f4859483e8525"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("node") is None or not (EMULATOR / "node_modules").is_dir(),
        reason="run `npm ci` in tests/ton_emulator (the CI does)",
    ),
]


def emulate(
    state_init: Any, balance: int, messages: list[tuple[str, int]], processed: list[int]
) -> dict[str, Any]:
    request = {
        "code": base64.b64encode(state_init.code.to_boc()).decode(),
        "data": base64.b64encode(state_init.data.to_boc()).decode(),
        "balance": str(balance),
        "now": messages[0][1],
        "messages": [{"boc": boc, "now": now} for boc, now in messages],
        "processed": processed,
    }
    done = subprocess.run(
        ["node", str(EMULATOR / "run.mjs")],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout)


def test_the_library_code_is_the_official_highload_v3() -> None:
    code = CONTRACT_CODES[ContractVersion.WalletHighloadV3R1]
    cell = code if isinstance(code, Cell) else Cell.one_from_boc(code)
    assert cell.hash.hex() == HIGHLOAD_V3_CODE_HASH


async def test_a_highload_batch_runs_on_the_real_contract_and_a_replay_is_refused() -> None:
    seed = HotWallet.from_mnemonic(new_mnemonic()).seed
    wallet = HighloadHotWallet(seed, timeout=3600)
    destinations = [f"0:{0x50 + i:064X}" for i in range(253)]
    transfers = [
        BatchTransfer(dest, TON + i, f"Cocoon payout #{i}") for i, dest in enumerate(destinations)
    ]
    batch = await wallet.sign_batch(transfers, query_id=1026, created_at=NOW - 30)
    single = await wallet.sign_batch(transfers[:1], query_id=1027, created_at=NOW - 30)
    late = await wallet.sign_batch(transfers[:1], query_id=1028, created_at=NOW - 30)
    out = emulate(
        wallet.state_init,
        1_000 * TON,
        [
            (batch.boc, NOW),
            (batch.boc, NOW + 1),  # the same message again: its query id is used
            (single.boc, NOW + 2),
            (late.boc, NOW + 3600),  # created_at + timeout passed: refused
        ],
        [1026, 1027, 1028, 1029],
    )
    assert out["address"].upper() == wallet.raw.upper()
    first, replay, one, too_late = out["results"]
    assert first["accepted"] and first["transactions"] == 2  # external, then the action list
    assert sorted(
        (raw_address(t["destination"]), int(t["value"]), t["comment"]) for t in first["transfers"]
    ) == sorted((raw_address(t.destination), t.amount, t.comment) for t in transfers)
    assert not replay["accepted"]
    assert one["accepted"]
    assert [
        (raw_address(t["destination"]), int(t["value"]), t["comment"]) for t in one["transfers"]
    ] == [(raw_address(destinations[0]), TON, "Cocoon payout #0")]
    assert not too_late["accepted"]
    assert out["processed"] == [True, True, False, False]


def test_the_v4r2_payout_transfer_runs_on_the_real_contract() -> None:
    hot = HotWallet.from_mnemonic(new_mnemonic())
    dest = "0:" + "7A" * 32
    first = hot.sign_transfer(
        dest, 3 * TON, seqno=0, valid_until=NOW + 60, comment="Cocoon payout #5"
    )
    out = emulate(hot.state_init, 100 * TON, [(first.boc, NOW), (first.boc, NOW + 1)], [])
    assert out["address"].upper() == hot.raw.upper()
    paid, replay = out["results"]
    assert paid["accepted"]
    assert [
        (raw_address(t["destination"]), int(t["value"]), t["comment"]) for t in paid["transfers"]
    ] == [(raw_address(dest), 3 * TON, "Cocoon payout #5")]
    assert not replay["accepted"]  # its seqno is used
