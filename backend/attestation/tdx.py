"""Intel TDX quote verification with ``dcap-qvl``.

:func:`verify_quote` checks the quote's signatures and certificate chain against Intel's
collateral at a given time, then Cocoon's policy: the TCB status, MRTD and RTMR0-3 against the
allow-list, and (when given) the report data. It reads TD 1.0 reports (quote v4) and TD 1.5
reports (quote v5, body types 3 and 4) through ``dcap-qvl``'s own parsed types. Every refusal
carries a reason a person can act on, and says whether the fault lies in the collateral (the
verifier's side) rather than in the quote. Anything but a verification failure (a crash in the
library, a bad argument) is raised, never reported as a refusal.

The collateral it needs is fetched and cached by :mod:`backend.attestation.collateral`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from backend.attestation.policy import MEASUREMENTS, Policy


class UnsupportedQuote(ValueError):
    """A quote this verifier refuses before verification, with the reason as its message."""


class VerificationCrashed(RuntimeError):
    """``dcap-qvl`` failed in a way that is not a verdict (a panic in the library)."""


@dataclass
class QuoteVerdict:
    """The outcome of :func:`verify_quote`, as ``cocoon attest verify`` prints it."""

    status: str | None = None  # the TCB status, None when the quote did not verify at all
    report_type: str | None = None  # "TD10" (quote v4), "TD15" or "TD15Ex" (quote v5)
    quote_version: int | None = None
    fmspc: str | None = None
    mr_td: str | None = None
    rtmr0: str | None = None
    rtmr1: str | None = None
    rtmr2: str | None = None
    rtmr3: str | None = None
    report_data: str | None = None
    mr_seam: str | None = None
    tee_tcb_svn: str | None = None
    # TD 1.5 only (None for TD10): the service TD's measurement and the second TCB SVN.
    mr_service_td: str | None = None
    tee_tcb_svn2: str | None = None
    advisory_ids: list[str] = field(default_factory=list)
    image: str | None = None  # "name version" of the matching released image
    reasons: list[str] = field(default_factory=list)
    # True when the quote was refused because of the collateral it was checked against (not
    # yet valid, expired, another platform's, carrying another machine's PCK chain, corrupted):
    # the verifier's side must fetch current collateral; the quote itself may be fine.
    collateral_fault: bool = False

    @property
    def accepted(self) -> bool:
        return self.status is not None and not self.reasons

    @property
    def measurements(self) -> dict[str, str]:
        return {name: getattr(self, name) or "" for name in MEASUREMENTS}

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "report_type": self.report_type,
            "quote_version": self.quote_version,
            "fmspc": self.fmspc,
            "mr_td": self.mr_td,
            "rtmr0": self.rtmr0,
            "rtmr1": self.rtmr1,
            "rtmr2": self.rtmr2,
            "rtmr3": self.rtmr3,
            "report_data": self.report_data,
            "mr_seam": self.mr_seam,
            "tee_tcb_svn": self.tee_tcb_svn,
            "mr_service_td": self.mr_service_td,
            "tee_tcb_svn2": self.tee_tcb_svn2,
            "advisory_ids": self.advisory_ids,
            "image": self.image,
            "accepted": self.accepted,
            "reasons": self.reasons,
            "collateral_fault": self.collateral_fault,
        }


# -- why a quote does not verify ------------------------------------------------------------------


@dataclass(frozen=True)
class FailureContext:
    """What :func:`explain_failure` may say beyond dcap-qvl's message."""

    quote_fmspc: str | None = None
    collateral_fmspc: str | None = None
    # The collateral carries a PCK certificate chain that is not the one in the quote.
    foreign_chain: bool = False


_NOT_BEFORE = re.compile(r"not_before: UnixTime\((\d+)\)")
_NOT_AFTER = re.compile(r"not_after: UnixTime\((\d+)\)")
_SIGNATURE = (
    "signature is invalid for qe_report",
    "isv enclave report signature is invalid",
    "qe report hash mismatch",
    "failed to verify certificate chain",
    "failed to parse pck certificate",
    "failed to extract pck certificates",
)


