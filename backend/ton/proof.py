"""TON Connect ``ton_proof``: a wallet proves it owns an address, checked on the server.

Per the TON Connect spec (and ton-connect/sdk ``packages/ton-proof``):

- the payload was issued by this server, is unexpired and is used once (``ton_proof_payloads``);
- the domain is on the allow-list and the timestamp is within the window;
- the public key comes from the wallet's ``walletStateInit``, whose hash must be the address;
- the signature is ed25519 over ``sha256(0xFFFF ‖ "ton-connect" ‖ sha256(message))``, where
  ``message = "ton-proof-item-v2/" ‖ workchain (int32 BE) ‖ address hash ‖ domain length
  (uint32 LE) ‖ domain ‖ timestamp (uint64 LE) ‖ payload``.

pytonconnect's own ``check_proof`` is not used (it is disabled upstream as vulnerable).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey
from pytoniq_core import Cell
from pytoniq_core.tlb.account import StateInit
from sqlalchemy import select, update

from backend.db import Database
from backend.models import TonProofPayload, TonWallet
from backend.ton.comment import AddressError, parse_address, raw_address

PREFIX = b"ton-proof-item-v2/"
CONNECT_PREFIX = b"\xff\xff" + b"ton-connect"
PAYLOAD_BYTES = 32
PURPOSES = ("user", "payout")
NETWORKS = {"mainnet": "-239", "testnet": "-3"}  # TON Connect's CHAIN ids


class ProofError(ValueError):
    """A ton_proof that is refused; the message says why (safe to show the user)."""


def _wallet_layouts() -> dict[bytes, int]:
    """Code hash of known wallets → bit offset of the public key in their data cell."""
    from ton_core import CONTRACT_CODES, ContractVersion

    layouts: dict[bytes, int] = {}
    for version, offset in (
        (ContractVersion.WalletV3R1, 64),  # seqno:32 subwallet:32 key:256
        (ContractVersion.WalletV3R2, 64),
        (ContractVersion.WalletV4R1, 64),
        (ContractVersion.WalletV4R2, 64),
        (ContractVersion.WalletV5Beta, 65),  # is_signature_allowed:1 seqno:32 wallet_id:32 key
        (ContractVersion.WalletV5R1, 65),
    ):
        code = CONTRACT_CODES[version]
        cell = code if isinstance(code, Cell) else Cell.one_from_boc(code)
        layouts[cell.hash] = offset
    return layouts


_LAYOUTS: dict[bytes, int] | None = None


def public_key_from_state_init(state_init_b64: str, address: str) -> bytes:
    """The wallet's public key, read from a state init that must hash to ``address``."""
    global _LAYOUTS
    try:
        cell = Cell.one_from_boc(base64.b64decode(state_init_b64))
        state = StateInit.deserialize(cell.begin_parse())
    except Exception:
        raise ProofError("the wallet's state init is not readable") from None
    try:
        parsed = parse_address(address)
    except AddressError:
        raise ProofError("the address is not a TON address") from None
    if cell.hash != parsed.hash_part:
        raise ProofError("the wallet's state init does not match its address")
    if _LAYOUTS is None:
        _LAYOUTS = _wallet_layouts()
    if state.code is None or state.data is None or state.code.hash not in _LAYOUTS:
        raise ProofError("the wallet's contract is not a known wallet")
    data = state.data.begin_parse()
    data.skip_bits(_LAYOUTS[state.code.hash])
    return data.load_bytes(32)


def proof_message(address: str, domain: str, timestamp: int, payload: str) -> bytes:
    """What the wallet signs (the hash of it, behind the ton-connect prefix)."""
    parsed = parse_address(address)
    domain_bytes = domain.encode()
    message = (
        PREFIX
        + parsed.wc.to_bytes(4, "big", signed=True)
        + parsed.hash_part
        + len(domain_bytes).to_bytes(4, "little")
        + domain_bytes
        + timestamp.to_bytes(8, "little")
        + payload.encode()
    )
    return hashlib.sha256(CONNECT_PREFIX + hashlib.sha256(message).digest()).digest()


@dataclass(frozen=True)
class VerifiedWallet:
    address: str  # raw
    public_key: bytes
    payload: str


