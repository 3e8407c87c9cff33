"""The ``cocoon`` command. Every subcommand has ``--help``; heavy imports happen inside commands."""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from backend import cliutil
from backend.settings import Settings, load_settings

if TYPE_CHECKING:
    from backend.db import Database
    from backend.dispatch import Dispatcher, TurnDone

# ---------------------------------------------------------------- commands


def cmd_db_upgrade(settings: Settings, _args: argparse.Namespace) -> int:
    from backend.db import upgrade_database
    from backend.logs import redact_url

    upgrade_database(settings.db_url)
    print(f"database is up to date: {redact_url(settings.db_url)}")
    return 0


def cmd_db_backup(settings: Settings, args: argparse.Namespace) -> int:
    from backend.backup import BackupError, backup
    from backend.logs import redact_url

    try:
        backup(settings.db_url, args.file)
    except BackupError as error:
        cliutil.fail(str(error), 1)
    print(f"backed up {redact_url(settings.db_url)} to {args.file}")
    return 0


def cmd_db_restore(settings: Settings, args: argparse.Namespace) -> int:
    from backend.backup import BackupError, restore
    from backend.invariants import check_invariants
    from backend.logs import redact_url

    try:
        restore(settings.db_url, args.file, clean=args.clean)
    except BackupError as error:
        cliutil.fail(str(error), 1)

    async def audit(db: Database) -> str | None:
        # Holds open at backup time are the sweeper's to release: not a violation here.
        report = await check_invariants(db, settled=False)
        return None if report.ok else str(report)

    problem = cliutil.with_database(settings, audit)
    if problem is not None:
        cliutil.fail(f"restored, but the ledger's invariants do not hold: {problem}", 1)
    print(f"restored {args.file} into {redact_url(settings.db_url)}; the ledger audit is clean")
    return 0


def cmd_ledger_credit(settings: Settings, args: argparse.Namespace) -> int:
    from backend.money import format_gram

    telegram_id = cliutil.telegram_id(args.telegram_id)
    amount = cliutil.nano(args.amount)
    reason = args.reason.strip()
    if not reason:
        cliutil.fail("--reason must say why the credit is made")
    key = args.key or f"manual:{uuid.uuid4()}"

    async def run(db: Database) -> int:
        from backend.ledger import Ledger, LedgerError
        from backend.models import AccountKind
        from backend.users import get_or_create_user

        user = await get_or_create_user(db, telegram_id)
        ledger = Ledger(db, min_withdrawal=settings.min_withdrawal_nano)
        try:
            receipt = await ledger.credit_deposit(
                user.id, amount, key, source=AccountKind.OPERATOR, reason=reason
            )
        except LedgerError as error:
            cliutil.fail(str(error))
        balances = await ledger.balances(user.id)
        note = " (already applied earlier: nothing changed)" if receipt.replayed else ""
        print(
            f"credited {amount} nanoTON ({format_gram(amount)}) to Telegram user {telegram_id}"
            f"{note}; transaction {receipt.transaction_id}, key {key}"
        )
        print(f"available: {balances.available} nanoTON ({format_gram(balances.available)})")
        return 0

    return cliutil.with_database(settings, run)


def cmd_ledger_balance(settings: Settings, args: argparse.Namespace) -> int:
    from backend.money import format_gram

    telegram_id = cliutil.telegram_id(args.telegram_id)

    async def run(db: Database) -> int:
        from backend.ledger import Ledger
        from backend.users import get_user

        user = await get_user(db, telegram_id)
        if user is None:
            cliutil.fail(f"no user with Telegram id {telegram_id}", code=1)
        balances = await Ledger(db).balances(user.id)
        print(f"Telegram user {telegram_id}, deposit memo {user.deposit_memo}")
        for label, value in (
            ("available", balances.available),
            ("held", balances.held),
            ("earned", balances.earned),
            ("pending payout", balances.pending_payout),
        ):
            print(f"{label:>15}: {value} nanoTON ({format_gram(value)})")
        return 0

    return cliutil.with_database(settings, run)


def cmd_web(settings: Settings, args: argparse.Namespace) -> int:
    import logging

    from backend.db import upgrade_database
    from backend.logs import redact_url
    from backend.web import run_web

    if args.upgrade:  # said as a log line: one JSON object per line with COCOON_LOG_JSON
        upgrade_database(settings.db_url)
        logging.getLogger("cocoon.web").info(
            "database is up to date: %s", redact_url(settings.db_url)
        )
    return run_web(settings, host=args.host, port=args.port)


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    from backend.stack import run_stack

    return run_stack(settings, host=args.host, port=args.port)


