"""Attestation on the hosts providers really have: quote v5 (TDX 1.5) reports, many machines of
one platform verified through one collateral cache, and refusals that name their cause.

Real quotes from other machines and their real Intel collateral (``fixtures/tdx/README.md``), each
verified at a time inside its collateral's window, through a recorded PCCS on loopback
(tests/support/tdx_hosts.py). Onboarding with these quotes, and the backend's own faults, are in
tests/test_attest_hosts_onboarding.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import dcap_qvl
import pytest

from backend.attestation.collateral import CollateralSource, load_collateral, platform_collateral
from backend.attestation.tdx import verify_quote
from backend.settings import Settings
from tests.support.attest import FIXTURES, MODELS
from tests.support.tdx_hosts import (
    AT_90C06F,
    AT_B0C06F,
    COLLATERAL_90C06F,
    COLLATERAL_B0C06F,
    HOST_A,
    HOST_B,
    IMAGES,
    ISSUED_90C06F,
    TD15,
    TD15EX,
    ZERO,
    RecordedPccs,
    allow,
    image,
)

REPO = Path(__file__).resolve().parent.parent


def leaf_pem(raw_quote: bytes) -> str:
    chain = dcap_qvl.parse_quote(raw_quote).cert_chain_pem_bytes().decode()
    return chain.split("-----END CERTIFICATE-----")[0].split("-----BEGIN CERTIFICATE-----")[1]


# -- quote v5 (TDX 1.5) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "collateral", "at", "name", "report_type", "svn2"),
    [
        (TD15, COLLATERAL_90C06F, AT_90C06F, "td15", "TD15", "0d010400000000000000000000000000"),
        (TD15EX, COLLATERAL_B0C06F, AT_B0C06F, "td15ex", "TD15Ex", "0f0104" + "0" * 26),
    ],
)
def test_v5_quotes_are_accepted_under_their_allow_listed_image(
    raw: bytes, collateral: str, at: int, name: str, report_type: str, svn2: str
) -> None:
    verdict = verify_quote(raw, platform_collateral(load_collateral(collateral)), at, allow(name))
    assert verdict.accepted, verdict.reasons
    assert verdict.status == "UpToDate" and verdict.image == f"{name} 1"
    assert verdict.quote_version == 5 and verdict.report_type == report_type
    assert verdict.measurements == IMAGES[name]
    assert verdict.mr_service_td == ZERO and verdict.tee_tcb_svn2 == svn2
    # Only its own image: another platform's allow-listed image does not admit it.
    other = verify_quote(raw, load_collateral(collateral), at, allow("host-a"))
    assert not other.accepted and other.status == "UpToDate"
    assert other.reasons[0].startswith("mr_td ")


def test_a_td10_quote_shows_no_td15_fields() -> None:
    verdict = verify_quote(HOST_A, load_collateral(COLLATERAL_90C06F), AT_90C06F, allow())
    assert verdict.accepted and verdict.image == "host-a 1"
    assert (verdict.report_type, verdict.quote_version) == ("TD10", 4)
    assert verdict.mr_service_td is None and verdict.tee_tcb_svn2 is None


def run_cli(*args: str) -> tuple[int, dict[str, Any] | None, str]:
    done = subprocess.run(
        [sys.executable, "-m", "backend.cli", "attest", "verify", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    out = json.loads(done.stdout) if done.stdout.strip() else None
    return done.returncode, out, done.stderr


@pytest.mark.slow
def test_cli_shows_a_v5_quotes_td15_fields(tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps({"images": [image("td15ex")], "models": MODELS}))
    code, out, err = run_cli(
        "--quote", str(FIXTURES / "quote_v5_td15ex_b0c06f"),
        "--collateral", str(FIXTURES / "quote_v5_td15ex_b0c06f_collateral.json"),
        "--at", str(AT_B0C06F), "--policy", str(policy_file),
    )  # fmt: skip
    assert code == 0, (out, err)
    assert out is not None and out["accepted"] is True and out["image"] == "td15ex 1"
    assert out["report_type"] == "TD15Ex" and out["quote_version"] == 5
    assert out["fmspc"] == "B0C06F000000"
    assert out["mr_td"] == IMAGES["td15ex"]["mr_td"] and out["mr_service_td"] == ZERO
    assert out["tee_tcb_svn2"] == "0f010400000000000000000000000000"
    # The TD15 quote under an allow-list without its image: refused (1), with the reason.
    code, out, err = run_cli(
        "--quote", str(FIXTURES / "quote_v5_td15_90c06f"),
        "--collateral", str(FIXTURES / "collateral_90c06f_2026-02.json"),
        "--at", str(AT_90C06F), "--policy", str(policy_file),
    )  # fmt: skip
    assert code == 1 and out is not None and out["report_type"] == "TD15"
    assert out["reasons"][0].startswith("mr_td 7348651a34b2d2d3... matches no released image")


@pytest.mark.slow
def test_cli_a_bad_time_is_a_usage_error_not_a_refusal() -> None:
    code, out, err = run_cli(
        "--quote", str(FIXTURES / "quote_v5_td15_90c06f"),
        "--collateral", str(FIXTURES / "collateral_90c06f_2026-02.json"), "--at", "-1",
    )  # fmt: skip
    assert code == 2 and out is None and "--at" in err


def test_cli_a_crash_is_an_error_with_its_own_exit_code(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fault of the verifier (here dcap-qvl failing as no verdict does) is not a refusal."""
    from backend.cli import build_parser

    def crash(*_args: Any) -> Any:
        raise RuntimeError("library fault")

    monkeypatch.setattr(dcap_qvl, "verify", crash)
    args = build_parser().parse_args(
        [
            "attest", "verify", "--quote", str(FIXTURES / "quote_v5_td15_90c06f"),
            "--collateral", str(FIXTURES / "collateral_90c06f_2026-02.json"),
            "--at", str(AT_90C06F),
        ]
    )  # fmt: skip
    code = args.handler(settings, args)
    captured = capsys.readouterr()
    assert code == 70 and captured.out == ""
    assert "could not be checked (RuntimeError: library fault)" in captured.err
    assert "not a verdict" in captured.err