def verify_proof(
    account: dict[str, Any],
    proof: dict[str, Any],
    *,
    allowed_domains: list[str],
    max_age_s: int,
    network: str | None = None,
    now: float | None = None,
) -> VerifiedWallet:
    """Check a TON Connect ``account`` + ``ton_proof.proof`` pair, without the payload store.

    ``account`` is ``{address, network, walletStateInit, publicKey?}`` and ``proof`` is
    ``{timestamp, domain: {lengthBytes, value}, signature, payload}`` as the wallet sends them.
    ``network``: ``"-239"`` (mainnet) or ``"-3"`` (testnet) to insist on one.
    """
    now = time.time() if now is None else now
    try:
        address = str(account["address"])
        state_init = str(account["walletStateInit"])
        timestamp = int(proof["timestamp"])
        domain = str(proof["domain"]["value"])
        length = int(proof["domain"].get("lengthBytes", len(domain.encode())))
        signature = base64.b64decode(str(proof["signature"]))
        payload = str(proof["payload"])
        domain.encode(), payload.encode(), address.encode()  # lone surrogates: not UTF-8
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
        raise ProofError("the proof is incomplete") from None
    if network is not None and str(account.get("network")) != network:
        raise ProofError("the wallet is on another network")
    if length != len(domain.encode()):
        raise ProofError("the proof's domain length is wrong")
    if domain.lower() not in {d.lower() for d in allowed_domains}:
        raise ProofError(f"the proof is for another site ({domain})")
    if timestamp < now - max_age_s or timestamp > now + 60:
        raise ProofError("the proof is too old (or from the future)")
    public_key = public_key_from_state_init(state_init, address)
    claimed = account.get("publicKey")
    if claimed and str(claimed).lower() != public_key.hex():
        raise ProofError("the wallet's public key does not match its state init")
    try:
        VerifyKey(public_key).verify(proof_message(address, domain, timestamp, payload), signature)
    except (BadSignatureError, ValueError):
        raise ProofError("the proof's signature is not valid") from None
    return VerifiedWallet(raw_address(address), public_key, payload)


# ----------------------------------------------------------------- payloads and linking


async def issue_payload(db: Database, ttl_s: int, *, now: float | None = None) -> str:
    """A fresh single-use payload for ``tonProof`` (hex, 64 characters)."""
    issued = int(time.time() if now is None else now)
    payload = secrets.token_hex(PAYLOAD_BYTES)
    async with db.session() as session, session.begin():
        session.add(TonProofPayload(payload=payload, issued_at=issued, expires_at=issued + ttl_s))
    return payload


async def _consume_payload(db: Database, payload: str, now: int) -> None:
    async with db.session() as session, session.begin():
        used = await session.execute(
            update(TonProofPayload)
            .where(
                TonProofPayload.payload == payload,
                TonProofPayload.used_at.is_(None),
                TonProofPayload.expires_at >= now,
            )
            .values(used_at=now)
            .execution_options(synchronize_session=False)
        )
        if used.rowcount != 1:
            raise ProofError("the proof's payload is unknown, expired or already used")


async def link_wallet(
    db: Database,
    user_id: int,
    purpose: str,
    account: dict[str, Any],
    proof: dict[str, Any],
    *,
    allowed_domains: list[str],
    max_age_s: int,
    network: str | None = None,
    now: float | None = None,
) -> TonWallet:
    """Verify a proof, spend its payload, and link the wallet to the user for ``purpose``
    (``user``: the Mini App's wallet; ``payout``: where a provider is paid). Replaces an
    earlier wallet of the same purpose."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}")
    at = time.time() if now is None else now
    verified = verify_proof(
        account,
        proof,
        allowed_domains=allowed_domains,
        max_age_s=max_age_s,
        network=network,
        now=at,
    )
    await _consume_payload(db, verified.payload, int(at))
    async with db.session() as session, session.begin():
        wallet = await session.scalar(
            select(TonWallet).where(TonWallet.user_id == user_id, TonWallet.purpose == purpose)
        )
        if wallet is None:
            wallet = TonWallet(user_id=user_id, purpose=purpose)
            session.add(wallet)
        wallet.address = verified.address
        wallet.public_key = verified.public_key.hex()
    return wallet


async def linked_wallet(db: Database, user_id: int, purpose: str) -> TonWallet | None:
    async with db.session() as session:
        return await session.scalar(
            select(TonWallet).where(TonWallet.user_id == user_id, TonWallet.purpose == purpose)
        )