def cmd_chat(settings: Settings, args: argparse.Namespace) -> int:
    question = (args.question or "").strip() or (
        sys.stdin.read().strip() if not sys.stdin.isatty() else ""
    )
    if not question:
        cliutil.fail('say what to ask: cocoon chat "What is TON?"')
    if args.sealed:  # sealed here, to a worker verified here (backend.client)
        from backend.client.chat import run_sealed_chat

        return run_sealed_chat(settings, args, question)
    telegram_id = (
        cliutil.telegram_id(args.telegram_id) if args.telegram_id else settings.local_telegram_id
    )
    model = args.model or settings.default_model()

    async def run(db: Database) -> int:
        from backend.dispatch import Dispatcher, TurnDone, TurnError, TurnRequest, TurnText
        from backend.ledger import Ledger
        from backend.users import get_or_create_user
        from workers.wire import ChatMessage

        ledger = Ledger(db, min_withdrawal=settings.min_withdrawal_nano)
        dispatcher = Dispatcher.from_settings(settings, ledger)
        try:
            user = await get_or_create_user(db, telegram_id)
            request = TurnRequest(
                user_id=user.id,
                model=model,
                messages=[ChatMessage(role="user", content=question)],
                max_tokens=args.max_tokens,
            )
            try:
                turn = await dispatcher.start_turn(request)
                async for event in turn.events():
                    if isinstance(event, TurnText):
                        print(event.text, end="", flush=True)
                    elif isinstance(event, TurnDone):
                        print()
                        print(await _served_by(dispatcher, event), file=sys.stderr)
            except TurnError as error:
                print(file=sys.stderr)
                cliutil.fail(f"{error} ({error.code})", code=1)
        finally:
            await dispatcher.close()
        return 0

    return cliutil.with_database(settings, run)


async def _served_by(dispatcher: Dispatcher, done: TurnDone) -> str:
    """The chat footer: what the turn cost, and who served it as the backend's attestation
    record says (engine, image, TEE), never as the worker's own registry entry does."""
    from redis import exceptions as redis_errors

    from backend.money import format_gram
    from workers import registry

    worker = done.worker
    try:
        record = await registry.read_attestation(dispatcher.redis, worker.worker_id)
    except (redis_errors.RedisError, ValueError):
        record = None
    tee = "development TEE" if worker.tee == "dev" else worker.tee
    engine = f"{record.engine} {record.engine_version}" if record else "engine unknown"
    if record is not None and record.image:
        tee = f"{tee} {record.image}"
    off = ""
    if record is not None and record.off_machine:
        off = " (sends prompts OFF the machine: development only)"
    return (
        f"[{done.model} · {done.prompt_tokens}+{done.completion_tokens} tokens · "
        f"{format_gram(done.cost)} · {tee}, {engine}{off}, worker key {worker.key_fingerprint}, "
        "signed usage verified]"
    )


def cmd_apikey_create(settings: Settings, args: argparse.Namespace) -> int:
    telegram_id = cliutil.telegram_id(args.telegram_id)

    async def run(db: Database) -> int:
        from backend.apikeys import create_key
        from backend.users import get_or_create_user

        user = await get_or_create_user(db, telegram_id)
        key, _row = await create_key(db, user.id, name=args.name)
        print(key)
        return 0

    return cliutil.with_database(settings, run)


