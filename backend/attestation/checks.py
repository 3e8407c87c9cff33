"""A client's own checks: an attestation report, then each receipt, against a policy it holds
(``cocoon attest report``, ``cocoon verify-receipt``, the sealed client :mod:`backend.client`).

:func:`check_report` verifies every worker of a report fetched from
``GET /v1/attestation/report`` (:mod:`backend.attestation.report`) with the backend's own
verifier (:class:`backend.attestation.verifier.Verifier`: the claims' SHA-512 is the quote's
report data; the TDX quote verifies with dcap-qvl against the collateral the report carries and
its MRTD and RTMR0-3 are a released image of *the client's* policy, with an accepted TCB status;
the engine configuration and the weights digest are allowed; the development TEE's proof is
accepted only when the client allows dev evidence), and then what the report adds: the worker's
id is its keys' fingerprint, it serves the model asked for, its evidence has not expired, and
the client's own nonce is signed by the attested Ed25519 key (a fresh answer).

:func:`check_receipt` checks a receipt (``cocoon.receipt`` of a completion, or
``GET /v1/receipts/{id}``) offline: signed by the attested key of a worker the report trusts,
for the job expected, and, given the reply text or the sealed request, with their digests.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backend.attestation.collateral import CollateralError, CollateralSource, load_collateral
from backend.attestation.policy import Policy
from backend.attestation.verifier import Verifier, VerifierUnavailable
from backend.settings import AttestationSettings
from workers.evidence import Evidence
from workers.receipts import SignedReceipt, verify_challenge, verify_receipt_signature
from workers.wire import WireError, canonical_json, key_fingerprint

__all__ = ["ReportError", "WorkerCheck", "check_receipt", "check_report"]


class ReportError(ValueError):
    """The report (or receipt) is not even shaped like one."""


@dataclass
class WorkerCheck:
    """One worker of a report: trusted (no reasons) or not, and why."""

    worker_id: str
    tee: str = "?"
    image: str | None = None
    box_public_key: str = ""
    verify_key: str = ""
    engine: str = ""
    model_sha256: str = ""
    expires_at: float = 0.0
    reasons: list[str] = field(default_factory=list)
    trusted_because: list[str] = field(default_factory=list)

    @property
    def trusted(self) -> bool:
        return not self.reasons

    def to_json(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "trusted": self.trusted,
            "tee": self.tee,
            "image": self.image,
            "engine": self.engine,
            "model_sha256": self.model_sha256,
            "key_fingerprint": self.worker_id.removeprefix("w-"),
            "expires_at": self.expires_at,
            "because": self.trusted_because,
            "reasons": self.reasons,
        }


class _ReportCollateral(CollateralSource):
    """The collateral the report carries (dcap-qvl JSON), for its one quote."""

    def __init__(self, text: str | None) -> None:
        super().__init__("(the report)", Path("/nonexistent"))
        self.text = text

    async def get(self, raw_quote: bytes) -> Any:
        if not self.text:
            raise CollateralError("the report carries no collateral for this quote")
        return load_collateral(self.text)


async def check_report(
    report: Any,
    *,
    model: str,
    nonce: str,
    policy: Policy,
    allow_dev: bool = False,
    now: float | None = None,
) -> list[WorkerCheck]:
    """Each worker of ``report``, checked (see the module doc). ``now``: the time the evidence
    and the quote's collateral are judged at (default: the clock)."""
    if not isinstance(report, dict) or not isinstance(report.get("workers"), list):
        raise ReportError("not an attestation report: no list of workers")
    at = time.time() if now is None else now
    checks = []
    for entry in report["workers"][:256]:
        checks.append(await _check_worker(entry, model, nonce, policy, allow_dev, at))
    return checks


