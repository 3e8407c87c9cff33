"""Amounts of TON: integers of nanoTON inside, exact decimals at the edges. No floats."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from backend.settings import MAX_NANO, NANO_PER_TON


class AmountError(ValueError):
    """An amount a person typed that is not one we can take; the message says why."""


def parse_nano(text: str, what: str = "amount") -> int:
    """A positive whole number of nanoTON, written in digits."""
    raw = text.strip()
    if not raw.isascii() or not raw.isdigit():
        if raw.startswith("-") and raw[1:].isdigit():
            raise AmountError(f"{what} must be positive, got {text!r}")
        raise AmountError(
            f"{what} must be a whole number of nanoTON (1 TON = {NANO_PER_TON}), got {text!r}"
        )
    value = int(raw)
    if value <= 0:
        raise AmountError(f"{what} must be positive, got {text!r}")
    if value > MAX_NANO:
        raise AmountError(f"{what} is larger than the limit of {MAX_NANO} nanoTON")
    return value


def parse_ton(text: str, what: str = "amount") -> int:
    """An exact decimal amount of TON ("1.5", "0.000000001") as nanoTON."""
    raw = text.strip().replace(",", ".")
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise AmountError(f"{what} must be a number of TON like 1.5, got {text!r}") from None
    if not value.is_finite():
        raise AmountError(f"{what} must be a number of TON like 1.5, got {text!r}")
    nano = value * NANO_PER_TON
    if nano != nano.to_integral_value():
        raise AmountError(f"{what} has more than 9 decimal places: {text!r}")
    if nano <= 0:
        raise AmountError(f"{what} must be positive, got {text!r}")
    if nano > MAX_NANO:
        raise AmountError(f"{what} is larger than the limit of {MAX_NANO} nanoTON")
    return int(nano)


def format_ton(nano: int) -> str:
    """``1500000000`` → ``"1.5 TON"``; exact, no rounding."""
    sign = "-" if nano < 0 else ""
    whole, frac = divmod(abs(nano), NANO_PER_TON)
    text = f"{whole}.{frac:09d}".rstrip("0").rstrip(".")
    return f"{sign}{text} TON"
