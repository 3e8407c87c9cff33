"""``cocoon watcher`` and ``cocoon ton ...``: the operator's TON commands (the services they
run are in :mod:`backend.ton.services`).

Heavy imports happen inside the commands. The mnemonic is read from the settings only and is
never printed, not even in errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from typing import TYPE_CHECKING

from backend import cliutil
from backend.cliutil import fail
from backend.settings import Settings

if TYPE_CHECKING:
    from backend.db import Database
    from backend.ton.wallet import HotWallet

MAX_PROOF_FILE = 100_000  # characters; a proof is a few thousand


def _hot_wallet(settings: Settings) -> HotWallet:
    """The hot wallet, or a one-line error and exit 2 when it is not set up."""
    from backend.ton.services import TonSetupError, hot_wallet

    try:
        return hot_wallet(settings)
    except TonSetupError as error:
        fail(str(error))


def _deposit_account(settings: Settings) -> str:
    """The deposit wallet's raw address, or a one-line error and exit 2."""
    from backend.ton.services import TonSetupError, deposit_account

    try:
        return deposit_account(settings)
    except TonSetupError as error:
        fail(str(error))


# ---------------------------------------------------------------- commands


def cmd_deposit_payload(settings: Settings, args: argparse.Namespace) -> int:
    from backend.money import AmountError, parse_amount

    telegram_id = cliutil.telegram_id(args.telegram_id)
    if args.ton is not None:
        try:
            amount = parse_amount(args.ton, "--ton", comma=False)  # no language: a point only
        except AmountError as error:
            fail(str(error))
    elif args.amount is not None:
        amount = cliutil.nano(args.amount, "--amount")
    else:
        fail("say how much: --amount NANO or --ton DECIMAL")
    account = _deposit_account(settings)

    async def run(db: Database) -> int:
        from backend.ton.comment import deposit_transaction
        from backend.users import get_or_create_user

        user = await get_or_create_user(db, telegram_id)
        request = deposit_transaction(
            account,
            user.deposit_memo,
            amount,
            ttl_s=settings.ton.deposit_ttl_s,
            testnet=settings.ton.is_testnet,
        )
        print(json.dumps(request, indent=2))
        return 0

    return cliutil.with_database(settings, run)


def cmd_sign_transfer(settings: Settings, args: argparse.Namespace) -> int:
    from backend.ton.wallet import WalletError

    amount = cliutil.nano(args.amount, "--amount")
    seqno = cliutil.uint32(args.seqno, "--seqno")
    valid_until = cliutil.uint32(args.valid_until, "--valid-until")
    if valid_until < time.time():
        print(
            "cocoon: warning: --valid-until is in the past: the wallet would refuse it",
            file=sys.stderr,
        )
    wallet = _hot_wallet(settings)
    try:
        signed = wallet.sign_transfer(
            args.to, amount, seqno=seqno, valid_until=valid_until, comment=args.comment
        )
    except WalletError as error:
        fail(str(error))
    print(signed.boc)
    print(
        f"from {wallet.friendly(testnet=settings.ton.is_testnet)} (wallet v4r2), "
        f"normalized hash {signed.msg_hash}; not sent",
        file=sys.stderr,
    )
    return 0


def cmd_wallet(settings: Settings, _args: argparse.Namespace) -> int:
    wallet = _hot_wallet(settings)
    print(f"hot wallet (v4r2): {wallet.friendly(testnet=settings.ton.is_testnet)}")
    print(f"raw: {wallet.raw}")
    print(f"public key: {wallet.public_key.hex()}")
    return 0


def cmd_unclaimed(settings: Settings, _args: argparse.Namespace) -> int:
    async def run(db: Database) -> int:
        from backend.money import format_gram
        from backend.ton.unclaimed import jetton_notifications, unclaimed_deposits

        rows = await unclaimed_deposits(db)
        jettons = await jetton_notifications(db)
        if not rows:
            print("no unclaimed deposits")
        for row in rows:
            if row.credited is not None:  # USDT from our own jetton wallet, nobody's memo
                print(
                    f"#{row.id} {row.jetton_amount} USDT micro-units from {row.jetton_sender} "
                    f"at {row.nano_per_unit} nanoTON each = {row.credited} nanoTON "
                    f"({format_gram(row.credited)}), lt {row.lt} tx {row.tx_hash}: {row.note}; "
                    f"comment {row.memo!r}"
                )
            else:
                print(
                    f"#{row.id} {row.amount} nanoTON ({format_gram(row.amount)}) from "
                    f"{row.source} lt {row.lt} tx {row.tx_hash}: {row.note}; comment {row.memo!r}"
                )
            print(f"    resolve: cocoon ton resolve --deposit {row.id} --telegram-id N")
        if jettons:
            print("jetton transfer notifications (recorded, not credited; not resolvable as TON):")
        for row in jettons:
            print(
                f"#{row.id} {row.jetton_amount} units of jetton {row.jetton_master or 'unknown'} "
                f"from {row.jetton_sender} through jetton wallet {row.source}, with "
                f"{row.amount} nanoTON, lt {row.lt} tx {row.tx_hash}: {row.note}; "
                f"comment {row.memo!r}"
            )
        return 0

    return cliutil.with_database(settings, run)


