"""The ledger's vocabulary: its errors, what a valid amount and idempotency key are, and what
its operations return (legs, receipts, balances, the audit). :class:`backend.ledger.Ledger`
moves the money; every name here is importable from :mod:`backend.ledger` too."""

from __future__ import annotations

from dataclasses import dataclass, field

from backend.models import AccountKind
from backend.settings import MAX_NANO

MAX_KEY_LENGTH = 200


class LedgerError(Exception):
    """Base of every error the ledger raises on purpose; ``str()`` is a readable sentence."""


class InvalidAmount(LedgerError, ValueError):
    pass


class InsufficientFunds(LedgerError):
    pass


class IdempotencyConflict(LedgerError):
    pass


class InvalidState(LedgerError):
    pass


class NotFound(LedgerError):
    pass


def validate_amount(amount: object, what: str = "amount") -> int:
    """Return ``amount`` if it is a positive integer that fits 64 bits, else raise InvalidAmount."""
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise InvalidAmount(
            f"{what} must be a whole number of nanoTON, got {type(amount).__name__} {amount!r}"
        )
    if amount <= 0:
        raise InvalidAmount(f"{what} must be positive, got {amount}")
    if amount > MAX_NANO:
        raise InvalidAmount(f"{what} {amount} is larger than the limit of {MAX_NANO} nanoTON")
    return amount


def validate_key(key: str) -> str:
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
        raise LedgerError(f"idempotency key must be 1..{MAX_KEY_LENGTH} characters")
    return key


@dataclass(frozen=True)
class Leg:
    kind: AccountKind
    owner_id: int
    amount: int


@dataclass(frozen=True)
class TurnUsage:
    """What a settled turn used, recorded with its settlement (counts only, never text)."""

    model: str
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    worker_id: str | None = None
    tee: str | None = None
    # The turn's receipt as its owner is served it (backend.receipts: digests and counts, JSON),
    # kept in the settlement's own transaction; None: the turn has none.
    receipt: str | None = None


@dataclass(frozen=True)
class Receipt:
    """What a ledger operation did. A replay returns the first receipt with ``replayed=True``."""

    transaction_id: int
    key: str
    kind: str
    legs: tuple[Leg, ...]
    subject_id: int | None = None  # the hold or payout the transaction is about
    replayed: bool = False

    def amount_for(self, kind: AccountKind, owner_id: int = 0) -> int:
        """The net amount this transaction moved into one account (negative: out of it)."""
        return sum(leg.amount for leg in self.legs if leg.kind == kind and leg.owner_id == owner_id)


@dataclass(frozen=True)
class Balances:
    """A user's balances. ``available`` is spendable; ``held`` is reserved for running turns."""

    available: int = 0
    held: int = 0
    earned: int = 0  # provider earnings, withdrawable
    pending_payout: int = 0


@dataclass(frozen=True)
class Audit:
    """Ledger-wide totals: all four must be zero / empty for a healthy ledger."""

    balance_sum: int
    entry_sum: int
    unbalanced_transactions: list[int] = field(default_factory=list)
    drifted_accounts: list[int] = field(default_factory=list)
    negative_accounts: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.balance_sum == 0
            and self.entry_sum == 0
            and not self.unbalanced_transactions
            and not self.drifted_accounts
            and not self.negative_accounts
        )


USER_SIDE_KINDS = (
    AccountKind.USER,
    AccountKind.HOLD,
    AccountKind.PROVIDER,
    AccountKind.PROVIDER_PENDING,
)

PLATFORM_KINDS = (
    AccountKind.PLATFORM,
    AccountKind.TON_IN,
    AccountKind.TON_OUT,
    AccountKind.STARS_IN,
    AccountKind.USDT_IN,
    AccountKind.OPERATOR,
)