async def _check_worker(
    entry: Any, model: str, nonce: str, policy: Policy, allow_dev: bool, at: float
) -> WorkerCheck:
    if not isinstance(entry, dict):
        return WorkerCheck("?", reasons=["a worker entry is not an object"])
    check = WorkerCheck(str(entry.get("worker_id"))[:80])
    try:
        evidence = Evidence.model_validate(entry.get("evidence"))
    except ValueError:
        check.reasons.append("its evidence is malformed")
        return check
    claims = evidence.claims
    if entry.get("claims_json") != canonical_json(claims).decode("utf-8"):
        check.reasons.append("its claims_json is not the canonical JSON of its claims")
    check.tee, check.engine = evidence.tee, f"{claims.engine} {claims.engine_version}"
    check.box_public_key, check.verify_key = claims.box_public_key, claims.verify_key
    check.model_sha256 = claims.model_sha256
    expires = entry.get("expires_at")
    check.expires_at = float(expires) if isinstance(expires, int | float) else 0.0
    verifier = Verifier(
        AttestationSettings(allow_dev=allow_dev),
        policy=policy,
        collateral=_ReportCollateral(entry.get("collateral")),
        clock=lambda: at,
    )
    try:
        verdict = await verifier.verify(evidence)
    except VerifierUnavailable as error:
        check.reasons.append(f"its quote cannot be checked: {error}")
        return check
    check.image = verdict.image
    check.reasons.extend(verdict.reasons)
    try:
        fingerprint = key_fingerprint(claims.box_public_key, claims.verify_key)
    except WireError:
        fingerprint = ""
    if check.worker_id != f"w-{fingerprint}":
        check.reasons.append("its id is not the fingerprint of the keys its evidence binds")
    if claims.model != model:
        check.reasons.append(f"its evidence is for model {claims.model!r}, not {model!r}")
    if check.expires_at <= at:
        check.reasons.append("its evidence has expired")
    signature = entry.get("signature")
    try:
        verify_challenge(check.worker_id, nonce, str(signature), claims.verify_key)
    except WireError as error:
        check.reasons.append(f"your nonce is not signed by its attested key ({error}): stale")
    if check.trusted:
        check.trusted_because = _because(evidence, verdict.image, verdict.nvidia, verifier)
    return check


def _because(evidence: Evidence, image: str | None, nvidia: bool, verifier: Verifier) -> list[str]:
    claims = evidence.claims
    why = []
    if evidence.tee == "tdx":
        why.append(
            f"Intel TDX quote verified with dcap-qvl (TCB status allowed by your policy: "
            f"{', '.join(verifier.policy.tcb_statuses)}); MRTD and RTMR0-3 are image {image}"
        )
    else:
        why.append(
            "development TEE: a software signature that proves nothing about the machine "
            "(accepted because you allowed dev evidence)"
        )
    why.append("the quote's report data is SHA-512 of the claims: these keys live in that TEE")
    why.append(
        f"engine {claims.engine} {claims.engine_version} with configuration sha256 "
        f"{hashlib.sha256(_config(claims.engine_config)).hexdigest()[:16]}... allowed"
    )
    if claims.model_sha256:
        why.append(f"weights sha256 {claims.model_sha256[:16]}... of model {claims.model}")
    if nvidia:
        why.append("NVIDIA GPU evidence verified, bound to the same nonce")
    why.append("your nonce is signed by its attested Ed25519 key: the answer is fresh")
    return why


def _config(config: dict[str, Any]) -> bytes:
    from workers.evidence import config_json

    return config_json(config)


def check_receipt(
    receipt: Any,
    trusted: list[WorkerCheck],
    *,
    job_id: str | None = None,
    turn_id: str | None = None,
    reply: str | None = None,
    sealed_request: bytes | None = None,
) -> tuple[list[str], SignedReceipt | None]:
    """(reasons to refuse, the signed receipt): refused unless signed by a trusted worker's
    attested key, for ``job_id`` (or a job of turn ``turn_id``), and matching ``reply`` and
    ``sealed_request`` when given. ``receipt``: a receipt record or a signed receipt (JSON)."""
    data = receipt.get("signed", receipt) if isinstance(receipt, dict) else None
    try:
        signed = SignedReceipt.model_validate(data)
    except ValueError:
        return ["not a receipt"], None
    worker_id = str(receipt.get("worker_id", "")) if isinstance(receipt, dict) else ""
    job = signed.receipt.job_id
    candidates = [w for w in trusted if w.trusted and (not worker_id or w.worker_id == worker_id)]
    signer = None
    for worker in candidates:
        try:
            verify_receipt_signature(signed, worker.verify_key)
        except WireError:
            continue
        signer = worker
        break
    reasons = []
    if signer is None:
        reasons.append("not signed by the attested key of any worker the report trusts")
    elif not job.startswith(signer.worker_id + "_"):
        reasons.append("its job is not one of the signing worker's")
    if job_id is not None and job != job_id:
        reasons.append(f"it is the receipt of job {job}, not {job_id}")
    if turn_id is not None and _turn_of(job) != turn_id:
        reasons.append(f"it is the receipt of another turn than {turn_id}")
    if reply is not None:
        digest = hashlib.sha256(reply.encode("utf-8", "surrogatepass")).hexdigest()
        if digest != signed.receipt.reply_sha256:
            reasons.append("the reply's SHA-256 is not the one the worker signed")
    if sealed_request is not None:
        if hashlib.sha256(sealed_request).hexdigest() != signed.receipt.request_sha256:
            reasons.append("the sealed request's SHA-256 is not the one the worker signed")
    return reasons, signed


def _turn_of(job_id: str) -> str:
    """The turn id inside a job id ``<worker>_<turn>-<attempt>``."""
    rest = job_id.rsplit("_", 1)[-1]
    return rest.rsplit("-", 1)[0]