def cmd_bot(settings: Settings, _args: argparse.Namespace) -> int:
    if settings.bot_token is None:
        cliutil.fail("set COCOON_BOT_TOKEN (from @BotFather) to run the bot", code=1)
    if settings.bot_mode == "webhook":
        cliutil.fail("COCOON_BOT_MODE=webhook: the bot runs inside `cocoon web`, not here", code=1)
    from bot.app import run_polling
    from workers.lifecycle import run_command

    return run_command(
        lambda shutdown: shutdown.run(run_polling(settings, shutdown)), settings.stop_grace_s
    )


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cocoon",
        description="Cocoon: private AI chat on Telegram and TON, served by attested GPU workers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(
        name: str,
        help_text: str,
        handler: Callable[[Settings, argparse.Namespace], int],
        parent: cliutil.SubParsers = sub,
    ) -> argparse.ArgumentParser:  # a cliutil.Add
        command = parent.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(handler=handler)
        return command

    up = add(
        "up", "run the whole stack with embedded defaults (upgrades the database first)", cmd_up
    )
    web = add(
        "web",
        "serve the HTTP API, the Mini App, worker onboarding, /metrics (+ bot webhook)",
        cmd_web,
    )
    for command in (up, web):
        command.add_argument("--host", help="address to listen on (setting COCOON_WEB_HOST)")
        command.add_argument("--port", type=int, help="port to listen on (COCOON_WEB_PORT)")
    web.add_argument(
        "--upgrade", action="store_true", help="upgrade the database schema before serving"
    )

    add("bot", "run the Telegram bot with long polling", cmd_bot)
    # Listed for `cocoon --help` only: main() hands `cocoon worker ...` to the worker node's own
    # parser before this one runs, so it has no handler here.
    sub.add_parser("worker", help="run a worker node serving one model (see cocoon worker --help)")
    chat = add("chat", "ask one question through the whole stack, streamed", cmd_chat)
    chat.add_argument("question", nargs="?", help="what to ask (default: standard input)")
    chat.add_argument("--model", help="model id (default: the first in COCOON_MODELS)")
    chat.add_argument("--max-tokens", type=int, help="longest answer, in tokens")
    chat.add_argument(
        "--telegram-id", metavar="N", help="act as this user (default COCOON_LOCAL_TELEGRAM_ID)"
    )
    chat.add_argument(
        "--sealed",
        action="store_true",
        help="verify the attestation report here, seal to the worker, check the receipt",
    )
    chat.add_argument("--url", help="with --sealed: the web server (default the local one)")
    chat.add_argument("--api-key", help="with --sealed: your API key (default cocoon up's)")
    chat.add_argument("--policy", type=Path, help="with --sealed: your allow-list (JSON)")
    chat.add_argument(
        "--allow-dev", action="store_true", help="with --sealed: trust development-TEE evidence"
    )

    apikey_sub = cliutil.add_group(
        sub, "apikey", "API keys of the OpenAI-compatible API", "API keys"
    )
    create = add("create", "print a new API key for a user", cmd_apikey_create, apikey_sub)
    cliutil.add_telegram_id(create)
    create.add_argument("--name", help="a label for the key")

    db_sub = cliutil.add_group(
        sub, "db", "database schema, backup and restore", "database commands"
    )
    add("upgrade", "create or upgrade the schema to the newest version", cmd_db_upgrade, db_sub)
    backup = add(
        "backup",
        "write a consistent copy of the database to FILE (pg_dump, or SQLite's backup API)",
        cmd_db_backup,
        db_sub,
    )
    backup.add_argument("file", type=Path, metavar="FILE", help="a new file")
    restore = add(
        "restore",
        "restore FILE (made by `cocoon db backup`) into the database, then audit the ledger",
        cmd_db_restore,
        db_sub,
    )
    restore.add_argument("file", type=Path, metavar="FILE", help="a backup file")
    restore.add_argument(
        "--clean",
        action="store_true",
        help="drop what the database holds first (else it must be empty)",
    )

    ledger_sub = cliutil.add_group(
        sub, "ledger", "operator commands on the ledger", "operator ledger commands"
    )
    credit = add(
        "credit",
        "credit a user by hand (e.g. to resolve an unclaimed deposit); the reason is recorded",
        cmd_ledger_credit,
        ledger_sub,
    )
    cliutil.add_telegram_id(credit)
    credit.add_argument("--amount", required=True, metavar="NANO", help="amount in nanoTON")
    credit.add_argument("--reason", required=True, metavar="TEXT", help="why (kept in the ledger)")
    credit.add_argument(
        "--key",
        metavar="KEY",
        help="idempotency key: the same key never credits twice (default: a new random key)",
    )
    balance = add("balance", "show a user's balances", cmd_ledger_balance, ledger_sub)
    cliutil.add_telegram_id(balance)

    import importlib

    for module in FEATURE_COMMANDS:
        importlib.import_module(module).add_commands(sub, add)
    return parser


# Feature command groups: each module has ``add_commands(sub, add)`` that adds its subcommands.
FEATURE_COMMANDS: tuple[str, ...] = (
    "backend.attestation.commands",
    "backend.ton.cli",
    "backend.accounts.stars_pending",
)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        # The worker node installs and runs without the operator's stack: its own parser.
        from workers.node import main as worker_main

        return worker_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except ValidationError as error:
        problems = "; ".join(
            f"COCOON_{'__'.join(str(part) for part in e['loc']).upper()}: {e['msg']}"
            for e in error.errors()
        )
        cliutil.fail(f"invalid settings: {problems} (see the README's settings table)")
    from backend.logs import setup_logging

    setup_logging(settings)  # COCOON_LOG_LEVEL, COCOON_LOG_JSON; records carry turn/job/update ids
    handler: Callable[[Settings, argparse.Namespace], int] = args.handler
    return handler(settings, args)


def entry() -> None:
    """The process entry (``cocoon``, ``python -m backend.cli``): :func:`main`, then an exit
    that a thread stuck in a blocking call cannot hold up."""
    from workers.lifecycle import exit_within

    sys.exit(exit_within(main()))


if __name__ == "__main__":
    entry()
