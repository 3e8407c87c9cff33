"""Telegram Stars: the invoice (its rate travels in its payload) and the credit, once per
payment."""

from __future__ import annotations

from dataclasses import dataclass

from backend.accounts.errors import AccountError
from backend.errors import ErrorCode
from backend.ledger import Ledger, Receipt
from backend.models import AccountKind
from backend.notifications import NOTIFY_STARS, notify
from backend.settings import MAX_NANO, Settings

__all__ = ["MAX_STARS", "StarsInvoice", "credit_stars", "parse_stars_payload", "stars_invoice"]


MAX_STARS = 10_000
"""The most Stars one invoice asks for."""


@dataclass(frozen=True)
class StarsInvoice:
    """What a Stars invoice of ours says: who pays, how many Stars, at which rate."""

    user_id: int
    stars: int
    nano_per_star: int | None  # None: an invoice made before the rate was written into it

    @property
    def payload(self) -> str:
        return f"stars:{self.user_id}:{self.stars}:{self.nano_per_star}"


def stars_invoice(user_id: int, stars: int, settings: Settings) -> StarsInvoice:
    """A new invoice at today's rate: the rate travels in the payload, so the user is credited
    what the invoice said even if the operator changes the rate before they pay."""
    return StarsInvoice(user_id, stars, settings.stars_nano_per_star)


def parse_stars_payload(payload: str) -> StarsInvoice | None:
    """The invoice behind a payload (``stars:<user id>:<stars>[:<nanoTON per star>]``), or None
    when it is not one of ours."""
    parts = payload.split(":")
    if len(parts) not in (3, 4) or parts[0] != "stars":
        return None
    if not all(part.isascii() and part.isdecimal() and len(part) <= 19 for part in parts[1:]):
        return None
    user_id, stars = int(parts[1]), int(parts[2])
    rate = int(parts[3]) if len(parts) == 4 else None
    if (
        not 0 < stars <= MAX_STARS
        or user_id <= 0
        or (rate is not None and not 0 < rate <= MAX_NANO)
    ):
        return None
    return StarsInvoice(user_id, stars, rate)


async def credit_stars(
    ledger: Ledger,
    settings: Settings,
    user_id: int,
    stars: int,
    charge_id: str,
    *,
    nano_per_star: int | None = None,
) -> Receipt:
    """Credit a Telegram Stars payment at the invoice's rate (``nano_per_star``; default the
    configured rate), once per ``charge_id`` (the ``telegram_payment_charge_id``): a second
    ``successful_payment`` replays the receipt."""
    if isinstance(stars, bool) or not isinstance(stars, int) or stars <= 0:
        raise AccountError(
            ErrorCode.INVALID_AMOUNT, f"a Stars payment is a positive count, got {stars!r}"
        )
    if not charge_id or len(charge_id) > 150:
        raise AccountError(ErrorCode.INVALID_AMOUNT, "a Stars payment needs its charge id")
    rate = settings.stars_nano_per_star if nano_per_star is None else nano_per_star
    if not 0 < rate <= MAX_NANO or stars * rate > MAX_NANO:
        raise AccountError(ErrorCode.INVALID_AMOUNT, "a Stars payment out of range")
    amount = stars * rate
    receipt = await ledger.credit_deposit(
        user_id,
        amount,
        f"stars:{charge_id}",
        source=AccountKind.STARS_IN,
        reason=f"{stars} Telegram Stars",
    )
    # Replayed too (once per key): a credit whose notice failed after it still gets one.
    await notify(
        ledger.db,
        user_id,
        NOTIFY_STARS,
        f"stars:{charge_id}",
        amount=amount,
        data={"stars": stars},
    )
    return receipt
