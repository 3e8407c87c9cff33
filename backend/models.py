"""SQL tables. Money columns are 64-bit integers of nanoTON; no floats anywhere.

Every schema change goes through an Alembic migration in ``backend/migrations/versions``.
"""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A moment in time: ``TIMESTAMP WITH TIME ZONE`` on PostgreSQL, text on SQLite, read back
    as an aware UTC datetime on both (SQLite keeps no offset, so a value is converted to UTC
    before it is written). A naive datetime is refused: its zone is a guess."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"a naive datetime ({value.isoformat()}) has no zone: pass it aware")
        return value.astimezone(dt.UTC)

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:  # SQLite: written in UTC above
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


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
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=_now)


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
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=_now)

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
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=_now)
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
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=_now)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=_now, onupdate=_now)


class ApiKey(Base):
    """A bearer key for the OpenAI-compatible API. Only its SHA-256 is stored."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # shown in lists: "cc-AbCd…"
    name: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=_now)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


# --- TON payments ---
# Tables of backend/ton/ (issue 6): the deposit watcher's cursor and the deposits it saw, the
# bot's notification outbox, the hot wallet's signed payout messages, ton_proof payloads and
# linked wallets. Addresses are raw ("0:<64 hex>"), hashes hex, times of the chain unix seconds.


class TonCursor(Base):
    """How far the deposit watcher has read one account: every transaction up to ``last_lt``."""

    __tablename__ = "ton_cursors"

    account: Mapped[str] = mapped_column(String(80), primary_key=True)
    last_lt: Mapped[int] = mapped_column(BigInteger, default=0)
    last_hash: Mapped[str | None] = mapped_column(String(64))
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=_now, onupdate=_now)


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
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=_now)
    jetton_amount: Mapped[str | None] = mapped_column(String(40))
    jetton_sender: Mapped[str | None] = mapped_column(String(80))
    jetton_master: Mapped[str | None] = mapped_column(String(80))
    nano_per_unit: Mapped[int | None] = mapped_column(BigInteger)
    credited: Mapped[int | None] = mapped_column(BigInteger)


class Notification(Base):
    """The outbox of things to tell a user in the bot (``backend.notifications``): deposits and
    Stars credited, payouts settled, worker events; the bot drains it."""

    __tablename__ = "notifications"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(200), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    amount: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=_now)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    data: Mapped[str | None] = mapped_column(Text)  # JSON details (worker id, payout id, ...)


class TonPayoutStage(enum.StrEnum):
    """States a payout passes through between ``requested`` and ``confirmed``/``failed``."""

    SIGNED = "signed"  # a signed message is stored, not yet handed to the network
    SENT = "sent"  # handed to the network at least once


class TonMessageState(enum.StrEnum):
    SIGNED = "signed"
    SENT = "sent"
    LANDED = "landed"  # found on chain (its transaction decides confirmed or failed)
    EXPIRED = "expired"  # valid_until passed and the seqno shows it never landed


class TonPayoutMessage(Base):
    """One signed external message of the hot wallet for one payout.

    Stored before it is sent. At most one message per wallet is live (signed or sent) at a time,
    enforced by a partial unique index: two live signatures for one payout cannot exist.
    """

    __tablename__ = "ton_payout_messages"
    __table_args__ = (
        Index(
            "ix_ton_payout_messages_live",
            "wallet",
            unique=True,
            sqlite_where=text("state IN ('signed', 'sent')"),
            postgresql_where=text("state IN ('signed', 'sent')"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    payout_id: Mapped[int] = mapped_column(ForeignKey("payouts.id"), index=True)
    wallet: Mapped[str] = mapped_column(String(80))
    seqno: Mapped[int] = mapped_column(BigInteger)
    valid_until: Mapped[int] = mapped_column(BigInteger)
    boc: Mapped[str] = mapped_column(Text)
    msg_hash: Mapped[str] = mapped_column(String(64), unique=True)  # normalized, hex
    state: Mapped[str] = mapped_column(String(16), default=TonMessageState.SIGNED)
    send_count: Mapped[int] = mapped_column(Integer, default=0)
    tx_hash: Mapped[str | None] = mapped_column(String(64))
    tx_lt: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=_now)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    closed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class TonPayoutBatch(Base):
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
        Index(
            "ix_ton_payout_batches_live",
            "wallet",
            unique=True,
            sqlite_where=text("state IN ('signed', 'sent')"),
            postgresql_where=text("state IN ('signed', 'sent')"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    wallet: Mapped[str] = mapped_column(String(80))
    sequence: Mapped[int] = mapped_column(BigInteger)
    query_id: Mapped[int] = mapped_column(Integer)
    created_at_chain: Mapped[int] = mapped_column(BigInteger)  # the message's created_at
    timeout: Mapped[int] = mapped_column(Integer)  # valid while now < created_at + timeout
    boc: Mapped[str] = mapped_column(Text)
    msg_hash: Mapped[str] = mapped_column(String(64), unique=True)  # normalized, hex
    state: Mapped[str] = mapped_column(String(16), default=TonMessageState.SIGNED)
    send_count: Mapped[int] = mapped_column(Integer, default=0)
    tx_hash: Mapped[str | None] = mapped_column(String(64))
    tx_lt: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=_now)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    closed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


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
    linked_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=_now)


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
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=_now)


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
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=_now, onupdate=_now)


class EnrollmentToken(Base):
    """A provider's reusable enrollment token (``cce_...``): it onboards any number of workers
    for the provider, each through full attestation, until it is revoked or expires. Only its
    SHA-256 is kept, never the token."""

    __tablename__ = "enrollment_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    provider_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=_now)
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
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=_now)


class TurnReceipt(Base):
    """A turn's receipt (``backend.receipts``): the worker's signed digests and usage, what was
    billed, who served it. Digests and counts only, never text; served to its owner."""

    __tablename__ = "receipts"

    turn_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    body: Mapped[str] = mapped_column(Text)  # the receipt's JSON, as the API serves it
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=_now)
