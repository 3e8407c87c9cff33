"""A client's checks of a TDX worker in an attestation report (``backend.attestation.checks``),
with the real quote and its recorded collateral (``tests/support/attest.py``): the quote
verifies and its measurements are judged against the *client's* policy, and a quote that was
not taken for the claims it comes with is refused."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backend.attestation.checks import ReportError, check_receipt, check_report
from tests.support import attest
from tests.support.fuzz import FUZZ, json_values
from workers.receipts import sign_challenge
from workers.wire import WorkerKeys, canonical_json, key_fingerprint

NONCE = "ab" * 32


def tdx_entry(keys: WorkerKeys) -> dict[str, object]:
    """A report's entry for a worker with the real quote (taken for other claims than these)."""
    worker_id = "w-" + key_fingerprint(keys.box_public_b64, keys.verify_key_b64)
    claims = attest.claims_for(keys, "n" * 32)
    evidence = {
        "tee": "tdx",
        "claims": claims.model_dump(mode="json"),
        "quote": base64.b64encode(attest.QUOTE).decode(),
    }
    return {
        "worker_id": worker_id,
        "tee": "tdx",
        "expires_at": attest.AT + 3600,
        "evidence": evidence,
        "claims_json": canonical_json(claims).decode(),
        "collateral": attest.COLLATERAL,
        "signature": sign_challenge(worker_id, NONCE, keys.signing_key),
    }


async def test_the_quote_is_judged_against_the_clients_own_policy() -> None:
    keys = WorkerKeys.generate()
    report = {"workers": [tdx_entry(keys)]}
    [mine] = await check_report(
        report, model=attest.MODEL, nonce=NONCE, policy=attest.policy(), now=attest.AT
    )
    # The quote verifies and its image is allowed; only its report data gives it away.
    assert mine.image == "cocoon-worker 0.1.0"
    assert mine.reasons == [attest.REPORT_DATA_REFUSAL]
    other = attest.policy(attest.image(mr_td="00" * 48))
    [theirs] = await check_report(
        report, model=attest.MODEL, nonce=NONCE, policy=other, now=attest.AT
    )
    assert theirs.image is None
    assert any("mr_td" in r and "matches no released image" in r for r in theirs.reasons)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"collateral": None}, "cannot be checked"),
        ({"claims_json": "{}"}, "claims_json"),
        ({"expires_at": attest.AT - 1}, "expired"),
        ({"signature": "AAAA"}, "stale"),
        ({"evidence": {"tee": "tdx"}}, "malformed"),
    ],
)
async def test_a_tampered_entry_is_refused(change: dict[str, object], reason: str) -> None:
    entry = {**tdx_entry(WorkerKeys.generate()), **change}
    [check] = await check_report(
        {"workers": [entry]}, model=attest.MODEL, nonce=NONCE, policy=attest.policy(), now=attest.AT
    )
    assert not check.trusted and any(reason in r for r in check.reasons), check.reasons


@FUZZ
@given(
    report=json_values() | st.fixed_dictionaries({"workers": st.lists(json_values(), max_size=3)}),
    receipt=json_values(),
)
async def test_any_report_or_receipt_gets_a_verdict_not_a_crash(report: Any, receipt: Any) -> None:
    """What a backend (or anyone in between) sends: a verdict with reasons, never an exception
    the client did not expect, and never trust."""
    try:
        checks = await check_report(report, model=attest.MODEL, nonce=NONCE, policy=attest.policy())
    except ReportError:
        checks = []
    assert not any(check.trusted for check in checks)
    reasons, _signed = check_receipt(receipt, checks)
    assert reasons
