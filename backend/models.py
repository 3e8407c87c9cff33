"""SQL tables. Money columns are 64-bit integers of nanoTON; no floats anywhere.

Every schema change goes through an Alembic migration in ``backend/migrations/versions``.
"""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class AccountKind(enum.StrEnum):
    """What an account is. User-side accounts can never go below zero; world accounts can."""

    USER = "user"  # a user's spendable balance
    HOLD = "hold"  # a user's funds held for running turns
    PROVIDER = "provider"  # a provider's earnings, withdrawable
    PROVIDER_PENDING = "provider_pending"  # a provider's earnings in a payout on its way
    PLATFORM = "platform"  # the operator's fees
    TON_IN = "ton_in"  # the outside world: TON deposited
    TON_OUT = "ton_out"  # the outside world: TON paid out
    STARS_IN = "stars_in"  # the outside world: Telegram Stars paid
    OPERATOR = "operator"  # the outside world: manual credits by an operator

    @property
    def may_go_negative(self) -> bool:
        return self in WORLD_KINDS


WORLD_KINDS = frozenset(
    {AccountKind.TON_IN, AccountKind.TON_OUT, AccountKind.STARS_IN, AccountKind.OPERATOR}
)
"""Accounts standing for money outside the ledger: their balances mirror the others'."""


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    telegram_id: Mapped[int] = mapped_column(BigInteger, unique=True)
    language_code: Mapped[str | None] = mapped_column(String(16))
    deposit_memo: Mapped[str] = mapped_column(String(32), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)


class Account(Base):
    """One account; ``balance`` is kept in the same DB transaction as its entries."""

    __tablename__ = "accounts"
    __table_args__ = (
        UniqueConstraint("kind", "owner_id", name="uq_accounts_kind_owner"),
        CheckConstraint(
            "balance >= 0 OR kind IN ('ton_in', 'ton_out', 'stars_in', 'operator')",
            name="no_overdraft",
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    # The user the account belongs to, or 0 for the platform and world accounts (NULLs would
    # not be unique in the constraint above).
    owner_id: Mapped[int] = mapped_column(BigInteger, default=0)
    balance: Mapped[int] = mapped_column(BigInteger, default=0)


class Transaction(Base):
    """One movement of money: its entries sum to zero; its key makes it happen once."""

    __tablename__ = "ledger_transactions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(32))
    # A fingerprint of the request, so that a key reused for a different request is refused.
    request_hash: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)
    # The hold or payout the transaction is about, if any.
    subject_id: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)

    entries: Mapped[list[Entry]] = relationship(
        back_populates="transaction", order_by="Entry.id", lazy="selectin"
    )


class Entry(Base):
    __tablename__ = "ledger_entries"
    __table_args__ = (CheckConstraint("amount <> 0", name="nonzero"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    transaction_id: Mapped[int] = mapped_column(ForeignKey("ledger_transactions.id"), index=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    amount: Mapped[int] = mapped_column(BigInteger)

    transaction: Mapped[Transaction] = relationship(back_populates="entries")


class HoldState(enum.StrEnum):
    OPEN = "open"
    SETTLED = "settled"
    RELEASED = "released"


class Hold(Base):
    """Funds set aside for one job; closed exactly once by a settlement or a release."""

    __tablename__ = "holds"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(200), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16), default=HoldState.OPEN)
    charged: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    closed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class PayoutState(enum.StrEnum):
    REQUESTED = "requested"
    CONFIRMED = "confirmed"
    FAILED = "failed"


class Payout(Base):
    """A provider's withdrawal. The TON payments issue adds its signing and sending states."""

    __tablename__ = "payouts"
    __table_args__ = (Index("ix_payouts_state", "state"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(200), unique=True)
    provider_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    destination: Mapped[str | None] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(16), default=PayoutState.REQUESTED)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), default=_now, onupdate=_now
    )


class ApiKey(Base):
    """A bearer key for the OpenAI-compatible API. Only its SHA-256 is stored."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # shown in lists: "cc-AbCd…"
    name: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
