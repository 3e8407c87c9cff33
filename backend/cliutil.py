"""What every ``cocoon`` subcommand shares: the one-line refusal and the parsers of the
arguments several commands take (an amount of nanoTON, a Telegram id, a 32-bit number).

The command modules (``backend.cli``, ``backend.ton.cli``, ``backend.attestation.commands``)
import this one and never each other, so no command group reaches the composition root.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

__all__ = ["EXIT_USAGE", "Add", "fail", "nano", "telegram_id", "uint32"]

EXIT_USAGE = 2
"""The exit status of a bad command line (argparse's own)."""

Add = Callable[..., argparse.ArgumentParser]
"""``add(name, help, handler[, parent])``: how a command group adds a subcommand
(``backend.cli.build_parser`` passes it to each group's ``add_commands``)."""


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """One line on stderr, then exit: how every bad input ends."""
    print(f"cocoon: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def nano(text: str, what: str = "--amount") -> int:
    """A command-line amount of nanoTON, or a one-line error and exit 2."""
    from backend.money import AmountError, parse_nano

    try:
        return parse_nano(text, what)
    except AmountError as error:
        fail(str(error))


def telegram_id(text: str) -> int:
    """A ``--telegram-id``: a Telegram user id, or a one-line error and exit 2."""
    from backend.users import validate_telegram_id

    try:
        return validate_telegram_id(int(text.strip()))
    except ValueError:
        fail(f"--telegram-id must be a Telegram user id (a positive whole number), got {text!r}")


def uint32(text: str, what: str) -> int:
    """A whole number that fits 32 bits (a wallet's seqno, a ``valid_until``), or exit 2."""
    try:
        value = int(text.strip())
    except ValueError:
        fail(f"{what} must be a whole number, got {text!r}")
    if not 0 <= value < 2**32:
        fail(f"{what} must fit 32 bits, got {value}")
    return value
