"""The attestation record: what the backend verified about a worker, under a key only it writes.

Attestation. The node's own entry is only its claim. What the backend verified lives in a
separate key that only the backend writes, ``cocoon:attestation:<worker_id>``
(:class:`AttestationRecord`: TEE kind, the attested keys, model, provider, capacity, expiry; it
expires with the evidence). Readers merge the two: a worker whose record exists, is unexpired
(Redis clock) and carries the same keys and model is ``attested`` with the record's ``tee`` and
``provider_id``; a worker without a record is an unattested development worker (``tee="dev"``,
``attested=False``) whatever it claims; a worker whose record disagrees with its entry is not
listed at all. ``pick_worker(..., attested_only=True)`` skips unattested workers.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError
from redis.asyncio import Redis as AsyncRedis

from workers.registry.entries import (
    INDEX_KEY,
    WORKER_ID_PATTERN,
    attestation_key,
    slots_key,
    valid_worker_id,
    worker_key,
)

log = logging.getLogger(__name__)


class AttestationRecord(BaseModel):
    """What the backend verified about a worker. Written by the backend only."""

    worker_id: str = Field(pattern=WORKER_ID_PATTERN)
    tee: Literal["dev", "tdx"]
    box_public_key: str
    verify_key: str
    model: str
    provider_id: int | None = None
    attested_at: float
    expires_at: float
    image: str | None = None
    measurements: dict[str, str] = Field(default_factory=dict)
    nvidia: bool = False
    capacity: int | None = Field(
        default=None, ge=1, description="most jobs at once dispatched to it (the policy's cap)"
    )
    # What its evidence bound, checked against the policy: what users are shown.
    engine: str = Field(default="unknown", max_length=64)
    engine_version: str = Field(default="", max_length=64)
    model_sha256: str = Field(default="", description="digest of the weights it loaded (hex)")
    engine_config_sha256: str = Field(default="", description="its attested engine config")
    off_machine: bool = Field(
        default=False, description="its engine sends prompts off the machine (dev TEE only)"
    )


async def write_attestation(redis: AsyncRedis, record: AttestationRecord) -> None:
    """Record verified evidence; the key expires with it (Redis clock)."""
    await redis.set(
        attestation_key(record.worker_id),
        record.model_dump_json(),
        exat=max(1, math.ceil(record.expires_at)),
    )


async def read_attestation(redis: AsyncRedis, worker_id: str) -> AttestationRecord | None:
    if valid_worker_id(worker_id) is None:
        return None
    raw = await redis.get(attestation_key(worker_id))
    return parse_record(worker_id, raw)


async def revoke_attestation(redis: AsyncRedis, worker_id: str) -> None:
    """Take the worker out of dispatch at once: its record, its entry and its index id go."""
    pipe = redis.pipeline(transaction=True)
    pipe.delete(attestation_key(worker_id), worker_key(worker_id), slots_key(worker_id))
    pipe.zrem(INDEX_KEY, worker_id)
    await pipe.execute()


def parse_record(worker_id: str, raw: Any) -> AttestationRecord | None:
    """The record stored for ``worker_id``, or None when there is none, it is not readable, or it
    names another worker."""
    if raw is None:
        return None
    try:
        record = AttestationRecord.model_validate_json(raw)
    except ValidationError:
        log.warning("attestation record of %s is not readable; ignored", worker_id)
        return None
    return record if record.worker_id == worker_id else None
