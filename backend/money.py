"""Amounts of Gram (GRAM), the coin of the TON network: integers of nano units inside
(1 GRAM = 10^9), exact decimals at the edges. No floats.

One grammar for an amount a person types, shared by every surface (the Mini App's page
implements the same rules in ``miniapp/static/app.js``, and a test runs both on one table):
ASCII digits, at most one decimal separator (a point; a comma too where the language writes
decimals with one), at most 9 decimals, no sign, exponent, underscore, spaces or other digits,
optionally followed by the coin's name ("GRAM", or "TON" as people still write it). A refusal
carries a stable :class:`AmountProblem`, which each surface puts in its own words.
"""

from __future__ import annotations

import re
from enum import StrEnum

from backend.settings import MAX_NANO, NANO_PER_TON

COIN = "GRAM"
MINUS = "\u2212"  # the minus sign, not a hyphen
DECIMALS = 9
MAX_TEXT = 40  # longer input is refused before it is looked at
UNITS = ("gram", "ton")  # accepted after an amount, any case
COMMA_LANGUAGES = frozenset({"ru", "fr"})  # languages that write 1,5 for one and a half


class AmountProblem(StrEnum):
    """Why a typed amount was refused: stable codes, the same on the page and the server."""

    EMPTY = "empty"
    FORMAT = "format"  # not digits with one decimal separator
    COMMA = "comma"  # a comma where the language's decimal separator is a point
    PRECISION = "precision"  # more than 9 decimals
    NOT_WHOLE = "not_whole"  # nano units must be a whole number
    NOT_POSITIVE = "not_positive"
    TOO_LARGE = "too_large"


_EXPLAINED = {
    AmountProblem.EMPTY: "is empty",
    AmountProblem.FORMAT: "must be a number like 1.5",
    AmountProblem.COMMA: "must use a point for decimals, like 1.5",
    AmountProblem.PRECISION: "has more than 9 decimals",
    AmountProblem.NOT_WHOLE: f"must be a whole number of nano units (1 {COIN} = {NANO_PER_TON})",
    AmountProblem.NOT_POSITIVE: "must be more than 0",
    AmountProblem.TOO_LARGE: "is too large",
}


class AmountError(ValueError):
    """An amount a person typed that is not one we can take; ``problem`` says why."""

    def __init__(self, problem: AmountProblem, what: str = "amount") -> None:
        super().__init__(f"{what} {_EXPLAINED[problem]}")
        self.problem = problem


_AMOUNT = re.compile(r"([0-9]*)(?:([.,])([0-9]*))?")
_UNIT = re.compile(r"\s*(gram|ton)\Z", re.IGNORECASE)


def decimal_comma(language: str | None) -> bool:
    """Whether ``language`` writes decimals with a comma (so "1,5" is one and a half)."""
    return language is None or language in COMMA_LANGUAGES


def parse_amount(text: str, what: str = "amount", *, comma: bool) -> int:
    """An exact decimal amount of GRAM ("1.5", "0.000000001", "2 TON") as nano units.

    ``comma``: a comma is a decimal separator too (``decimal_comma(language)`` of the person
    typing; ``False`` where no language applies, as on the command line). Where it is not,
    "1,000" is refused (:attr:`AmountProblem.COMMA`) rather than read as one. Every caller
    says which: there is no default to forget.
    """
    if len(text) > MAX_TEXT:
        raise AmountError(AmountProblem.FORMAT, what)
    raw = _UNIT.sub("", text.strip(), count=1)
    if not raw:
        raise AmountError(AmountProblem.EMPTY, what)
    match = _AMOUNT.fullmatch(raw)
    if match is None or not (match[1] or match[3]):
        raise AmountError(AmountProblem.FORMAT, what)
    whole, separator, frac = match[1], match[2], match[3] or ""
    if separator == "," and not comma:
        raise AmountError(AmountProblem.COMMA, what)
    if len(frac) > DECIMALS:
        raise AmountError(AmountProblem.PRECISION, what)
    nano = int(whole or "0") * NANO_PER_TON + int(frac.ljust(DECIMALS, "0"))
    if nano <= 0:
        raise AmountError(AmountProblem.NOT_POSITIVE, what)
    if nano > MAX_NANO:
        raise AmountError(AmountProblem.TOO_LARGE, what)
    return nano


def parse_nano(text: str, what: str = "amount") -> int:
    """A positive whole number of nano units, in ASCII digits (the operator's command line)."""
    raw = text.strip()
    if not raw:
        raise AmountError(AmountProblem.EMPTY, what)
    if len(raw) > MAX_TEXT or not raw.isascii() or not raw.isdigit():
        raise AmountError(AmountProblem.NOT_WHOLE, what)
    value = int(raw)
    if value <= 0:
        raise AmountError(AmountProblem.NOT_POSITIVE, what)
    if value > MAX_NANO:
        raise AmountError(AmountProblem.TOO_LARGE, what)
    return value


def format_amount(nano: int) -> str:
    """``1500000000`` → ``"1.5"``, ``-1`` → ``"−0.000000001"``: exact, trailing zeros trimmed."""
    sign = MINUS if nano < 0 else ""
    whole, frac = divmod(abs(nano), NANO_PER_TON)
    return sign + f"{whole}.{frac:09d}".rstrip("0").rstrip(".")


def format_gram(nano: int) -> str:
    """``1500000000`` → ``"1.5 GRAM"``; exact, no rounding."""
    return f"{format_amount(nano)} {COIN}"
