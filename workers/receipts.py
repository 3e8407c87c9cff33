"""What a worker signs for clients to check: a reply's receipt, and an answer to a freshness
challenge. Both sides import this module (the node signs, the backend and clients verify), so it
stays light like :mod:`workers.wire`: stdlib, pydantic and PyNaCl only.

Both are signed with the worker's attested Ed25519 key (the ``verify_key`` its evidence binds)
over a message that starts with a domain tag of its own, so that neither can be taken for the
other, nor for the wire's signed final record (which starts with ``{``):

* a receipt: ``b"cocoon-receipt-v1\\n" + canonical JSON of the receipt`` (:func:`receipt_message`);
* a challenge answer: ``b"cocoon-challenge-v1\\n" + <worker_id> + b"\\n" + <nonce, lower hex>``
  (:func:`challenge_message`).

A :class:`Receipt` holds no text: the job id, the model, ``request_sha256`` (hex SHA-256 of the
sealed request exactly as it was enqueued: the ciphertext), ``reply_sha256`` (hex SHA-256 of the
reply's UTF-8 text, all chunks joined), and the usage the worker reports. It travels in the
clear, next to the job's last stream entry (:func:`workers.streams.append` ``receipt=``), as the
JSON of :class:`SignedReceipt`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from typing import Annotated, Literal

import nacl.exceptions
import nacl.signing
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from workers.wire import JobId, WireError, canonical_json

__all__ = [
    "CHALLENGE_TAG",
    "RECEIPT_TAG",
    "Receipt",
    "SignedReceipt",
    "challenge_message",
    "parse_signed_receipt",
    "sha256_hex",
    "sign_challenge",
    "sign_receipt",
    "verify_challenge",
    "verify_receipt_signature",
]

RECEIPT_TAG = b"cocoon-receipt-v1\n"
CHALLENGE_TAG = b"cocoon-challenge-v1\n"
MAX_RECEIPT_BYTES = 4096
NONCE_PATTERN = re.compile(r"^[0-9a-f]{32,128}$")
"""A client's nonce: 16 to 64 bytes, lower-case hex."""

Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Receipt(_Strict):
    """What the worker signs at the end of a job (no text: digests and counts)."""

    v: Literal[1] = 1
    job_id: JobId
    model: str = Field(min_length=1, max_length=200)
    request_sha256: Hex64
    reply_sha256: Hex64
    prompt_tokens: int = Field(ge=0)
    cached_prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    finish_reason: Literal["stop", "length", "cancelled"]


class SignedReceipt(_Strict):
    """A receipt and its Ed25519 signature (base64) by the worker's attested key."""

    receipt: Receipt
    signature: str = Field(min_length=1, max_length=128)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def receipt_message(receipt: Receipt) -> bytes:
    return RECEIPT_TAG + canonical_json(receipt)


def sign_receipt(receipt: Receipt, key: nacl.signing.SigningKey) -> SignedReceipt:
    signature = key.sign(receipt_message(receipt)).signature
    return SignedReceipt(receipt=receipt, signature=base64.b64encode(signature).decode("ascii"))


def parse_signed_receipt(raw: bytes | str) -> SignedReceipt:
    """A signed receipt from its JSON (not yet verified); WireError when malformed."""
    if len(raw) > MAX_RECEIPT_BYTES:
        raise WireError("receipt is too large")
    try:
        return SignedReceipt.model_validate_json(raw)
    except ValidationError:
        raise WireError("malformed receipt") from None


def verify_receipt_signature(signed: SignedReceipt, verify_key_b64: str) -> None:
    """WireError unless ``signed`` carries a valid signature by ``verify_key_b64``."""
    _verify(receipt_message(signed.receipt), signed.signature, verify_key_b64, "receipt")


def challenge_message(worker_id: str, nonce_hex: str) -> bytes:
    if not NONCE_PATTERN.match(nonce_hex):
        raise WireError("a nonce is 16 to 64 bytes in lower-case hex")
    return CHALLENGE_TAG + worker_id.encode("utf-8") + b"\n" + nonce_hex.encode("ascii")


def sign_challenge(worker_id: str, nonce_hex: str, key: nacl.signing.SigningKey) -> str:
    """The base64 signature answering a freshness challenge."""
    signature = key.sign(challenge_message(worker_id, nonce_hex)).signature
    return base64.b64encode(signature).decode("ascii")


def verify_challenge(worker_id: str, nonce_hex: str, signature: str, verify_key_b64: str) -> None:
    """WireError unless ``signature`` answers the challenge with ``verify_key_b64``."""
    _verify(challenge_message(worker_id, nonce_hex), signature, verify_key_b64, "nonce")


def _verify(message: bytes, signature_b64: str, verify_key_b64: str, what: str) -> None:
    try:
        key = nacl.signing.VerifyKey(base64.b64decode(verify_key_b64, validate=True))
        signature = base64.b64decode(signature_b64, validate=True)
        key.verify(message, signature)
    except (binascii.Error, ValueError, TypeError, nacl.exceptions.CryptoError):
        raise WireError(f"the {what} signature does not verify with the worker's key") from None
