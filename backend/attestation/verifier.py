"""Evidence verification: one :class:`Verdict` per :class:`~workers.evidence.Evidence`.

The nonce is checked by the onboarding service (it lives in Redis); everything else is here:
the claims, the TEE-specific proof (TDX quote through :mod:`.tdx`, or the development TEE's
software signature, only when dev mode is on), and the optional NVIDIA GPU evidence.

The claimed configuration is checked as well, against the policy: an engine that sends prompts
off the machine (:func:`workers.evidence.off_machine_reason`) only with the development TEE;
the weights digest against the model's allow-list; and, for a TDX worker, the engine kind,
version and configuration against those its image allows. The verdict's ``off_machine`` says
so for the record, so that every place that shows the worker can say it.

A verdict is a decision about the evidence. When the verifier cannot decide (it has no
collateral, or its collateral is not valid now or is not the quote's platform's) it raises
:class:`VerifierUnavailable` instead: that is the backend's fault, not the worker's, and must
not count as a refusal. Any other exception is a bug in the backend.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import nacl.exceptions
import nacl.signing

from backend.attestation.collateral import CollateralError, CollateralSource
from backend.attestation.nvidia import verify_nvidia
from backend.attestation.policy import Policy, load_policy
from backend.attestation.tdx import QuoteVerdict, UnsupportedQuote, verify_quote
from backend.settings import AttestationSettings, Settings
from workers.evidence import Evidence, off_machine_reason, report_data
from workers.wire import WireError, key_fingerprint

DEV_REFUSED = (
    "development-TEE evidence is refused: dev mode is off on this backend (an operator can "
    "enable it with COCOON_ATTESTATION__ALLOW_DEV=true, for development only)"
)


class VerifierUnavailable(RuntimeError):
    """The verifier cannot decide now (collateral missing or unusable): nothing was decided."""


@dataclass
class Verdict:
    tee: str
    reasons: list[str] = field(default_factory=list)
    quote: QuoteVerdict | None = None
    nvidia: bool = False
    off_machine: bool = False  # the engine sends prompts off the machine (dev TEE only)

    @property
    def accepted(self) -> bool:
        return not self.reasons

    @property
    def image(self) -> str | None:
        return self.quote.image if self.quote else None

    @property
    def measurements(self) -> dict[str, str]:
        return self.quote.measurements if self.quote else {}


class Verifier:
    """Verifies evidence against the settings' policy. One per process (collateral cache)."""

    def __init__(
        self,
        settings: AttestationSettings,
        *,
        policy: Policy,
        collateral: CollateralSource,
        models: Iterable[str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.collateral = collateral
        self.models = set(models) if models is not None else None
        self.clock = clock

    @classmethod
    def from_settings(cls, settings: Settings) -> Verifier:
        """From the whole :class:`backend.settings.Settings`."""
        attestation = settings.attestation
        return cls(
            attestation,
            policy=load_policy(attestation.policy_file),
            collateral=CollateralSource(
                attestation.pccs_url,
                attestation.collateral_dir or settings.data_dir / "collateral",
                refresh_s=attestation.collateral_refresh_s,
            ),
            models=settings.models,
        )

    async def verify(self, evidence: Evidence) -> Verdict:
        verdict = Verdict(tee=evidence.tee)
        claims = evidence.claims
        try:
            key_fingerprint(claims.box_public_key, claims.verify_key)
        except WireError as error:
            verdict.reasons.append(f"the claimed keys are invalid: {error}")
            return verdict
        if self.models is not None and claims.model not in self.models:
            verdict.reasons.append(f"model {claims.model!r} is not served on this network")
        expected = report_data(claims)
        gpu: list[str] = []  # decided without collateral, listed after the TEE's reasons
        if evidence.nvidia is not None:
            gpu = verify_nvidia(evidence.nvidia, claims.nonce)
            verdict.nvidia = not gpu
        elif evidence.tee == "tdx" and self.settings.require_nvidia:
            gpu = ["NVIDIA GPU evidence is required and the worker sent none"]
        configuration = self._configuration(evidence, verdict)  # decided without collateral
        if evidence.tee == "dev":
            verdict.reasons.extend(self._check_dev(evidence, expected))
        else:
            try:
                await self._check_tdx(evidence, expected, verdict)
            except VerifierUnavailable:
                if not verdict.reasons and not gpu and not configuration:
                    raise
                # Refused for what can be decided now, whatever the quote would say.
        verdict.reasons.extend(configuration)
        if verdict.image is not None:
            verdict.reasons.extend(
                self.policy.engine_problems(
                    verdict.image, claims.engine, claims.engine_version, claims.engine_config
                )
            )
        verdict.reasons.extend(gpu)
        return verdict

    def _configuration(self, evidence: Evidence, verdict: Verdict) -> list[str]:
        """Where the engine sends prompts, and the weights it loaded."""
        claims = evidence.claims
        problems = []
        off_machine = off_machine_reason(claims.engine, claims.engine_config)
        verdict.off_machine = off_machine is not None
        if off_machine is not None and evidence.tee != "dev":
            problems.append(
                f"{off_machine}: refused for an attested worker (such an engine is allowed only "
                "with the development TEE)"
            )
        problems.extend(
            self.policy.weights_problems(claims.model, claims.model_sha256, evidence.tee)
        )
        return problems

    def _check_dev(self, evidence: Evidence, expected: bytes) -> list[str]:
        if not self.settings.allow_dev:
            return [DEV_REFUSED]
        proof = evidence.dev
        if proof is None or evidence.quote is not None:
            return ["development-TEE evidence must carry a dev proof and no quote"]
        try:
            key = nacl.signing.VerifyKey(base64.b64decode(proof.public_key, validate=True))
            key.verify(expected, base64.b64decode(proof.signature, validate=True))
        except (binascii.Error, ValueError, nacl.exceptions.CryptoError):
            return [
                "the development TEE's signature does not cover SHA-512 of the claims "
                "(report data does not match)"
            ]
        return []

    async def _check_tdx(self, evidence: Evidence, expected: bytes, verdict: Verdict) -> None:
        if evidence.quote is None or evidence.dev is not None:
            verdict.reasons.append("TDX evidence must carry a quote and no dev proof")
            return
        try:
            raw = base64.b64decode(evidence.quote, validate=True)
        except (binascii.Error, ValueError):
            verdict.reasons.append("the quote is not valid base64")
            return
        try:
            collateral = await self.collateral.get(raw)
        except CollateralError as error:
            raise VerifierUnavailable(str(error)) from None
        except UnsupportedQuote as error:
            verdict.reasons.append(str(error))
            return
        except ValueError as error:  # the quote cannot even be parsed
            verdict.reasons.append(f"the quote is malformed ({error})")
            return
        quote = verify_quote(
            raw, collateral, int(self.clock()), self.policy, expected_report_data=expected
        )
        if quote.collateral_fault:
            # Collateral is fetched per platform for this very quote: if it does not fit or is
            # not valid now, the PCS, the cache or this server's clock is at fault.
            raise VerifierUnavailable(
                f"the backend's collateral cannot verify this quote now: {quote.reasons[0]}"
            )
        verdict.quote = quote
        verdict.reasons.extend(quote.reasons)
        if quote.status is None and not quote.reasons:
            verdict.reasons.append("the quote did not verify")
