"""Providers' workers as the database remembers them: their records, the reusable enrollment
tokens that onboard them, and the bounds they crossed."""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from backend.models.base import Base, UTCDateTime, utcnow


class WorkerState(enum.StrEnum):
    ATTESTED = "attested"
    FAILED = "failed"  # its last attestation was refused
    OFFLINE = "offline"  # stopped heartbeating
    REVOKED = "revoked"


class WorkerRecord(Base):
    """A provider's worker as the database remembers it (Redis holds the live state)."""

    __tablename__ = "workers"

    worker_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    provider_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), index=True)
    model: Mapped[str | None] = mapped_column(String(100))
    tee: Mapped[str | None] = mapped_column(String(32))
    image: Mapped[str | None] = mapped_column(String(200))
    mrtd: Mapped[str | None] = mapped_column(String(96))
    state: Mapped[str] = mapped_column(String(16), default=WorkerState.ATTESTED)
    note: Mapped[str | None] = mapped_column(Text)
    attested_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class EnrollmentToken(Base):
    """A provider's reusable enrollment token (``cce_...``): it onboards any number of workers
    for the provider, each through full attestation, until it is revoked or expires. Only its
    SHA-256 is kept, never the token."""

    __tablename__ = "enrollment_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    provider_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    onboarded: Mapped[int] = mapped_column(Integer, default=0)  # workers it onboarded


class WorkerFlag(Base):
    """A bound a worker crossed in one turn (``backend.bounds``): a count over what the turn
    allows (billed at the bound), or a reply too large, too long or too slow (cut off). One row
    per turn and kind; the operator sees them in ``/stats``. Numbers only, never text."""

    __tablename__ = "worker_flags"
    __table_args__ = (
        UniqueConstraint("turn_id", "kind", name="uq_worker_flags_turn_kind"),
        Index("ix_worker_flags_created", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    worker_id: Mapped[str] = mapped_column(String(100), index=True)
    provider_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    turn_id: Mapped[str] = mapped_column(String(200))
    model: Mapped[str] = mapped_column(String(100))
    kind: Mapped[str] = mapped_column(String(32))
    claimed: Mapped[int] = mapped_column(BigInteger)  # what the worker claimed or sent
    bound: Mapped[int] = mapped_column(BigInteger)  # the bound it crossed
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
