"""Quote verification with dcap-qvl on real TDX quotes and their Intel collateral, the allow-list
policy, the collateral cache, the evidence format, and ``cocoon attest verify``."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import nacl.signing
import pytest

from backend.attestation.collateral import CollateralError, CollateralSource, load_collateral
from backend.attestation.nvidia import verify_nvidia
from backend.attestation.policy import Policy, PolicyError, load_policy
from backend.attestation.tdx import verify_quote
from backend.attestation.verifier import Verifier
from backend.settings import AttestationSettings
from tests.support.attest import AT, COLLATERAL, MEASURED, QUOTE, image, policy
from workers import evidence as ev
from workers.wire import WorkerKeys, canonical_json

FIXTURES = Path(__file__).parent / "fixtures" / "tdx"
REPO = Path(__file__).resolve().parent.parent
OUTDATED = (FIXTURES / "tdx_quote_outdated").read_bytes()
OUTDATED_COLLATERAL = (FIXTURES / "tdx_quote_outdated_collateral.json").read_text()
SIGNED_END = 1258  # bytes before this are the signed binary quote
REPORT_DATA = (
    "9a9d48e7f6799642d3d1b34e1e5e1742d4bb02dd6ddd551862c1211d35c304f9"
    "eca3efdbb481601c163cf52493d6e44aed55d51ec39b7e518fadb92c2b523f20"
)


def verify(raw: bytes = QUOTE, at: int = AT, pol: Policy | None = None, **kw):
    return verify_quote(raw, load_collateral(COLLATERAL), at, pol or policy(), **kw)


# -- the real quote -----------------------------------------------------------------------------


def test_the_real_quote_verifies_at_its_collateral_time_with_its_fields() -> None:
    verdict = verify(expected_report_data=bytes.fromhex(REPORT_DATA))
    assert verdict.accepted, verdict.reasons
    assert verdict.status == "UpToDate"
    assert verdict.measurements == MEASURED
    assert verdict.report_data == REPORT_DATA
    assert verdict.image == "cocoon-worker 0.1.0"


@pytest.mark.slow
def test_cli_verify_prints_the_report_and_exits_0_only_when_accepted(tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps({"images": [image()]}))
    base = [
        sys.executable, "-m", "backend.cli", "attest", "verify",
        "--quote", str(FIXTURES / "tdx_quote"),
        "--collateral", str(FIXTURES / "tdx_quote_collateral.json"),
        "--policy", str(policy_file),
    ]  # fmt: skip

    def run(*extra: str) -> tuple[int, dict]:
        done = subprocess.run([*base, *extra], capture_output=True, text=True, cwd=REPO)
        return done.returncode, json.loads(done.stdout)

    code, out = run("--at", str(AT), "--report-data", REPORT_DATA)
    assert code == 0, out
    assert out["status"] == "UpToDate" and out["accepted"] is True and out["reasons"] == []
    assert {k: out[k] for k in MEASURED} == MEASURED and out["report_data"] == REPORT_DATA

    code, out = run("--at", str(AT), "--report-data", "00" * 64)
    assert code == 1 and out["accepted"] is False
    assert any("report data" in reason for reason in out["reasons"])

    code, out = run()  # now: the collateral has expired
    assert code == 1 and out["accepted"] is False and out["status"] is None
    assert "validity window" in out["reasons"][0]


# -- refusals, each with a reason ---------------------------------------------------------------


@pytest.mark.parametrize("position", [*range(0, SIGNED_END, 61), SIGNED_END - 1])
def test_one_flipped_bit_in_the_signed_quote_is_refused(position: int) -> None:
    tampered = bytearray(QUOTE)
    tampered[position] ^= 0x01
    verdict = verify(bytes(tampered))
    assert not verdict.accepted
    assert verdict.reasons and verdict.reasons[0]


def test_one_flipped_bit_in_the_leaf_certificate_is_refused() -> None:
    begin = QUOTE.index(b"-----BEGIN CERTIFICATE-----", SIGNED_END) + 28
    refused = 0
    for position in range(begin + 100, begin + 900, 97):
        if not chr(QUOTE[position]).isalnum():
            continue
        tampered = bytearray(QUOTE)
        tampered[position] = ord("A") if QUOTE[position] != ord("A") else ord("B")
        verdict = verify(bytes(tampered))
        assert not verdict.accepted, position
        assert verdict.reasons
        refused += 1
    assert refused >= 5


def test_the_outdated_quote_is_refused() -> None:
    collateral = load_collateral(OUTDATED_COLLATERAL)
    verdict = verify_quote(OUTDATED, collateral, 1772000000, policy())  # inside its window
    assert not verdict.accepted
    assert "out of date" in verdict.reasons[0] or "TCB status" in verdict.reasons[0]


@pytest.mark.parametrize(
    ("at", "words"),
    [(AT - 60 * 86400, "is not valid yet at"), (AT + 60 * 86400, "outside its validity window")],
)
def test_collateral_outside_its_window_is_refused(at: int, words: str) -> None:
    verdict = verify(at=at)
    assert not verdict.accepted and verdict.status is None
    assert words in verdict.reasons[0] and verdict.collateral_fault


@pytest.mark.parametrize("name", list(MEASURED))
def test_a_measurement_not_in_the_allow_list_is_refused(name: str) -> None:
    verdict = verify(pol=policy(image(**{name: "ab" * 48})))
    assert verdict.status == "UpToDate" and not verdict.accepted
    assert verdict.reasons == [f"{name} {MEASURED[name][:16]}... matches no released image"]


def test_an_empty_allow_list_and_an_unlisted_tcb_status_are_refused() -> None:
    assert "no released worker image" in verify(pol=Policy()).reasons[0]
    verdict = verify(pol=policy(tcb=("SWHardeningNeeded",)))
    assert not verdict.accepted and "TCB status UpToDate is not accepted" in verdict.reasons[0]


def test_report_data_that_does_not_match_the_claims_is_refused() -> None:
    verdict = verify(expected_report_data=hashlib.sha512(b"other claims").digest())
    assert not verdict.accepted
    assert "does not equal SHA-512 of the claims" in verdict.reasons[0]


def test_a_bad_policy_file_says_what_is_wrong(tmp_path: Path) -> None:
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"images": [image(mr_td="xyz")]}))
    with pytest.raises(PolicyError, match="mr_td"):
        load_policy(bad)
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.json")


# -- collateral cache ---------------------------------------------------------------------------


async def test_collateral_is_fetched_once_then_served_from_memory_and_disk(tmp_path: Path) -> None:
    calls: list[str] = []

    async def fetch(url: str, raw: bytes):
        calls.append(url)
        return load_collateral(COLLATERAL)

    async def down(url: str, raw: bytes):
        raise RuntimeError("PCS unreachable")

    source = CollateralSource("https://pccs.test", tmp_path, refresh_s=3600, fetch=fetch)
    first = await source.get(QUOTE)
    await source.get(QUOTE)
    assert calls == ["https://pccs.test"]
    assert verify_quote(QUOTE, first, AT, policy()).accepted
    # A restarted verifier, with the PCS down: the disk cache keeps the network going.
    restarted = CollateralSource("https://pccs.test", tmp_path, refresh_s=3600, fetch=down)
    assert verify_quote(QUOTE, await restarted.get(QUOTE), AT, policy()).accepted
    # Stale cache and the PCS down: the stale copy is used (verification judges its window).
    stale = CollateralSource("https://pccs.test", tmp_path, refresh_s=0, fetch=down)
    assert verify_quote(QUOTE, await stale.get(QUOTE), AT, policy()).accepted
    # Nothing cached and the PCS down: a clear error.
    empty = CollateralSource("https://pccs.test", tmp_path / "empty", fetch=down)
    with pytest.raises(CollateralError, match="none is cached"):
        await empty.get(QUOTE)


# -- evidence -----------------------------------------------------------------------------------


def claims(nonce: str = "n" * 32, **changes: str) -> ev.Claims:
    keys = WorkerKeys.generate()
    return ev.Claims(
        box_public_key=keys.box_public_b64,
        verify_key=keys.verify_key_b64,
        model="smollm2-135m",
        model_sha256="ab" * 32,
        engine="llama-cpp",
        engine_version="0.3.36",
        worker_version="0.1.0",
        nonce=nonce,
        **changes,  # type: ignore[arg-type]
    )


def test_report_data_is_sha512_of_the_canonical_claims() -> None:
    c = claims()
    assert ev.report_data(c) == hashlib.sha512(canonical_json(c)).digest()
    assert len(ev.report_data(c)) == 64
    assert ev.report_data(c) != ev.report_data(c.model_copy(update={"model": "other"}))


def test_tdx_evidence_needs_configfs_tsm(tmp_path: Path) -> None:
    with pytest.raises(ev.EvidenceError, match="configfs-tsm"):
        ev.tdx_quote(b"\0" * 64, tmp_path / "no-tsm")


def dev_verifier(allow_dev: bool, tmp_path: Path, **kw: object) -> Verifier:
    return Verifier(
        AttestationSettings(allow_dev=allow_dev, **kw),  # type: ignore[arg-type]
        policy=policy(),
        collateral=CollateralSource("https://pccs.test", tmp_path),
        models={"smollm2-135m"},
    )


async def test_dev_evidence_is_accepted_only_in_dev_mode(tmp_path: Path) -> None:
    evidence = ev.dev_evidence(claims())
    assert (await dev_verifier(True, tmp_path).verify(evidence)).accepted
    refused = await dev_verifier(False, tmp_path).verify(evidence)
    assert not refused.accepted and "dev mode is off" in refused.reasons[0]
    # The software signature must cover these very claims.
    other = evidence.model_copy(update={"claims": claims()})
    refused = await dev_verifier(True, tmp_path).verify(other)
    assert "report data does not match" in refused.reasons[0]


async def test_nvidia_evidence_is_optional_and_checked_when_present(tmp_path: Path) -> None:
    c = claims()
    base = ev.dev_evidence(c, nacl.signing.SigningKey.generate())
    verifier = dev_verifier(True, tmp_path)
    absent = await verifier.verify(base)
    assert absent.accepted and not absent.nvidia  # absent: fine
    malformed = base.model_copy(update={"nvidia": {"evidence": "junk"}})
    verdict = await verifier.verify(malformed)
    assert not verdict.accepted and "NVIDIA GPU evidence is malformed" in verdict.reasons[0]
    wrong_nonce = {"nonce": "0" * 64, "evidence": [{"certificate": "x"}]}
    assert "not taken for this nonce" in verify_nvidia(wrong_nonce, c.nonce)[0]
    bound = {"nonce": hashlib.sha256(c.nonce.encode()).hexdigest(), "evidence": [{"c": "x"}]}
    assert "cannot check it" in verify_nvidia(bound, c.nonce)[0]  # no SDK here: never unchecked
    tdx = ev.Evidence(tee="tdx", claims=c, quote=base64.b64encode(QUOTE).decode())
    required = dev_verifier(True, tmp_path, require_nvidia=True)
    required.collateral.store(CollateralSource.cache_key(QUOTE), COLLATERAL)
    verdict = await required.verify(tdx)
    assert "NVIDIA GPU evidence is required" in verdict.reasons[-1]