def cmd_resolve(settings: Settings, args: argparse.Namespace) -> int:

    telegram_id = cliutil.telegram_id(args.telegram_id)
    try:
        deposit_id = int(args.deposit)
    except ValueError:
        fail(f"--deposit must be a deposit number, got {args.deposit!r}")

    async def run(db: Database) -> int:
        from backend.ledger import Ledger, LedgerError
        from backend.money import format_gram
        from backend.ton.unclaimed import resolve_unclaimed
        from backend.users import get_or_create_user

        user = await get_or_create_user(db, telegram_id)
        try:
            deposit = await resolve_unclaimed(
                db, Ledger(db), deposit_id, user.id, by="operator (cocoon ton resolve)"
            )
        except (LookupError, LedgerError) as error:
            fail(str(error), code=1)
        print(
            f"credited deposit #{deposit_id} ({format_gram(deposit.amount)}, tx {deposit.tx_hash}) "
            f"to Telegram user {telegram_id}, key {deposit.ledger_key}"
        )
        return 0

    return cliutil.with_database(settings, run)


def _serve(settings: Settings, *, deposits: bool, payouts: bool, once: bool) -> int:
    """Run the services until SIGINT or SIGTERM (workers.lifecycle): the step under way gets
    the grace period (COCOON_STOP_GRACE_S) to finish, then is cancelled. A wallet that is not
    set up is refused here, before anything starts."""
    from backend.ton.services import run_services
    from workers.lifecycle import run_command

    if deposits:
        _deposit_account(settings)
    if payouts:
        _hot_wallet(settings)

    return run_command(
        lambda shutdown: shutdown.run(
            run_services(
                settings, deposits=deposits, payouts=payouts, once=once, stop=shutdown.stop
            )
        ),
        settings.stop_grace_s,
    )


