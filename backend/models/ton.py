"""Tables of backend/ton/ (issue 6): the deposit watcher's cursor and the deposits it saw, the hot
wallet's signed payout messages and batches, ton_proof payloads and linked wallets. Addresses are
raw ("0:<64 hex>"), hashes hex, times of the chain unix seconds."""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from backend.models.base import Base, UTCDateTime, utcnow


class TonCursor(Base):
    """How far the deposit watcher has read one account: every transaction up to ``last_lt``."""

    __tablename__ = "ton_cursors"

    account: Mapped[str] = mapped_column(String(80), primary_key=True)
    last_lt: Mapped[int] = mapped_column(BigInteger, default=0)
    last_hash: Mapped[str | None] = mapped_column(String(64))
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class TonDepositStatus(enum.StrEnum):
    CREDITED = "credited"  # matched a user's memo and credited
    UNCLAIMED = "unclaimed"  # value arrived but no user's memo matched: an admin resolves it
    IGNORED = "ignored"  # bounced back, external, bounced or zero-value: nothing to credit
    JETTON = "jetton"  # a jetton transfer notification: recorded, never credited as TON


class TonDeposit(Base):
    """One transaction of the deposit wallet, recorded once (unique account, lt, hash).

    ``amount`` is the nanoTON the incoming message carried, whatever the status (an ignored
    row keeps it, and ``note`` says why it was ignored). A jetton notification also keeps the
    jetton amount (decimal digits: up to 2^120) and the sender the notification names.
    A USDT deposit (a notification from the service's own jetton wallet of the USDT master)
    keeps the master, the rate it was credited at (nanoTON per USDT micro-unit) and the
    nanoTON credited (``jetton_amount`` × ``nano_per_unit``, exactly).
    """

    __tablename__ = "ton_deposits"
    __table_args__ = (
        UniqueConstraint("account", "lt", "tx_hash", name="uq_ton_deposits_account_lt_hash"),
        Index("ix_ton_deposits_status", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account: Mapped[str] = mapped_column(String(80))
    lt: Mapped[int] = mapped_column(BigInteger)
    tx_hash: Mapped[str] = mapped_column(String(64))
    source: Mapped[str | None] = mapped_column(String(80))
    amount: Mapped[int] = mapped_column(BigInteger, default=0)
    memo: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    note: Mapped[str | None] = mapped_column(Text)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    ledger_key: Mapped[str] = mapped_column(String(200))
    utime: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    jetton_amount: Mapped[str | None] = mapped_column(String(40))
    jetton_sender: Mapped[str | None] = mapped_column(String(80))
    jetton_master: Mapped[str | None] = mapped_column(String(80))
    nano_per_unit: Mapped[int | None] = mapped_column(BigInteger)
    credited: Mapped[int | None] = mapped_column(BigInteger)


class TonPayoutStage(enum.StrEnum):
    """States a payout passes through between ``requested`` and ``confirmed``/``failed``."""

    SIGNED = "signed"  # a signed message is stored, not yet handed to the network
    SENT = "sent"  # handed to the network at least once


class TonMessageState(enum.StrEnum):
    SIGNED = "signed"
    SENT = "sent"
    LANDED = "landed"  # found on chain (its transaction decides confirmed or failed)
    EXPIRED = "expired"  # valid_until passed and the seqno shows it never landed


class SignedMessage:
    """The columns of a signed external message of a hot wallet, a payout message or a batch
    (after each table's own): its bytes and hash, where it stands, and where it landed."""

    boc: Mapped[str] = mapped_column(Text)
    msg_hash: Mapped[str] = mapped_column(String(64), unique=True)  # normalized, hex
    state: Mapped[str] = mapped_column(String(16), default=TonMessageState.SIGNED)
    send_count: Mapped[int] = mapped_column(Integer, default=0)
    tx_hash: Mapped[str | None] = mapped_column(String(64))
    tx_lt: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    closed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


def _one_live_per_wallet(table: str) -> Index:
    """The partial unique index that lets at most one of ``table``'s signed messages per wallet
    be live (signed or sent) at a time, on SQLite and PostgreSQL alike."""
    live = "state IN ('signed', 'sent')"
    return Index(
        f"ix_{table}_live",
        "wallet",
        unique=True,
        sqlite_where=text(live),
        postgresql_where=text(live),
    )


class TonPayoutMessage(SignedMessage, Base):
    """One signed external message of the hot wallet for one payout.

    Stored before it is sent. At most one message per wallet is live (signed or sent) at a time,
    enforced by a partial unique index: two live signatures for one payout cannot exist.
    """

    __tablename__ = "ton_payout_messages"
    __table_args__ = (_one_live_per_wallet(__tablename__),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    payout_id: Mapped[int] = mapped_column(ForeignKey("payouts.id"), index=True)
    wallet: Mapped[str] = mapped_column(String(80))
    seqno: Mapped[int] = mapped_column(BigInteger)
    valid_until: Mapped[int] = mapped_column(BigInteger)


class TonPayoutBatch(SignedMessage, Base):
    """One signed external message of the Highload Wallet v3 hot wallet paying up to 254
    payouts (its items), under its own query id.

    Stored with its items before it is sent. ``sequence`` numbers the wallet's batches
    (unique: a query id, derived from it, is never given twice); one batch per wallet is live
    at a time (partial unique index), so no other external message cleans the contract's
    query dictionary before a batch's fate is known.
    """

    __tablename__ = "ton_payout_batches"
    __table_args__ = (
        UniqueConstraint("wallet", "sequence", name="uq_ton_payout_batches_sequence"),
        _one_live_per_wallet(__tablename__),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    wallet: Mapped[str] = mapped_column(String(80))
    sequence: Mapped[int] = mapped_column(BigInteger)
    query_id: Mapped[int] = mapped_column(Integer)
    created_at_chain: Mapped[int] = mapped_column(BigInteger)  # the message's created_at
    timeout: Mapped[int] = mapped_column(Integer)  # valid while now < created_at + timeout


class TonPayoutBatchItem(Base):
    """A payout in a batch: where and what this batch pays it (an expired batch's payouts go
    into a later batch)."""

    __tablename__ = "ton_payout_batch_items"

    batch_id: Mapped[int] = mapped_column(ForeignKey("ton_payout_batches.id"), primary_key=True)
    payout_id: Mapped[int] = mapped_column(ForeignKey("payouts.id"), primary_key=True, index=True)
    destination: Mapped[str] = mapped_column(String(80))  # raw
    amount: Mapped[int] = mapped_column(BigInteger)


class TonProofPayload(Base):
    """A ton_proof payload the server issued: accepted once, before ``expires_at``."""

    __tablename__ = "ton_proof_payloads"

    payload: Mapped[str] = mapped_column(String(64), primary_key=True)
    issued_at: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[int] = mapped_column(BigInteger)
    used_at: Mapped[int | None] = mapped_column(BigInteger)


class TonWallet(Base):
    """A wallet a user proved they own: ``user`` (top-ups) or ``payout`` (provider payouts)."""

    __tablename__ = "ton_wallets"
    __table_args__ = (UniqueConstraint("user_id", "purpose", name="uq_ton_wallets_user_purpose"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    purpose: Mapped[str] = mapped_column(String(16))
    address: Mapped[str] = mapped_column(String(80))
    public_key: Mapped[str] = mapped_column(String(64))
    linked_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
