"""Intel TDX quote verification with ``dcap-qvl``, and the collateral it needs, cached.

:func:`verify_quote` checks the quote's signatures and certificate chain against Intel's
collateral at a given time, then Cocoon's policy: the TCB status, MRTD and RTMR0-3 against the
allow-list, and (when given) the report data. Every refusal carries a reason a person can act on.

:class:`CollateralSource` fetches collateral (PCK CRL, TCB info, QE identity) from the configured
PCCS / Intel PCS and caches it in memory and on disk, per (PCK CA, FMSPC): collateral younger than
``refresh_s`` is used as is; older collateral is refreshed, and kept in use while the PCS cannot
be reached, so a verifier restart or a PCS outage does not stop the network (verification still
refuses collateral outside its own validity window).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backend.attestation.policy import MEASUREMENTS, Policy

log = logging.getLogger("cocoon.attestation")

FETCH_TIMEOUT_S = 30.0


class CollateralError(RuntimeError):
    """No usable collateral: the PCS cannot be reached and nothing is cached."""


@dataclass
class QuoteVerdict:
    """The outcome of :func:`verify_quote`, as ``cocoon attest verify`` prints it."""

    status: str | None = None  # the TCB status, None when the quote did not verify at all
    mr_td: str | None = None
    rtmr0: str | None = None
    rtmr1: str | None = None
    rtmr2: str | None = None
    rtmr3: str | None = None
    report_data: str | None = None
    advisory_ids: list[str] = field(default_factory=list)
    image: str | None = None  # "name version" of the matching released image
    reasons: list[str] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return self.status is not None and not self.reasons

    @property
    def measurements(self) -> dict[str, str]:
        return {name: getattr(self, name) or "" for name in MEASUREMENTS}

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "mr_td": self.mr_td,
            "rtmr0": self.rtmr0,
            "rtmr1": self.rtmr1,
            "rtmr2": self.rtmr2,
            "rtmr3": self.rtmr3,
            "report_data": self.report_data,
            "advisory_ids": self.advisory_ids,
            "image": self.image,
            "accepted": self.accepted,
            "reasons": self.reasons,
        }


def explain_failure(message: str, now_secs: int) -> str:
    """dcap-qvl's error, said so that a provider or operator knows what to do."""
    lowered = message.lower()
    if "signature" in lowered or ("invalid" in lowered and "cert" in lowered):
        return (
            f"the quote's signature or certificate chain does not verify: the quote is corrupted "
            f"or tampered with ({message})"
        )
    if any(word in lowered for word in ("expired", "future", "not yet valid", "nextupdate")):
        return (
            f"the collateral is not valid at {now_secs} ({_iso(now_secs)}): it is outside its "
            f"validity window; fetch current collateral from the PCS ({message})"
        )
    if "no matching tcb level" in lowered:
        return (
            "the platform's TCB matches no level in Intel's TCB info: its firmware or microcode "
            f"is out of date; update the platform and attest again ({message})"
        )
    if "parse" in lowered or "decode" in lowered:
        return f"the quote is malformed ({message})"
    return f"the quote does not verify ({message})"


def verify_quote(
    raw_quote: bytes,
    collateral: Any,
    now_secs: int,
    policy: Policy,
    *,
    expected_report_data: bytes | None = None,
) -> QuoteVerdict:
    """Verify a TDX quote fully (see the module doc). ``collateral``: a QuoteCollateralV3."""
    import dcap_qvl

    verdict = QuoteVerdict()
    try:
        report = dcap_qvl.verify(raw_quote, collateral, int(now_secs))
    except (ValueError, RuntimeError) as error:
        verdict.reasons.append(explain_failure(str(error), int(now_secs)))
        return verdict
    data = json.loads(report.to_json())
    verdict.status = data["status"]
    verdict.advisory_ids = list(data.get("advisory_ids") or [])
    body = data["report"]
    td = body.get("TD10") or body.get("TD15")
    if td is None:
        verdict.reasons.append(f"not a TDX quote (report {next(iter(body), '?')})")
        return verdict
    verdict.mr_td = td["mr_td"]
    for index in range(4):
        setattr(verdict, f"rtmr{index}", td[f"rt_mr{index}"])
    verdict.report_data = td["report_data"]
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


def load_collateral(text: str) -> Any:
    import dcap_qvl

    return dcap_qvl.QuoteCollateralV3.from_json(text)


Fetcher = Callable[[str, bytes], Awaitable[Any]]


async def _dcap_fetch(url: str, raw_quote: bytes) -> Any:
    import dcap_qvl

    return await dcap_qvl.get_collateral(url, raw_quote)


class CollateralSource:
    """Collateral for a quote from ``url``, cached in memory and under ``directory``."""

    def __init__(
        self,
        url: str,
        directory: Path,
        *,
        refresh_s: float = 3600,
        fetch: Fetcher | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        self.directory = directory
        self.refresh_s = refresh_s
        self._fetch = fetch or _dcap_fetch
        self._clock = clock
        self._memory: dict[str, tuple[float, str]] = {}

    @staticmethod
    def cache_key(raw_quote: bytes) -> str:
        import dcap_qvl

        quote = dcap_qvl.parse_quote(raw_quote)
        return f"{quote.ca()}-{quote.fmspc()}".lower()

    async def get(self, raw_quote: bytes) -> Any:
        key = self.cache_key(raw_quote)
        cached = self._memory.get(key) or self._read_disk(key)
        if cached is not None and self._clock() - cached[0] < self.refresh_s:
            return load_collateral(cached[1])
        try:
            collateral = await asyncio.wait_for(self._fetch(self.url, raw_quote), FETCH_TIMEOUT_S)
            text = collateral.to_json()
        except Exception as error:
            if cached is None:
                raise CollateralError(
                    f"cannot fetch collateral from {self.url} ({type(error).__name__}: {error}) "
                    "and none is cached"
                ) from None
            log.warning(
                "collateral refresh from %s failed (%s); using the cached copy", self.url, error
            )
            return load_collateral(cached[1])
        self.store(key, text)
        return collateral

    def store(self, key: str, text: str) -> None:
        entry = (self._clock(), text)
        self._memory[key] = entry
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{key}.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"fetched_at": entry[0], "collateral": text}))
        temporary.replace(path)

    def _read_disk(self, key: str) -> tuple[float, str] | None:
        path = self.directory / f"{key}.json"
        try:
            data = json.loads(path.read_text())
            entry = (float(data["fetched_at"]), str(data["collateral"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        self._memory[key] = entry
        return entry


def _iso(secs: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(secs))
