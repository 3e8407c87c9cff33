"""``cocoon ton ...`` and ``cocoon watcher`` as an operator runs them: real processes, a real
SQLite file and a local TON Center on loopback. The mnemonic never appears in any output."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from pathlib import Path

import pytest

from backend.ton.comment import decode_comment, raw_address
from backend.ton.localnet import LocalTonCenter, LocalTonCenterServer
from backend.ton.wallet import HotWallet, new_mnemonic, parse_external

pytestmark = pytest.mark.slow

DEPOSIT = "0:" + "D2" * 32
MNEMONIC = new_mnemonic()


async def cocoon(data: Path, *args: str, **env_extra: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COCOON_")}
    env.update(COCOON_DATA_DIR=str(data), COCOON_TON__DEPOSIT_ADDRESS=DEPOSIT, **env_extra)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "backend.cli", *args,
        env=env, cwd=data.parent,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture
async def data(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    code, _out, err = await cocoon(data, "db", "upgrade")
    assert code == 0, err
    return data


async def test_deposit_payload_prints_the_ton_connect_transaction(data: Path) -> None:
    code, out, err = await cocoon(
        data, "ton", "deposit-payload", "--telegram-id", "9001", "--ton", "1.5"
    )
    assert code == 0, err
    request = json.loads(out)
    (message,) = request["messages"]
    assert message["amount"] == "1500000000"
    assert raw_address(message["address"]) == DEPOSIT
    memo = decode_comment(message["payload"]).memo
    code, out, _ = await cocoon(data, "ledger", "balance", "--telegram-id", "9001")
    assert f"deposit memo {memo}" in out

    code, _out, err = await cocoon(
        data, "ton", "deposit-payload", "--telegram-id", "9001", "--amount", "1.5"
    )
    assert code == 2 and err.count("\n") == 1 and "whole number of nano units" in err
    # No language on the command line: "1,000" is neither one nor a thousand, it is refused.
    code, out, err = await cocoon(
        data, "ton", "deposit-payload", "--telegram-id", "9001", "--ton", "1,000"
    )
    assert code == 2 and not out and "--ton must use a point for decimals" in err


async def test_sign_transfer_prints_a_signed_message_and_never_the_words(data: Path) -> None:
    to = "0:" + "E1" * 32
    code, out, err = await cocoon(
        data, "ton", "sign-transfer", "--to", to, "--amount", "2000000000", "--seqno", "4",
        "--valid-until", "4000000000", "--comment", "hello",
        COCOON_TON__HOT_WALLET_MNEMONIC=MNEMONIC,
    )  # fmt: skip
    assert code == 0, err
    wallet = HotWallet.from_mnemonic(MNEMONIC)
    parsed = parse_external(out.strip())
    assert parsed.verifies(wallet.public_key)
    assert parsed.seqno == 4 and parsed.valid_until == 4_000_000_000
    (transfer,) = parsed.transfers
    assert (transfer.destination, transfer.amount, transfer.comment) == (to, 2 * 10**9, "hello")
    for word in set(MNEMONIC.split()):
        assert f" {word} " not in f" {out} {err} "

    code, _out, err = await cocoon(
        data, "ton", "sign-transfer", "--to", to, "--amount", "1", "--seqno", "1",
        "--valid-until", "4000000000", COCOON_TON__HOT_WALLET_MNEMONIC="bad words here",
    )  # fmt: skip
    assert code == 2 and "not valid (3 words)" in err and "bad words" not in err
    code, _out, err = await cocoon(
        data, "ton", "sign-transfer", "--to", to, "--amount", "1", "--seqno", "1",
        "--valid-until", "4000000000",
    )  # fmt: skip
    assert code == 2 and "COCOON_TON__HOT_WALLET_MNEMONIC" in err


async def test_watcher_once_credits_and_admins_resolve_the_unclaimed(data: Path) -> None:
    net = LocalTonCenter()
    code, out, _ = await cocoon(
        data, "ton", "deposit-payload", "--telegram-id", "9002", "--amount", "5"
    )
    memo = decode_comment(json.loads(out)["messages"][0]["payload"]).memo
    assert memo
    net.add_incoming(DEPOSIT, 3_000_000_000, comment=memo)
    net.add_incoming(DEPOSIT, 700_000_000, comment="wrong memo")
    async with LocalTonCenterServer(net) as url:
        for _ in range(2):  # twice: the second run has nothing new
            code, out, err = await cocoon(
                data, "watcher", "--once", COCOON_TON__API_URL=url, COCOON_TON__API_KEY="k"
            )
            assert code == 0, err
    code, out, _ = await cocoon(data, "ledger", "balance", "--telegram-id", "9002")
    assert "available: 3000000000 nanoTON (3 GRAM)" in out

    code, out, _ = await cocoon(data, "ton", "unclaimed")
    assert "700000000 nanoTON" in out and "'wrong memo'" in out
    deposit_id = out.split()[0].lstrip("#")
    for _ in range(2):
        code, out, err = await cocoon(
            data, "ton", "resolve", "--deposit", deposit_id, "--telegram-id", "9002"
        )
        assert code == 0, err
    code, out, _ = await cocoon(data, "ledger", "balance", "--telegram-id", "9002")
    assert "available: 3700000000 nanoTON (3.7 GRAM)" in out
    code, out, _ = await cocoon(data, "ton", "unclaimed")
    assert out.strip() == "no unclaimed deposits"


# ------------------------------------------------------------- cocoon ton verify-proof

PROOFS = Path(__file__).resolve().parent / "fixtures" / "tonproof" / "real_proofs.json"


async def test_verify_proof_says_what_it_checked_and_why_it_refuses(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (w5beta,) = [e for e in json.loads(PROOFS.read_text()) if e["id"] == "P7"]
    at = w5beta["proof"]["timestamp"]
    good, bad = tmp_path / "w5beta.json", tmp_path / "tampered.json"
    good.write_text(json.dumps(w5beta))
    signature = bytearray(base64.b64decode(w5beta["proof"]["signature"]))
    signature[0] ^= 1
    tampered = {
        **w5beta,
        "proof": {**w5beta["proof"], "signature": base64.b64encode(signature).decode()},
    }
    bad.write_text(json.dumps(tampered))
    domain = ("--domain", "winogarcia.github.io")

    code, out, err = await cocoon(
        data, "ton", "verify-proof", str(good), "--at", str(at), *domain, "--network", "testnet"
    )
    assert code == 0, err
    assert "contract wallet W5 beta" in out and "  ok  signature: valid" in out
    assert out.splitlines()[-1] == (
        "ACCEPTED: the holder of key "
        "c5134fcb39879c2cf81ffdc347353d031cf184538130fdd42688152088bf69ba owns "
        "0QB6_XVj2P0ITTUGAngyB2l0OQWYO46kPFsW-249wKGQ3Sqg"
    )

    code, out, _ = await cocoon(
        data, "ton", "verify-proof", str(good), "--at", str(at), *domain, "--network", "mainnet"
    )
    assert code == 1
    assert (
        out.splitlines()[-1] == "REFUSED: the wallet is on another network (testnet, not mainnet)"
    )
    code, out, _ = await cocoon(
        data,
        "ton",
        "verify-proof",
        str(good),
        "--at",
        str(at + 901),
        *domain,
        "--network",
        "testnet",
    )
    assert (
        code == 1 and out.splitlines()[-1] == "REFUSED: the proof is too old (or from the future)"
    )
    code, out, _ = await cocoon(
        data, "ton", "verify-proof", str(bad), "--at", str(at), *domain, "--network", "testnet"
    )
    assert code == 1 and "  ok  state init: hashes to the address" in out
    assert out.splitlines()[-1] == "REFUSED: the proof's signature is not valid"

    (tmp_path / "junk.json").write_text("{not json")
    code, out, err = await cocoon(data, "ton", "verify-proof", str(tmp_path / "junk.json"), *domain)
    assert code == 2 and out == "" and err.count("\n") == 1 and "junk.json" in err
    code, _out, err = await cocoon(data, "ton", "verify-proof", str(good))
    assert code == 2 and "--domain" in err


async def test_verify_proof_reads_a_telegram_wallets_key_from_ton_center(tmp_path: Path) -> None:
    from nacl.signing import SigningKey

    from tests.support.wallets import DOMAIN, NOW, UserWallet

    data = tmp_path / "data"
    user = UserWallet("tg")
    rotated = SigningKey(os.urandom(32))
    account = {k: v for k, v in user.account().items() if k != "publicKey"}
    path = tmp_path / "tg.json"
    path.write_text(json.dumps({"account": account, "proof": user.proof("p" * 64, key=rotated)}))
    net = LocalTonCenter()
    net.add_wallet(user.raw, bytes(rotated.verify_key), balance=10**9, subwallet_id=0)
    args = ("ton", "verify-proof", str(path), "--at", str(NOW + 5), "--domain", DOMAIN)
    async with LocalTonCenterServer(net) as url:
        code, out, err = await cocoon(data, *args, COCOON_TON__API_URL=url)
    assert code == 0, err
    assert "contract Telegram wallet (WalletTg)" in out and "read from the chain" in out
    assert bytes(rotated.verify_key).hex() in out.splitlines()[-1]

    code, out, _ = await cocoon(data, *args, COCOON_TON__API_URL="http://127.0.0.1:9")
    assert code == 1
    assert out.splitlines()[-1] == (
        "REFUSED: the wallet's key could not be read from the chain right now; try again "
        "[chain_unavailable]"
    )
