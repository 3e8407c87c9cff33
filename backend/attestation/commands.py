"""``cocoon provider token`` and ``cocoon attest verify``: the operator's attestation commands."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["add_commands"]


def cmd_provider_token(settings: Any, args: argparse.Namespace) -> int:
    from backend.cli import _telegram_id

    telegram_id = _telegram_id(args.telegram_id)

    async def run() -> str:
        import redis.asyncio as aioredis

        from backend.attestation.store import issue_registration_token
        from backend.db import Database
        from backend.users import get_or_create_user

        db = Database.from_settings(settings)
        client = aioredis.Redis.from_url(settings.redis_url)
        try:
            user = await get_or_create_user(db, telegram_id)
            return await issue_registration_token(client, user.id, settings.attestation.token_ttl_s)
        finally:
            await client.aclose()
            await db.close()

    token = asyncio.run(run())
    print(token)
    hours = settings.attestation.token_ttl_s // 3600
    print(
        f"one-time registration token for Telegram user {telegram_id}, good for {hours} h: "
        f"cocoon worker --register-url URL --token {token} ...",
        file=sys.stderr,
    )
    return 0


def cmd_attest_verify(settings: Any, args: argparse.Namespace) -> int:
    from backend.attestation.policy import Policy, PolicyError, load_policy
    from backend.attestation.tdx import load_collateral, verify_quote
    from backend.cli import _fail

    try:
        raw = Path(args.quote).read_bytes()
        collateral_text = Path(args.collateral).read_text()
    except OSError as error:
        _fail(f"cannot read {error.filename}: {error.strerror}")
    try:
        collateral = load_collateral(collateral_text)
    except (ValueError, RuntimeError) as error:
        _fail(f"--collateral is not dcap-qvl collateral JSON: {error}")
    try:
        policy_file = args.policy or settings.attestation.policy_file
        policy = load_policy(policy_file) if policy_file else Policy()
    except PolicyError as error:
        _fail(str(error))
    expected = None
    if args.report_data is not None:
        try:
            expected = bytes.fromhex(args.report_data)
        except ValueError:
            _fail("--report-data must be hex")
    now = int(args.at) if args.at is not None else int(time.time())
    verdict = verify_quote(raw, collateral, now, policy, expected_report_data=expected)
    print(json.dumps(verdict.to_json(), indent=2))
    return 0 if verdict.accepted else 1


def add_commands(sub: Any, add: Any) -> None:
    provider = sub.add_parser(
        "provider", help="provider onboarding", description="provider onboarding commands"
    )
    provider_sub = provider.add_subparsers(
        dest="provider_command", metavar="COMMAND", required=True
    )
    token = add(
        "token",
        "print a one-time registration token for a provider's worker",
        cmd_provider_token,
        provider_sub,
    )
    token.add_argument("--telegram-id", required=True, metavar="N", help="the provider's id")

    attest = sub.add_parser(
        "attest", help="TEE attestation", description="TEE attestation commands"
    )
    attest_sub = attest.add_subparsers(dest="attest_command", metavar="COMMAND", required=True)
    verify = add(
        "verify",
        "verify a TDX quote with its collateral against the policy; exit 0 only when accepted",
        cmd_attest_verify,
        attest_sub,
    )
    verify.add_argument("--quote", required=True, metavar="FILE", help="the raw quote")
    verify.add_argument(
        "--collateral", required=True, metavar="FILE", help="its collateral (dcap-qvl JSON)"
    )
    verify.add_argument("--at", type=int, metavar="UNIX_TIME", help="verify as of (default now)")
    verify.add_argument(
        "--policy",
        type=Path,
        metavar="FILE",
        help="allow-list and TCB policy JSON (default COCOON_ATTESTATION__POLICY_FILE)",
    )
    verify.add_argument(
        "--report-data", metavar="HEX", help="the report data the quote must carry (64 bytes)"
    )
