"""What a settled turn leaves behind: its usage record and its receipt. Counts, amounts and
digests only, never prompt or reply text."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from backend.models.base import Base, UTCDateTime, utcnow


class TurnRecord(Base):
    """Usage of one settled turn (``/usage``, history, provider dashboards). Written in the same
    database transaction as the turn's settlement, so it exists exactly when the charge does.
    Holds counts and amounts only: never prompt or reply text."""

    __tablename__ = "turns"
    __table_args__ = (Index("ix_turns_user_created", "user_id", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    turn_id: Mapped[str] = mapped_column(String(200), unique=True)
    # None once the user is forgotten: the record stays for the provider's statistics.
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    model: Mapped[str] = mapped_column(String(100))
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cached_prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost: Mapped[int] = mapped_column(BigInteger, default=0)
    provider_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), index=True)
    provider_earned: Mapped[int] = mapped_column(BigInteger, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(100), index=True)
    tee: Mapped[str | None] = mapped_column(String(32))
    finish_reason: Mapped[str] = mapped_column(String(32), default="stop")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class TurnReceipt(Base):
    """A turn's receipt (``backend.receipts``): the worker's signed digests and usage, what was
    billed, who served it. Digests and counts only, never text; served to its owner."""

    __tablename__ = "receipts"

    turn_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    body: Mapped[str] = mapped_column(Text)  # the receipt's JSON, as the API serves it
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
