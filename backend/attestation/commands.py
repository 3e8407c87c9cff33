"""``cocoon provider token``, ``cocoon attest verify`` and ``cocoon attest digest``: the
operator's attestation commands."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from backend import cliutil
from backend.settings import Settings

__all__ = ["add_commands"]


def cmd_provider_token(settings: Settings, args: argparse.Namespace) -> int:
    telegram_id = cliutil.telegram_id(args.telegram_id)

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


EXIT_REFUSED = 1  # the quote was checked and is refused: the reasons say why
EXIT_ERROR = 70  # the check itself failed (a bug, a crash in dcap-qvl): no verdict (EX_SOFTWARE)
MAX_UNIX_TIME = 2**63 - 1


def cmd_attest_verify(settings: Settings, args: argparse.Namespace) -> int:
    """Exit 0 accepted, 1 refused, 2 bad input, 70 when the check itself failed."""
    try:
        return _attest_verify(settings, args)
    except Exception as error:  # not a verdict: never exit as if the quote were refused
        print(
            f"cocoon: error: the quote could not be checked ({type(error).__name__}: {error}); "
            "this is a fault of the verifier, not a verdict on the quote",
            file=sys.stderr,
        )
        return EXIT_ERROR


def _attest_verify(settings: Settings, args: argparse.Namespace) -> int:
    from backend.attestation.collateral import load_collateral
    from backend.attestation.policy import Policy, PolicyError, load_policy
    from backend.attestation.tdx import verify_quote

    try:
        raw = Path(args.quote).read_bytes()
        collateral_text = Path(args.collateral).read_text()
    except OSError as error:
        cliutil.fail(f"cannot read {error.filename}: {error.strerror}")
    except UnicodeDecodeError:
        cliutil.fail("--collateral is not text (dcap-qvl collateral JSON)")
    try:
        collateral = load_collateral(collateral_text)
    except (ValueError, RuntimeError) as error:
        cliutil.fail(f"--collateral is not dcap-qvl collateral JSON: {error}")
    try:
        policy_file = args.policy or settings.attestation.policy_file
        policy = load_policy(policy_file) if policy_file else Policy()
    except PolicyError as error:
        cliutil.fail(str(error))
    expected = None
    if args.report_data is not None:
        try:
            expected = bytes.fromhex(args.report_data)
        except ValueError:
            cliutil.fail("--report-data must be hex")
    now = int(args.at) if args.at is not None else int(time.time())
    if not 0 <= now <= MAX_UNIX_TIME:
        cliutil.fail("--at must be a Unix time in seconds, 0 or more")
    verdict = verify_quote(raw, collateral, now, policy, expected_report_data=expected)
    print(json.dumps(verdict.to_json(), indent=2))
    return 0 if verdict.accepted else EXIT_REFUSED


def cmd_attest_digest(settings: Settings, args: argparse.Namespace) -> int:
    """Print the weights digest of each PATH (a GGUF file or a model folder), as a worker
    computes it (the same code: :func:`workers.weights.weights_digest`), for the policy's
    ``models`` allow-list. Exit 0, or 1 when a path cannot be hashed."""
    from workers.weights import WeightsError, weights_digest

    failed = False
    for path in args.paths:
        try:
            print(f"{weights_digest(path)}  {path}", flush=True)
        except (WeightsError, OSError) as error:
            print(f"cocoon: error: {path}: {error}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


def add_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], add: cliutil.Add
) -> None:
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
        "verify a TDX quote (v4 or v5) with its collateral against the policy; exit 0 when "
        f"accepted, {EXIT_REFUSED} when refused, {EXIT_ERROR} when the check itself failed",
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
    digest = add(
        "digest",
        "print the weights digest of a GGUF file or a model folder, as a worker claims it (for "
        "the policy's models allow-list)",
        cmd_attest_digest,
        attest_sub,
    )
    digest.add_argument("paths", nargs="+", metavar="PATH", help="a GGUF file or a model folder")
