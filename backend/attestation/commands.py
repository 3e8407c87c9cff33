"""``cocoon provider token`` (``--reusable``), ``cocoon provider revoke-token``, ``cocoon attest
verify`` and ``cocoon attest digest``: the operator's attestation commands; ``cocoon attest
report`` and ``cocoon verify-receipt``: a client's own checks
(:mod:`backend.attestation.checks`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from backend import cliutil
from backend.settings import Settings

if TYPE_CHECKING:
    from redis.asyncio import Redis as AsyncRedis

    from backend.attestation.checks import WorkerCheck
    from backend.attestation.policy import Policy
    from backend.db import Database

__all__ = ["add_commands"]


def cmd_provider_token(settings: Settings, args: argparse.Namespace) -> int:
    telegram_id = cliutil.telegram_id(args.telegram_id)
    if args.reusable:
        return _reusable_token(settings, telegram_id)

    async def run(db: Database, redis: AsyncRedis) -> str:
        from backend.attestation.store import issue_registration_token
        from backend.users import get_or_create_user

        user = await get_or_create_user(db, telegram_id)
        return await issue_registration_token(redis, user.id, settings.attestation.token_ttl_s)

    token = cliutil.with_database_and_redis(settings, run)
    print(token)
    hours = settings.attestation.token_ttl_s // 3600
    print(
        f"one-time registration token for Telegram user {telegram_id}, good for {hours} h: "
        f"cocoon worker --register-url URL --token {token} ...",
        file=sys.stderr,
    )
    return 0


def _reusable_token(settings: Settings, telegram_id: int) -> int:
    async def run(db: Database) -> tuple[str, int]:
        from backend.attestation import enrollment
        from backend.users import get_or_create_user

        user = await get_or_create_user(db, telegram_id)
        days = settings.attestation.enrollment_ttl_days
        token, record = await enrollment.issue(db, user.id, days)
        return token, record.id

    token, enrollment_id = cliutil.with_database(settings, run)
    print(token)
    print(
        f"reusable enrollment token #{enrollment_id} for Telegram user {telegram_id}, good for "
        f"{settings.attestation.enrollment_ttl_days} days, at most "
        f"{settings.attestation.enrollment_per_hour} workers an hour: cocoon worker "
        f"--register-url URL --token {token} ...; revoke it with cocoon provider revoke-token "
        f"--telegram-id {telegram_id} {enrollment_id}",
        file=sys.stderr,
    )
    return 0


def cmd_provider_revoke_token(settings: Settings, args: argparse.Namespace) -> int:
    telegram_id = cliutil.telegram_id(args.telegram_id)

    async def run(db: Database) -> bool:
        from backend.attestation import enrollment
        from backend.users import get_or_create_user

        user = await get_or_create_user(db, telegram_id)
        return await enrollment.revoke(db, user.id, args.id)

    if not cliutil.with_database(settings, run):
        print(
            f"cocoon: error: Telegram user {telegram_id} has no unrevoked enrollment token "
            f"#{args.id}",
            file=sys.stderr,
        )
        return 1
    print(f"enrollment token #{args.id} revoked; the workers it onboarded keep serving")
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


def add_commands(sub: cliutil.SubParsers, add: cliutil.Add) -> None:
    provider_sub = cliutil.add_group(
        sub, "provider", "provider onboarding", "provider onboarding commands"
    )
    token = add(
        "token",
        "print a one-time registration token for a provider's worker",
        cmd_provider_token,
        provider_sub,
    )
    cliutil.add_telegram_id(token, "the provider's id")
    token.add_argument(
        "--reusable",
        action="store_true",
        help="a reusable enrollment token instead: it onboards any number of workers (each "
        "attested) until revoked or expired",
    )
    revoke = add(
        "revoke-token",
        "revoke a provider's reusable enrollment token (its workers keep serving)",
        cmd_provider_revoke_token,
        provider_sub,
    )
    cliutil.add_telegram_id(revoke, "the provider's id")
    revoke.add_argument("id", type=int, metavar="ID", help="the token's number")

    attest_sub = cliutil.add_group(sub, "attest", "TEE attestation", "TEE attestation commands")
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
    add_client_commands(sub, attest_sub, add)


# -- a client's checks: the public report and receipts --------------------------------------------

MAX_REPORT_BYTES = 16 * 1024 * 1024


def _client_policy(settings: Settings, path: Path | None) -> Policy:
    from backend.attestation.policy import Policy, PolicyError, load_policy

    try:
        policy_file = path or settings.attestation.policy_file
        return load_policy(policy_file) if policy_file else Policy()
    except PolicyError as error:
        cliutil.fail(str(error))


def fetch_report(url: str, model: str, nonce: str, timeout_s: float = 60) -> dict[str, Any]:
    """``GET <url>/v1/attestation/report`` for ``model`` with ``nonce``; OSError when it cannot
    be had, ValueError when the answer is not a report."""
    import urllib.error
    import urllib.parse
    import urllib.request

    query = urllib.parse.urlencode({"model": model, "nonce": nonce})
    address = f"{url.rstrip('/')}/v1/attestation/report?{query}"
    if not address.startswith(("http://", "https://")):
        raise ValueError("--url must be an http(s) URL")
    try:
        with urllib.request.urlopen(address, timeout=timeout_s) as reply:
            body = reply.read(MAX_REPORT_BYTES + 1)
    except urllib.error.HTTPError as error:
        detail = error.read(4096).decode("utf-8", "replace")
        raise OSError(f"the backend answered HTTP {error.code}: {detail}") from None
    if len(body) > MAX_REPORT_BYTES:
        raise ValueError("the report is too large")
    data = json.loads(body)
    if not isinstance(data, dict):
        raise ValueError("the answer is not a report")
    return cast(dict[str, Any], data)


def _print_checks(checks: list[WorkerCheck]) -> None:
    for check in checks:
        if check.trusted:
            print(f"trusted: {check.worker_id} ({check.tee}, {check.image or 'no image'})")
            for why in check.trusted_because:
                print(f"  - {why}", file=sys.stderr)
        else:
            print(f"REFUSED: {check.worker_id}: {'; '.join(check.reasons)}")


def cmd_attest_report(settings: Settings, args: argparse.Namespace) -> int:
    """Fetch the public report with a fresh nonce and verify it here. Exit 0 when at least one
    worker is trusted, 1 when none is, 2 for bad input, 70 when it cannot be had or checked."""
    import secrets

    from backend.attestation.checks import check_report

    if not str(args.url).startswith(("http://", "https://")):
        cliutil.fail("--url must be an http(s) URL, e.g. http://127.0.0.1:8080")
    policy = _client_policy(settings, args.policy)
    nonce = secrets.token_hex(32)
    try:
        report = fetch_report(args.url, args.model, nonce)
    except (OSError, ValueError) as error:
        print(f"cocoon: error: no report from {args.url}: {error}", file=sys.stderr)
        return EXIT_ERROR
    if report.get("nonce") != nonce:
        print("cocoon: error: the report answers another nonce (replayed)", file=sys.stderr)
        return EXIT_REFUSED
    allow_dev = args.allow_dev or settings.attestation.allow_dev
    checks = asyncio.run(
        check_report(
            report, model=args.model, nonce=nonce, policy=policy, allow_dev=allow_dev, now=args.at
        )
    )
    if args.save is not None:
        args.save.write_text(json.dumps(report))
    _print_checks(checks)
    print(json.dumps({"model": args.model, "workers": [c.to_json() for c in checks]}, indent=2))
    if not checks:
        print(f"cocoon: no worker of {args.model} answered", file=sys.stderr)
    return 0 if any(c.trusted for c in checks) else EXIT_REFUSED


def cmd_verify_receipt(settings: Settings, args: argparse.Namespace) -> int:
    """Check a receipt offline against a saved report. Exit 0 accepted, 1 refused, 2 bad input."""
    from backend.attestation.checks import check_receipt, check_report

    try:
        document = json.loads(Path(args.file).read_text())
        report = json.loads(Path(args.report).read_text())
        reply = Path(args.reply).read_text() if args.reply else None
    except OSError as error:
        cliutil.fail(f"cannot read {error.filename}: {error.strerror}")
    except ValueError as error:
        cliutil.fail(f"not JSON: {error}")
    if not isinstance(document, dict) or not isinstance(report, dict):
        cliutil.fail("the receipt and the report must be JSON objects")
    receipt: Any = document
    turn_id = args.turn_id
    if isinstance(document.get("cocoon"), dict):  # a whole chat completion
        receipt = document["cocoon"].get("receipt")
        turn_id = turn_id or str(document.get("id", "")).removeprefix("chatcmpl-") or None
        if reply is None:
            choices = document.get("choices") or [{}]
            content = (choices[0].get("message") or {}).get("content")
            reply = content if isinstance(content, str) else None
    at = args.at if args.at is not None else report.get("generated_at")
    checks = asyncio.run(
        check_report(
            report,
            model=str(report.get("model")),
            nonce=str(report.get("nonce")),
            policy=_client_policy(settings, args.policy),
            allow_dev=args.allow_dev or settings.attestation.allow_dev,
            now=float(at) if isinstance(at, int | float) else None,
        )
    )
    reasons, signed = check_receipt(
        receipt, checks, job_id=args.job_id, turn_id=turn_id, reply=reply
    )
    verdict: dict[str, Any] = {"accepted": not reasons, "reasons": reasons}
    if signed is not None:
        verdict["receipt"] = signed.receipt.model_dump()
        verdict["reply_checked"] = reply is not None
    print(json.dumps(verdict, indent=2))
    return 0 if not reasons else EXIT_REFUSED


def add_client_commands(
    sub: cliutil.SubParsers,
    attest_sub: cliutil.SubParsers,
    add: cliutil.Add,
) -> None:
    report = add(
        "report",
        "fetch a backend's public attestation report with a fresh nonce and verify it here "
        f"(exit 0: a worker is trusted, {EXIT_REFUSED}: none, {EXIT_ERROR}: no report)",
        cmd_attest_report,
        attest_sub,
    )
    report.add_argument("--url", required=True, help="the backend, e.g. http://127.0.0.1:8080")
    report.add_argument("--model", required=True, metavar="M", help="the model")
    _check_options(report)
    report.add_argument("--save", type=Path, metavar="FILE", help="keep the report (JSON)")
    receipt = add(
        "verify-receipt",
        "check a receipt (or a whole chat completion) offline against a saved report",
        cmd_verify_receipt,
        sub,
    )
    receipt.add_argument("file", metavar="FILE", help="the receipt or completion (JSON)")
    receipt.add_argument("--report", required=True, metavar="FILE", help="attest report --save")
    receipt.add_argument("--job-id", metavar="ID", help="the job the receipt must be of")
    receipt.add_argument("--turn-id", metavar="ID", help="the turn (completion) it must be of")
    receipt.add_argument("--reply", metavar="FILE", help="the reply text it must cover")
    _check_options(receipt)


def _check_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--policy", type=Path, metavar="FILE", help="your allow-list (default: the setting's)"
    )
    parser.add_argument(
        "--allow-dev", action="store_true", help="trust development-TEE evidence (proves nothing)"
    )
    parser.add_argument(
        "--at", type=float, metavar="UNIX_TIME", help="judge evidence and collateral as of"
    )