# -- many hosts of one platform, one collateral cache -------------------------------------------


async def test_hosts_of_one_platform_each_verify_against_their_own_chain(
    pccs: RecordedPccs, tmp_path: Path
) -> None:
    source = CollateralSource(pccs.url, tmp_path, clock=lambda: AT_90C06F)
    policy = allow()
    for name, raw in [("host-a", HOST_A), ("host-b", HOST_B), ("host-a", HOST_A), ("td15", TD15)]:
        verdict = verify_quote(raw, await source.get(raw), AT_90C06F, policy)
        assert verdict.accepted, (name, verdict.reasons)
        assert verdict.image == f"{name} 1"
    # Fetched once, through the routes of Intel's API, then served from the cache.
    assert sorted(pccs.requests) == [
        "/sgx/certification/v4/pckcrl?ca=platform&encoding=der",
        "/sgx/certification/v4/rootcacrl",
        "/tdx/certification/v4/qe/identity?update=standard",
        "/tdx/certification/v4/tcb?fmspc=90C06F000000&update=standard",
    ]
    # The cache on disk holds the platform's collateral, no machine's certificate.
    cached = (tmp_path / "platform-90c06f000000.json").read_text()
    assert "tcb_info" in cached
    assert leaf_pem(HOST_A)[:200] not in cached.replace("\\n", "\n")
    # A restarted verifier while the PCCS is down: B first, from the disk cache.
    await pccs.stop()
    restarted = CollateralSource(pccs.url, tmp_path, clock=lambda: AT_90C06F)
    for raw in (HOST_B, HOST_A):
        assert verify_quote(raw, await restarted.get(raw), AT_90C06F, policy).accepted


async def test_a_cache_file_written_with_a_machines_chain_serves_the_other_hosts(
    pccs: RecordedPccs, tmp_path: Path
) -> None:
    """A cache written before chains were dropped (or by anything else) cannot pin host A's
    chain on host B."""
    with_chain = await dcap_qvl.get_collateral(pccs.url, HOST_A)  # as dcap-qvl returns it
    assert leaf_pem(HOST_A)[:200] in with_chain.to_json().replace("\\n", "\n")
    path = tmp_path / "platform-90c06f000000.json"
    path.write_text(json.dumps({"fetched_at": AT_90C06F, "collateral": with_chain.to_json()}))
    await pccs.stop()
    source = CollateralSource(pccs.url, tmp_path, clock=lambda: AT_90C06F)
    verdict = verify_quote(HOST_B, await source.get(HOST_B), AT_90C06F, allow())
    assert verdict.accepted, verdict.reasons


