"""Users and their money: the double-entry ledger's accounts, transactions and entries, the holds
a running turn sets aside, providers' payouts, and the OpenAI API's keys."""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from backend.models.base import Base, UTCDateTime, utcnow


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
    USDT_IN = "usdt_in"  # the outside world: USDT deposited (credited in nanoTON at a rate)
    OPERATOR = "operator"  # the outside world: manual credits by an operator

    @property
    def may_go_negative(self) -> bool:
        return self in WORLD_KINDS


WORLD_KINDS = frozenset(
    {
        AccountKind.TON_IN,
        AccountKind.TON_OUT,
        AccountKind.STARS_IN,
        AccountKind.USDT_IN,
        AccountKind.OPERATOR,
    }
)
"""Accounts standing for money outside the ledger: their balances mirror the others'."""


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    telegram_id: Mapped[int] = mapped_column(BigInteger, unique=True)
    language_code: Mapped[str | None] = mapped_column(String(16))
    # Chosen with /lang; else language_code follows the Telegram app's language.
    language_chosen: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    deposit_memo: Mapped[str] = mapped_column(String(32), unique=True)
    referrer: Mapped[str | None] = mapped_column(String(64))  # /start deep-link parameter
    model: Mapped[str | None] = mapped_column(String(100))  # chosen model; None: the default
    is_provider: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Account(Base):
    """One account; ``balance`` is kept in the same DB transaction as its entries."""

    __tablename__ = "accounts"
    __table_args__ = (
        UniqueConstraint("kind", "owner_id", name="uq_accounts_kind_owner"),
        CheckConstraint(
            "balance >= 0 OR kind IN ('ton_in', 'ton_out', 'stars_in', 'usdt_in', 'operator')",
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
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)

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
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    closed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class PayoutState(enum.StrEnum):
    REQUESTED = "requested"
    SIGNED = "signed"  # the transfer is signed and stored, not yet sent
    SENT = "sent"  # sent to the network, not yet found on chain
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
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class ApiKey(Base):
    """A bearer key for the OpenAI-compatible API. Only its SHA-256 is stored."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # shown in lists: "cc-AbCd…"
    name: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