def explain_failure(
    message: str, now_secs: int, context: FailureContext | None = None
) -> tuple[str, bool]:
    """dcap-qvl's error, said so that a provider or operator knows what to do; and whether the
    fault lies in the collateral rather than in the quote."""
    ctx = context or FailureContext()
    lowered = message.lower()
    at = f"{now_secs} ({_iso(now_secs)})"
    if "fmspc mismatch" in lowered or "non-tdx tcb info" in lowered:
        theirs = f" {ctx.collateral_fmspc}" if ctx.collateral_fmspc else ""
        ours = f" {ctx.quote_fmspc}" if ctx.quote_fmspc else ""
        return (
            f"the collateral is for another platform (TCB info of FMSPC{theirs}; the quote's "
            f"platform is FMSPC{ours}): fetch the collateral for this quote's platform "
            f"({message})",
            True,
        )
    if "issue date is in the future" in lowered:
        return (
            f"the collateral is not valid yet at {at}: it was issued later; verify at a time "
            f"inside its validity window, or check the verifier's clock ({message})",
            True,
        )
    if "certnotvalidyet" in lowered:
        found = _NOT_BEFORE.search(message)
        since = f" (valid from {_iso(int(found.group(1)))})" if found else ""
        return (
            f"a certificate of the quote's PCK chain is not valid yet at {at}{since}: the "
            f"verification time is before the machine's certificate was issued; check the "
            f"clock, or verify with collateral and a time from after that date ({message})",
            False,
        )
    if "certexpired" in lowered:
        found = _NOT_AFTER.search(message)
        until = f" (valid until {_iso(int(found.group(1)))})" if found else ""
        return (
            f"a certificate of the quote's PCK chain has expired at {at}{until}: the platform "
            f"needs a new PCK certificate from Intel ({message})",
            False,
        )
    if "expired" in lowered or "nextupdate" in lowered:
        return (
            f"the collateral is not valid at {at}: it is outside its validity window; fetch "
            f"current collateral from the PCS ({message})",
            True,
        )
    if "revoked" in lowered:
        return (
            f"the platform's PCK certificate or TCB is revoked by Intel: this machine cannot be "
            f"trusted until Intel re-certifies it ({message})",
            False,
        )
    if "crl" in lowered or "revocationstatus" in lowered:
        return (
            "the collateral's certificate revocation list (PCK CRL or root CA CRL) does not "
            "verify or does not cover the quote's PCK certificate: the collateral is corrupted "
            f"or for another PCK CA; fetch it again for this quote ({message})",
            True,
        )
    if "in quote_collateral" in lowered:
        return (
            f"the collateral's own signature does not verify: the collateral is corrupted; "
            f"fetch it again from the PCS ({message})",
            True,
        )
    if any(marker in lowered for marker in _SIGNATURE):
        if ctx.foreign_chain:
            return (
                "certificate chain mismatch: the collateral carries the PCK certificate chain "
                "of another machine (fetched for another quote), not the one in this quote; "
                f"verify with collateral that has no PCK chain, or one fetched for this quote "
                f"({message})",
                True,
            )
        return (
            f"the quote's signature or certificate chain does not verify: the quote is corrupted "
            f"or tampered with ({message})",
            False,
        )
    if "no matching tcb level" in lowered:
        return (
            "the platform's TCB matches no level in Intel's TCB info: its firmware or microcode "
            f"is out of date; update the platform and attest again ({message})",
            False,
        )
    if "debug mode" in lowered:
        return (
            f"the TD runs in debug mode: the host can read its memory; run it without debug "
            f"({message})",
            False,
        )
    if "unsupported dcap pck cert format" in lowered:
        return (
            "the quote carries no PCK certificate chain (certification data type 2 or 3): "
            "configure the host's quote generation to embed it (type 5) and attest again "
            f"({message})",
            False,
        )
    if "parse" in lowered or "decode" in lowered:
        return f"the quote is malformed ({message})", False
    return f"the quote does not verify ({message})", False


def _pem_certificates(text: str) -> list[bytes]:
    """The DER bytes of each PEM certificate in ``text`` (whitespace and NULs ignored)."""
    found = []
    for body in re.findall(
        r"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", text, flags=re.S
    ):
        try:
            found.append(base64.b64decode("".join(body.split()), validate=True))
        except (binascii.Error, ValueError):
            found.append(body.encode())
    return found


def collateral_chain(collateral: Any) -> str | None:
    """The PCK certificate chain a collateral carries (``dcap_qvl.get_collateral`` attaches the
    fetched quote's own), or None. The bindings expose it only in the collateral's JSON."""
    chain = json.loads(collateral.to_json()).get("pck_certificate_chain")
    return chain if isinstance(chain, str) and chain else None


def quote_chain(raw_quote: bytes) -> str | None:
    """The PCK certificate chain embedded in the quote (certification data type 5), or None."""
    import dcap_qvl

    try:
        pem = dcap_qvl.parse_quote(raw_quote).cert_chain_pem_bytes()
    except ValueError:
        return None
    return pem.decode("ascii", "replace") if pem else None