def cmd_watcher(settings: Settings, args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    payouts = settings.ton.hot_wallet_mnemonic is not None and not args.no_payouts
    return _serve(settings, deposits=True, payouts=payouts, once=args.once)


def cmd_payouts(settings: Settings, args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return _serve(settings, deposits=False, payouts=True, once=args.once)


def cmd_localnet(settings: Settings, args: argparse.Namespace) -> int:
    from aiohttp import web

    from backend.ton.localnet import LocalTonCenter

    net = LocalTonCenter()
    if settings.ton.hot_wallet_mnemonic is not None:
        wallet = _hot_wallet(settings)
        net.add_wallet(
            wallet.raw, wallet.public_key, balance=args.balance, subwallet_id=wallet.subwallet_id
        )
    print(
        f"local TON Center on http://{args.host}:{args.port} "
        f"(set COCOON_TON__API_URL to it); POST /localnet/deposit adds a deposit",
        file=sys.stderr,
    )
    web.run_app(net.create_app(), host=args.host, port=args.port, print=None)
    return 0


def cmd_verify_proof(settings: Settings, args: argparse.Namespace) -> int:
    """Check a ton_proof the way linking does, and say which check refused it."""
    import datetime as dt
    from urllib.parse import urlsplit

    from backend.ton.comment import friendly_address
    from backend.ton.proof import (
        NETWORKS,
        REFUSED,
        ProofError,
        proof_from_json,
        toncenter_keys,
        verify_proof_on_chain,
    )

    try:
        if args.file == "-":
            text = sys.stdin.read(MAX_PROOF_FILE + 1)
        else:
            with open(args.file, encoding="utf-8") as source:
                text = source.read(MAX_PROOF_FILE + 1)
    except (OSError, UnicodeDecodeError) as error:
        fail(f"cannot read {args.file}: {error}")
    if len(text) > MAX_PROOF_FILE:
        fail(f"{args.file} is larger than a proof can be ({MAX_PROOF_FILE} characters at most)")
    try:
        account, proof = proof_from_json(json.loads(text))
    except ValueError as error:  # JSONDecodeError and ProofError
        fail(f"{args.file}: {error}")
    at = cliutil.unix_time(args.at, "--at") if args.at is not None else int(time.time())
    network = args.network or settings.ton.network
    domains = list(args.domain or settings.ton.proof_domains)
    if not domains and settings.public_url:
        domains = [host] if (host := urlsplit(settings.public_url).hostname) else []
    if not domains:
        fail("say which site the proof is for: --domain D (or set COCOON_TON__PROOF_DOMAINS)")
    when = dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    print(f"ton_proof of {str(account.get('address'))[:100]}, checked as at {at} ({when})")
    print(f"allowed: {', '.join(domains)} on {network}, at most {settings.ton.proof_ttl_s} s old")

    def checked(line: str) -> None:
        print(f"  ok  {line}")

    try:
        verified = asyncio.run(
            verify_proof_on_chain(
                account,
                proof,
                allowed_domains=domains,
                max_age_s=settings.ton.proof_ttl_s,
                network=NETWORKS[network],
                now=at,
                chain=toncenter_keys(settings.ton),
                trace=checked,
            )
        )
    except ProofError as error:
        print(f"REFUSED: {error}" + (f" [{error.code}]" if error.code != REFUSED else ""))
        return 1
    address = friendly_address(verified.address, bounceable=False, testnet=network == "testnet")
    print(f"  --  payload {verified.payload[:80]!r}: not checked here (linking spends it once)")
    print(f"ACCEPTED: the holder of key {verified.public_key.hex()} owns {address}")
    return 0


# ------------------------------------------------------------------ parser


def add_commands(sub: cliutil.SubParsers, add: cliutil.Add) -> None:
    watcher = add(
        "watcher",
        "watch the TON deposit wallet, credit deposits, and send payouts from the hot wallet",
        cmd_watcher,
    )
    watcher.add_argument("--once", action="store_true", help="catch up once, then exit")
    watcher.add_argument(
        "--no-payouts", action="store_true", help="credit deposits only (no hot wallet)"
    )

    ton_sub = cliutil.add_group(sub, "ton", "TON payments", "TON payments")

    payload = add(
        "deposit-payload",
        "print the TON Connect transaction of a top-up for a user (JSON)",
        cmd_deposit_payload,
        ton_sub,
    )
    cliutil.add_telegram_id(payload)
    amount = payload.add_mutually_exclusive_group()
    amount.add_argument("--amount", metavar="NANO", help="amount in nanoTON")
    amount.add_argument("--ton", metavar="DECIMAL", help="amount in TON, exactly (1.5)")

    sign = add(
        "sign-transfer",
        "print a transfer signed by the hot wallet as a base64 BOC, without sending it",
        cmd_sign_transfer,
        ton_sub,
    )
    sign.add_argument("--to", required=True, metavar="ADDR", help="destination address")
    sign.add_argument("--amount", required=True, metavar="NANO", help="amount in nanoTON")
    sign.add_argument("--seqno", required=True, metavar="N", help="the wallet's seqno")
    sign.add_argument("--valid-until", required=True, metavar="UNIX", help="expiry, unix time")
    sign.add_argument("--comment", metavar="TEXT", help="a text comment")

    add("wallet", "show the hot wallet's address and public key", cmd_wallet, ton_sub)
    add("unclaimed", "list deposits whose memo matched nobody", cmd_unclaimed, ton_sub)
    resolve = add("resolve", "credit an unclaimed deposit to a user (once)", cmd_resolve, ton_sub)
    resolve.add_argument("--deposit", required=True, metavar="ID", help="the deposit's number")
    cliutil.add_telegram_id(resolve)
    payouts = add("payouts", "send requested payouts from the hot wallet", cmd_payouts, ton_sub)
    payouts.add_argument("--once", action="store_true", help="do what can be done now, then exit")
    localnet = add(
        "localnet",
        "serve a local TON Center (development and tests; nothing leaves this machine)",
        cmd_localnet,
        ton_sub,
    )
    localnet.add_argument("--host", default="127.0.0.1")
    localnet.add_argument("--port", type=int, default=8081)
    localnet.add_argument(
        "--balance", type=int, default=1_000 * 10**9, help="the hot wallet's balance, nanoTON"
    )
    verify = add(
        "verify-proof",
        "check a ton_proof a user's wallet sent (JSON as TON Connect gives it) and say why "
        "it is refused",
        cmd_verify_proof,
        ton_sub,
    )
    verify.add_argument("file", metavar="FILE", help="the proof as JSON ('-': standard input)")
    verify.add_argument("--at", metavar="UNIX_TIME", help="check as at this time (default: now)")
    verify.add_argument(
        "--domain",
        action="append",
        metavar="D",
        help="a site the proof may be for (repeatable; default: the configured ones)",
    )
    verify.add_argument(
        "--network",
        choices=["mainnet", "testnet"],
        help="the network the wallet must be on (default: the configured one)",
    )
