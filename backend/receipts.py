"""Receipts: every completion's proof, signed by the worker that served it, kept for its owner.

The worker signs a :class:`workers.receipts.Receipt` at the end of each job (job id, model,
SHA-256 of the sealed request, SHA-256 of the reply text, its usage) with its attested Ed25519
key, and puts it next to the job's last stream entry. The dispatcher checks the signature with
the key of the backend's attestation record (and, when it can read the reply, both digests:
:func:`check_digests`); the settled turn keeps a :class:`ReceiptRecord`: the signed receipt as
it came, what was billed (each count at most the backend's bound, ``backend.bounds``), the
cost, and who served it (worker id, TEE kind, its public keys). Digests and counts only: never
a prompt or a reply.

The API returns the record as ``cocoon.receipt`` (a streamed reply: the last event before
``[DONE]``), ``GET /v1/receipts/{id}`` serves it to its owner, and anyone can check it offline
against a public attestation report (``cocoon verify-receipt``,
:func:`backend.attestation.checks.check_receipt`).
"""

from __future__ import annotations

import hashlib
import logging

from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from backend.db import Database
from backend.models import TurnReceipt
from workers.receipts import SignedReceipt, parse_signed_receipt, verify_receipt_signature
from workers.wire import WireError

__all__ = [
    "BilledUsage",
    "ReceiptRecord",
    "check_digests",
    "load_receipt",
    "open_receipt",
    "store_receipt",
]

log = logging.getLogger("cocoon.receipts")

TURN_ID_CHARS = 64


class BilledUsage(BaseModel):
    """What the user paid for: the worker's counts, each at most the backend's bound."""

    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int


class ReceiptRecord(BaseModel):
    """A turn's receipt as the API serves it (``cocoon.receipt``)."""

    id: str = Field(description="the turn id: the completion is chatcmpl-<id>")
    signed: SignedReceipt
    worker_id: str
    tee: str
    verify_key: str = Field(description="the worker's attested Ed25519 key (base64)")
    box_public_key: str = Field(description="the worker's attested X25519 key (base64)")
    billed: BilledUsage
    cost_nanoton: str
    sealed: bool = Field(default=False, description="the client sealed the request itself")
    verified: bool = Field(
        default=True, description="the backend checked the signature with the attested key"
    )


def open_receipt(raw: bytes | None, verify_key_b64: str, job_id: str) -> SignedReceipt | None:
    """The worker's signed receipt of ``job_id`` from its last stream entry, when it carries
    one that the worker's key signed; None otherwise (logged: a worker without receipts is
    an old or a dishonest one)."""
    if raw is None:
        return None
    try:
        signed = parse_signed_receipt(raw)
        verify_receipt_signature(signed, verify_key_b64)
    except WireError as error:
        log.warning("job %s: refused the worker's receipt: %s", job_id, error)
        return None
    if signed.receipt.job_id != job_id:
        log.warning("job %s: the worker's receipt names another job", job_id)
        return None
    return signed


def check_digests(signed: SignedReceipt, *, request: bytes | None, reply: str | None) -> list[str]:
    """Where the receipt's digests differ from the sealed request and the reply text."""
    problems = []
    receipt = signed.receipt
    if request is not None and hashlib.sha256(request).hexdigest() != receipt.request_sha256:
        problems.append("the receipt's request digest is not the sealed request's")
    if reply is not None:
        digest = hashlib.sha256(reply.encode("utf-8", "surrogatepass")).hexdigest()
        if digest != receipt.reply_sha256:
            problems.append("the receipt's reply digest is not the reply's")
    return problems


async def store_receipt(db: Database, user_id: int, record: ReceiptRecord) -> None:
    """Keep the receipt for its owner (once per turn; a second write changes nothing)."""
    try:
        async with db.session() as session, session.begin():
            session.add(
                TurnReceipt(turn_id=record.id, user_id=user_id, body=record.model_dump_json())
            )
    except IntegrityError:
        log.info("turn %s: its receipt was kept already", record.id)


async def load_receipt(db: Database, user_id: int, receipt_id: str) -> ReceiptRecord | None:
    """The receipt of turn ``receipt_id`` (or ``chatcmpl-<id>``) if ``user_id`` owns it."""
    turn_id = receipt_id.removeprefix("chatcmpl-")
    if not turn_id or len(turn_id) > TURN_ID_CHARS:
        return None
    async with db.session() as session:
        row = await session.scalar(
            select(TurnReceipt).where(
                TurnReceipt.turn_id == turn_id, TurnReceipt.user_id == user_id
            )
        )
    return None if row is None else ReceiptRecord.model_validate_json(row.body)
