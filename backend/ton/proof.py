"""TON Connect ``ton_proof``: a wallet proves it owns an address, checked on the server.

Per the TON Connect spec (and ton-connect/sdk ``packages/ton-proof``):

- the payload was issued by this server, is unexpired and is used once (``ton_proof_payloads``);
- the domain is on the allow-list and the timestamp is within the window;
- the public key comes from the wallet's ``walletStateInit``, whose hash must be the address,
  read with the data layout of its contract (the maintained library's, ``ton_core``: wallet
  v3r1, v3r2, v4r1, v4r2, W5 beta, v5r1 and Telegram's own wallet); or from the chain
  (``get_public_key`` through TON Center) when the wallet sent no state init, or when its
  contract can change its key after deployment (Telegram's wallet) and it is deployed;
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey
from sqlalchemy import select, update

from backend.db import Database, rowcount
from backend.models import TonProofPayload, TonWallet
from backend.ton.comment import AddressError, parse_address, raw_address
from backend.ton.contracts import StateInitError, StateInitKey, read_state_init

if TYPE_CHECKING:
    from backend.settings import TonSettings

PREFIX = b"ton-proof-item-v2/"
CONNECT_PREFIX = b"\xff\xff" + b"ton-connect"
PAYLOAD_BYTES = 32
PURPOSES = ("user", "payout")
NETWORKS = {"mainnet": "-239", "testnet": "-3"}  # TON Connect's CHAIN ids

# ProofError codes: what a surface may put in its own words (the rest share one message)
REFUSED = "refused"
NO_STATE_INIT = "no_state_init"  # no walletStateInit, and the chain cannot stand in for it
NO_KEY = "no_key"  # the wallet's current key cannot be read from the chain
CHAIN_UNAVAILABLE = "chain_unavailable"  # TON Center did not answer: try again later


class ProofError(ValueError):
    """A ton_proof that is refused; the message says why (safe to show the user), ``code``
    says which kind of refusal it is."""

    def __init__(self, message: str, code: str = REFUSED) -> None:
        super().__init__(message)
        self.code = code


KeyReader = Callable[[str], Awaitable["bytes | None"]]
"""Reads a wallet's current key from the chain: ``get_public_key`` of the address, None when
the account has no code (not deployed); raises ``TonCenterError`` when it cannot tell."""

Trace = Callable[[str], None]


def toncenter_keys(ton: TonSettings) -> KeyReader:
    """A KeyReader over TON Center (``ton.base_url``), one short session per read: keys are
    read only for the rare proof that needs the chain."""

    async def read(address: str) -> bytes | None:
        from backend.ton.toncenter import TonCenter

        async with TonCenter.from_settings(ton) as api:
            return await api.wallet_public_key(address)

    return read


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


@dataclass(frozen=True)
class _Claims:
    """A proof with every check done that needs no key."""

    address: str
    domain: str
    timestamp: int
    payload: str
    signature: bytes
    claimed_key: str | None
    state: StateInitKey | None  # None: the wallet sent no state init

    @property
    def needs_chain(self) -> bool:
        return self.state is None or self.state.wallet.rotates


def _claims(
    account: dict[str, Any],
    proof: dict[str, Any],
    allowed_domains: list[str],
    max_age_s: int,
    network: str | None,
    now: float,
    trace: Trace,
) -> _Claims:
    try:
        address = str(account["address"])
        state_init = account.get("walletStateInit")
        if state_init is not None and not isinstance(state_init, str):
            raise TypeError("walletStateInit")
        timestamp = int(proof["timestamp"])
        domain = str(proof["domain"]["value"])
        length = int(proof["domain"].get("lengthBytes", len(domain.encode())))
        signature = base64.b64decode(str(proof["signature"]))
        payload = str(proof["payload"])
        domain.encode(), payload.encode(), address.encode()  # lone surrogates: not UTF-8
        wallet_network = str(account.get("network"))
        claimed = account.get("publicKey")
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
        raise ProofError("the proof is incomplete") from None
    if wallet_network not in NETWORKS.values():
        raise ProofError(f"the wallet's network is not a TON network ({wallet_network[:20]!r})")
    names = {chain: name for name, chain in NETWORKS.items()}
    if network is not None and wallet_network != network:
        expected = names.get(network, network)
        raise ProofError(
            f"the wallet is on another network ({names[wallet_network]}, not {expected})"
        )
    trace(f"network: {names[wallet_network]} ({wallet_network})")
    if length != len(domain.encode()):
        raise ProofError("the proof's domain length is wrong")
    if domain.lower() not in {d.lower() for d in allowed_domains}:
        raise ProofError(f"the proof is for another site ({domain})")
    trace(f"domain: {domain} is allowed ({length} bytes)")
    if timestamp < now - max_age_s or timestamp > now + 60:
        raise ProofError("the proof is too old (or from the future)")
    trace(f"time: signed {int(now) - timestamp} s before the check (at most {max_age_s} s)")
    try:
        parse_address(address)
    except AddressError:
        raise ProofError("the address is not a TON address") from None
    state = None
    if state_init:
        try:
            state = read_state_init(state_init, address, wallet_network)
        except StateInitError as error:
            raise ProofError(str(error)) from None
        trace(
            f"state init: hashes to the address; contract {state.wallet.name} "
            f"(code hash {state.code_hash.hex()[:16]}…), key {state.public_key.hex()}"
        )
    else:
        trace("state init: none sent")
    return _Claims(
        address,
        domain,
        timestamp,
        payload,
        signature,
        str(claimed) if claimed else None,
        state,
    )


def _offline_key(claims: _Claims, trace: Trace) -> tuple[bytes, str]:
    """The key when the chain need not (or cannot) be asked."""
    if claims.state is None:
        raise ProofError(
            "the wallet sent no state init (walletStateInit), and its key cannot be read "
            "from the chain here",
            NO_STATE_INIT,
        )
    if claims.state.wallet.rotates:
        raise ProofError(
            f"the {claims.state.wallet.name} can change its key once deployed: its current "
            "key must be read from the chain, and no chain is configured here",
            NO_KEY,
        )
    trace("key: the state init's (this contract never changes its key)")
    return claims.state.public_key, "its state init"


async def _chain_key(claims: _Claims, chain: KeyReader | None, trace: Trace) -> tuple[bytes, str]:
    if chain is None or not claims.needs_chain:
        return _offline_key(claims, trace)
    from backend.ton.toncenter import TonCenterError

    try:
        key = await chain(claims.address)
    except TonCenterError as error:
        if error.transient:
            raise ProofError(
                "the wallet's key could not be read from the chain right now; try again",
                CHAIN_UNAVAILABLE,
            ) from None
        raise ProofError(
            f"the wallet's key cannot be read from the chain ({error})", NO_KEY
        ) from None
    if key is not None:
        trace(f"key: {key.hex()}, read from the chain (get_public_key of the deployed wallet)")
        return key, "its key on the chain"
    if claims.state is None:
        raise ProofError(
            "the wallet sent no state init (walletStateInit) and is not deployed yet, so its "
            "key cannot be checked",
            NO_STATE_INIT,
        )
    trace("key: the state init's (the wallet is not deployed yet: its first key is its key)")
    return claims.state.public_key, "its state init"


def _finish(claims: _Claims, key: tuple[bytes, str], trace: Trace) -> VerifiedWallet:
    public_key, source = key
    if claims.claimed_key and claims.claimed_key.lower() != public_key.hex():
        raise ProofError(f"the wallet's public key does not match {source}")
    if claims.claimed_key:
        trace("publicKey: the one the wallet named")
    try:
        VerifyKey(public_key).verify(
            proof_message(claims.address, claims.domain, claims.timestamp, claims.payload),
            claims.signature,
        )
    except (BadSignatureError, ValueError):
        raise ProofError("the proof's signature is not valid") from None
    trace("signature: valid (ed25519 over the ton-connect message)")
    return VerifiedWallet(raw_address(claims.address), public_key, claims.payload)


def _no_trace(_line: str) -> None:
    pass


def verify_proof(
    account: dict[str, Any],
    proof: dict[str, Any],
    *,
    allowed_domains: list[str],
    max_age_s: int,
    network: str | None = None,
    now: float | None = None,
    trace: Trace = _no_trace,
) -> VerifiedWallet:
    """Check a TON Connect ``account`` + ``ton_proof.proof`` pair, without the payload store
    and without the chain: a proof that needs the chain (no state init, or a Telegram wallet)
    is refused here; :func:`verify_proof_on_chain` reads the key for it.

    ``account`` is ``{address, network, walletStateInit, publicKey?}`` and ``proof`` is
    ``{timestamp, domain: {lengthBytes, value}, signature, payload}`` as the wallet sends them.
    ``network``: ``"-239"`` (mainnet) or ``"-3"`` (testnet) to insist on one. ``trace`` is
    told each check that passed, in words (``cocoon ton verify-proof`` prints them).
    """
    at = time.time() if now is None else now
    claims = _claims(account, proof, allowed_domains, max_age_s, network, at, trace)
    return _finish(claims, _offline_key(claims, trace), trace)


async def verify_proof_on_chain(
    account: dict[str, Any],
    proof: dict[str, Any],
    *,
    allowed_domains: list[str],
    max_age_s: int,
    chain: KeyReader | None,
    network: str | None = None,
    now: float | None = None,
    trace: Trace = _no_trace,
) -> VerifiedWallet:
    """:func:`verify_proof`, reading the wallet's current key from the chain (``chain``) when
    the wallet sent no state init, or when its contract can change its key (a deployed
    Telegram wallet's key is the chain's, not its state init's)."""
    at = time.time() if now is None else now
    claims = _claims(account, proof, allowed_domains, max_age_s, network, at, trace)
    return _finish(claims, await _chain_key(claims, chain, trace), trace)


def proof_from_json(data: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(account, proof)`` out of what a wallet or a TON Connect client hands over:
    ``{account, proof}`` (the Mini App's request; ``account.chain`` or ``account.network``),
    a TON Connect SDK wallet (``{account, connectItems: {tonProof: {proof}}}``), or a wallet's
    connect event (``{items: [ton_addr, ton_proof]}``, also inside ``{event, payload}``)."""
    if isinstance(data, dict) and isinstance(data.get("payload"), dict):
        data = data["payload"]
    if not isinstance(data, dict):
        raise ProofError("not a TON Connect proof: expected a JSON object")
    account: Any = data.get("account")
    proof: Any = data.get("proof")
    if isinstance(data.get("items"), list):
        for item in data["items"]:
            if isinstance(item, dict) and item.get("name") == "ton_addr":
                account = item
            elif isinstance(item, dict) and item.get("name") == "ton_proof":
                proof = item.get("proof")
    connect_items = data.get("connectItems")
    if proof is None and isinstance(connect_items, dict):
        ton_proof = connect_items.get("tonProof")
        proof = ton_proof.get("proof") if isinstance(ton_proof, dict) else None
    if not isinstance(account, dict):
        raise ProofError("not a TON Connect proof: no account (ton_addr)")
    if not isinstance(proof, dict):
        raise ProofError("not a TON Connect proof: no ton_proof")
    if "network" not in account and "chain" in account:
        account = {**account, "network": account["chain"]}
    return account, proof


# ----------------------------------------------------------------- payloads and linking


async def issue_payload(db: Database, ttl_s: int, *, now: float | None = None) -> str:
    """A fresh single-use payload for ``tonProof`` (hex, 64 characters)."""
    issued = int(time.time() if now is None else now)
    payload = secrets.token_hex(PAYLOAD_BYTES)
    async with db.session() as session, session.begin():
        session.add(TonProofPayload(payload=payload, issued_at=issued, expires_at=issued + ttl_s))
    return payload


def _payload_open(payload: str, now: int) -> Any:
    return (
        TonProofPayload.payload == payload,
        TonProofPayload.used_at.is_(None),
        TonProofPayload.expires_at >= now,
    )


async def _check_payload(db: Database, payload: str, now: int) -> None:
    """Refuse a payload that could not be spent, before asking the chain for anything."""
    async with db.session() as session:
        found = await session.scalar(select(TonProofPayload).where(*_payload_open(payload, now)))
    if found is None:
        raise ProofError("the proof's payload is unknown, expired or already used")


async def _consume_payload(db: Database, payload: str, now: int) -> None:
    async with db.session() as session, session.begin():
        used = await session.execute(
            update(TonProofPayload)
            .where(*_payload_open(payload, now))
            .values(used_at=now)
            .execution_options(synchronize_session=False)
        )
        if rowcount(used) != 1:
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
    chain: KeyReader | None = None,
) -> TonWallet:
    """Verify a proof, spend its payload, and link the wallet to the user for ``purpose``
    (``user``: the Mini App's wallet; ``payout``: where a provider is paid). Replaces an
    earlier wallet of the same purpose. ``chain`` reads a wallet's key from the chain when
    the proof needs it (see :func:`verify_proof_on_chain`); it is asked only for a proof
    whose payload could still be spent."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}")
    at = time.time() if now is None else now
    claims = _claims(account, proof, allowed_domains, max_age_s, network, at, _no_trace)
    if chain is not None and claims.needs_chain:
        await _check_payload(db, claims.payload, int(at))
    verified = _finish(claims, await _chain_key(claims, chain, _no_trace), _no_trace)
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