def _failure_context(raw_quote: bytes, collateral: Any) -> FailureContext:
    import dcap_qvl

    try:
        quote_fmspc: str | None = dcap_qvl.parse_quote(raw_quote).fmspc().upper()
    except ValueError:
        quote_fmspc = None
    try:
        collateral_fmspc = str(json.loads(collateral.tcb_info).get("fmspc") or "").upper() or None
    except (ValueError, AttributeError):
        collateral_fmspc = None
    carried = collateral_chain(collateral)
    own = quote_chain(raw_quote)
    foreign = bool(carried and own and _pem_certificates(carried)[:1] != _pem_certificates(own)[:1])
    return FailureContext(quote_fmspc, collateral_fmspc, foreign)


# -- verification ---------------------------------------------------------------------------------


def _report_type(report: Any) -> str | None:
    """dcap-qvl's parsed TD report type (the v5 types extend TD10 in dcap-qvl, not in Python)."""
    import dcap_qvl

    if isinstance(report, dcap_qvl.TdReport15Ex):
        return "TD15Ex"
    if isinstance(report, dcap_qvl.TdReport15):
        return "TD15"
    if isinstance(report, dcap_qvl.TdReport10):
        return "TD10"
    return None


def _dcap_verify(raw_quote: bytes, collateral: Any, now_secs: int) -> Any:
    """``dcap_qvl.verify``; a ValueError is a verdict, anything else is raised (a pyo3 panic,
    which is a BaseException, as :class:`VerificationCrashed`)."""
    import dcap_qvl

    try:
        return dcap_qvl.verify(raw_quote, collateral, now_secs)
    except Exception:
        raise
    except BaseException as error:
        if type(error).__name__ == "PanicException":
            raise VerificationCrashed(f"dcap-qvl panicked: {error}") from error
        raise


def verify_quote(
    raw_quote: bytes,
    collateral: Any,
    now_secs: int,
    policy: Policy,
    *,
    expected_report_data: bytes | None = None,
) -> QuoteVerdict:
    """Verify a TDX quote fully (see the module doc). ``collateral``: a QuoteCollateralV3.

    Returns a verdict for every quote, however malformed; raises only for the verifier's own
    faults (a bad ``now_secs``, a crash in dcap-qvl)."""
    import dcap_qvl

    now = int(now_secs)
    verdict = QuoteVerdict()
    try:
        verified = _dcap_verify(raw_quote, collateral, now)
    except ValueError as error:
        reason, verdict.collateral_fault = explain_failure(
            str(error), now, _failure_context(raw_quote, collateral)
        )
        verdict.reasons.append(reason)
        return verdict
    # The same bytes dcap-qvl has just verified, read through its own parsed types.
    quote = dcap_qvl.parse_quote(raw_quote)
    verdict.status = verified.status
    verdict.advisory_ids = list(verified.advisory_ids)
    verdict.quote_version = quote.header.version
    report = quote.report
    verdict.report_type = _report_type(report)
    if verdict.report_type is None:
        verdict.reasons.append(
            f"not a TDX quote (a {quote.quote_type()} quote, report {type(report).__name__})"
        )
        return verdict
    verdict.fmspc = quote.fmspc().upper()
    verdict.mr_td = report.mr_td.hex()
    verdict.rtmr0 = report.rt_mr0.hex()
    verdict.rtmr1 = report.rt_mr1.hex()
    verdict.rtmr2 = report.rt_mr2.hex()
    verdict.rtmr3 = report.rt_mr3.hex()
    verdict.report_data = report.report_data.hex()
    verdict.mr_seam = report.mr_seam.hex()
    verdict.tee_tcb_svn = report.tee_tcb_svn.hex()
    if verdict.report_type in ("TD15", "TD15Ex"):
        verdict.mr_service_td = report.mr_service_td.hex()
        verdict.tee_tcb_svn2 = report.tee_tcb_svn2.hex()
    if verdict.status not in policy.tcb_statuses:
        advisories = ", ".join(verdict.advisory_ids) or "none"
        verdict.reasons.append(
            f"TCB status {verdict.status} is not accepted by the policy (accepted: "
            f"{', '.join(policy.tcb_statuses)}; advisories: {advisories}): update the platform"
        )
    image, mismatches = policy.match(verdict.measurements)
    verdict.image = image.label if image else None
    verdict.reasons.extend(mismatches)
    if expected_report_data is not None and verdict.report_data != expected_report_data.hex():
        verdict.reasons.append(
            "the quote's report data does not equal SHA-512 of the claims: the quote was not "
            "taken for these keys and this nonce"
        )
    return verdict


# -- collateral -----------------------------------------------------------------------------------


def _iso(secs: int) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(secs))
    except (OverflowError, OSError, ValueError):
        return "?"
