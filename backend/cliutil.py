"""What every ``cocoon`` subcommand shares: the one-line refusal, a command group, the
parsers of the arguments several commands take (an amount of nanoTON, a Telegram id, a 32-bit
number, a unix time), and the database (and Redis) opened for one command and always closed.

The command modules (``backend.cli``, ``backend.ton.cli``, ``backend.attestation.commands``)
import this one and never each other, so no command group reaches the composition root.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, NoReturn, TypeAlias, TypeVar

if TYPE_CHECKING:
    from redis.asyncio import Redis as AsyncRedis

    from backend.db import Database
    from backend.settings import Settings

__all__ = [
    "EXIT_USAGE",
    "Add",
    "SubParsers",
    "add_group",
    "add_telegram_id",
    "fail",
    "nano",
    "telegram_id",
    "uint32",
    "unix_time",
    "with_database",
    "with_database_and_redis",
]

T = TypeVar("T")

EXIT_USAGE = 2
"""The exit status of a bad command line (argparse's own)."""

Add = Callable[..., argparse.ArgumentParser]
"""``add(name, help, handler[, parent])``: how a command group adds a subcommand
(``backend.cli.build_parser`` passes it to each group's ``add_commands``)."""

SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
"""Where subcommands are added: ``cocoon``'s own, or a group's (:func:`add_group`)."""


def add_group(sub: SubParsers, name: str, help_text: str, description: str) -> SubParsers:
    """The command group ``cocoon NAME COMMAND``: where its subcommands are added."""
    group = sub.add_parser(name, help=help_text, description=description)
    return group.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)


def add_telegram_id(
    command: argparse.ArgumentParser, help_text: str = "the user's Telegram id"
) -> None:
    """The required ``--telegram-id N`` (read with :func:`telegram_id`)."""
    command.add_argument("--telegram-id", required=True, metavar="N", help=help_text)


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


def _whole_number(text: str, what: str, bits: int, kind: str, fits: str) -> int:
    """``text`` as a whole number from 0 below ``2**bits``; else exit 2 saying ``what`` must be
    ``kind`` (not a number) or must ``fits`` (out of range)."""
    try:
        value = int(text.strip())
    except ValueError:
        fail(f"{what} must be {kind}, got {text!r}")
    if not 0 <= value < 2**bits:
        fail(f"{what} must {fits}, got {value}")
    return value


def uint32(text: str, what: str) -> int:
    """A whole number that fits 32 bits (a wallet's seqno, a ``valid_until``), or exit 2."""
    return _whole_number(text, what, 32, "a whole number", "fit 32 bits")


def unix_time(text: str, what: str) -> int:
    """A unix time in whole seconds (from 0, below 2**63), or exit 2."""
    return _whole_number(text, what, 63, "a unix time in whole seconds", "be a unix time")


def with_database(settings: Settings, work: Callable[[Database], Awaitable[T]]) -> T:
    """Run ``await work(db)`` on the database of ``settings`` and close it, whatever happens
    (a :func:`fail` inside included): one command's whole use of the database."""

    async def run() -> T:
        from backend.db import Database

        db = Database.from_settings(settings)
        try:
            return await work(db)
        finally:
            await db.close()

    return asyncio.run(run())


def with_database_and_redis(
    settings: Settings, work: Callable[[Database, AsyncRedis], Awaitable[T]]
) -> T:
    """:func:`with_database` with a Redis client of ``COCOON_REDIS_URL`` too, closed first."""

    async def with_redis(db: Database) -> T:
        from workers.redisconn import async_client

        redis = async_client(settings.redis_url)
        try:
            return await work(db, redis)
        finally:
            await redis.aclose()

    return with_database(settings, with_redis)