async def test_what_dcap_qvl_fetched_for_host_a_is_a_chain_mismatch_for_host_b(
    pccs: RecordedPccs,
) -> None:
    """The fault this cache avoids, named for what it is; and real tampering, named so."""
    fetched_for_a = await dcap_qvl.get_collateral(pccs.url, HOST_A)
    mismatch = verify_quote(HOST_B, fetched_for_a, AT_90C06F, allow())
    assert not mismatch.accepted and mismatch.collateral_fault
    assert mismatch.reasons[0].startswith(
        "certificate chain mismatch: the collateral carries the PCK certificate chain of "
        "another machine"
    )
    assert "tampered" not in mismatch.reasons[0]
    tampered = bytearray(HOST_B)
    tampered[700] ^= 0x01  # in the signed binary part
    verdict = verify_quote(bytes(tampered), platform_collateral(fetched_for_a), AT_90C06F, allow())
    assert not verdict.accepted and not verdict.collateral_fault
    assert "the quote is corrupted or tampered with" in verdict.reasons[0]


# -- refusals, each naming its cause -------------------------------------------------------------


def test_collateral_not_yet_valid_is_named() -> None:
    verdict = verify_quote(HOST_A, load_collateral(COLLATERAL_90C06F), ISSUED_90C06F - 1, allow())
    assert not verdict.accepted and verdict.collateral_fault
    assert verdict.reasons[0].startswith(
        "the collateral is not valid yet at 1771412330 (2026-02-18T10:58:50Z)"
    )
    assert verify_quote(HOST_A, load_collateral(COLLATERAL_90C06F), ISSUED_90C06F, allow()).accepted


def test_a_certificate_not_valid_yet_is_named() -> None:
    """Host A's PCK certificate (issued 2025-07-20) checked at a 2025-07-04 time."""
    old = load_collateral((FIXTURES / "tdx_quote_collateral.json").read_text())
    verdict = verify_quote(HOST_A, old, 1751624163, allow())
    assert not verdict.accepted and not verdict.collateral_fault
    assert verdict.reasons[0].startswith(
        "a certificate of the quote's PCK chain is not valid yet at 1751624163 "
        "(2025-07-04T10:16:03Z) (valid from 2025-07-20"
    )


def test_collateral_of_another_platform_is_named() -> None:
    other = platform_collateral(load_collateral(COLLATERAL_B0C06F))
    verdict = verify_quote(HOST_A, other, AT_B0C06F, allow())
    assert not verdict.accepted and verdict.collateral_fault
    assert verdict.reasons[0].startswith(
        "the collateral is for another platform (TCB info of FMSPC B0C06F000000; the quote's "
        "platform is FMSPC 90C06F000000)"
    )


def test_expired_collateral_is_named() -> None:
    verdict = verify_quote(HOST_B, load_collateral(COLLATERAL_90C06F), AT_B0C06F, allow())
    assert not verdict.accepted and verdict.collateral_fault
    assert "outside its validity window" in verdict.reasons[0]


def test_a_fault_of_the_verifier_is_raised_not_a_refusal() -> None:
    with pytest.raises(OverflowError):
        verify_quote(HOST_A, load_collateral(COLLATERAL_90C06F), -1, allow())


@pytest.mark.parametrize(
    ("field", "position", "words"),
    [
        ("tcb_info_signature", 10, "the collateral's own signature does not verify"),
        ("qe_identity_signature", 10, "the collateral's own signature does not verify"),
        ("pck_crl", -10, "the collateral's certificate revocation list"),
        ("pck_crl", 200, "the collateral's certificate revocation list"),
        ("root_ca_crl", -10, "the collateral's certificate revocation list"),
    ],
)
def test_corrupted_collateral_is_named_as_such_not_as_a_tampered_quote(
    field: str, position: int, words: str
) -> None:
    data = json.loads(COLLATERAL_90C06F)
    value: str = data[field]  # hex
    at = position % len(value)
    data[field] = value[:at] + ("1" if value[at] == "0" else "0") + value[at + 1 :]
    verdict = verify_quote(HOST_A, load_collateral(json.dumps(data)), AT_90C06F, allow())
    assert not verdict.accepted and verdict.collateral_fault
    assert verdict.reasons[0].startswith(words), verdict.reasons
    assert "tampered" not in verdict.reasons[0]
