"""The collateral TDX quotes are verified against, fetched and cached.

:class:`CollateralSource` fetches collateral (PCK CRL, TCB info, QE identity) from the configured
PCCS / Intel PCS and caches it in memory and on disk, per (PCK CA, FMSPC): collateral younger than
``refresh_s`` is used as is; older collateral is refreshed, and kept in use while the PCS cannot
be reached, so a verifier restart or a PCS outage does not stop the network (verification still
refuses collateral outside its own validity window). The cache holds a platform's collateral
only, never a machine's PCK certificate chain (``dcap_qvl.get_collateral`` attaches the fetched
quote's own): every host of a platform is verified against the chain in its own quote
(:func:`backend.attestation.tdx.verify_quote`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from backend.attestation.tdx import UnsupportedQuote

__all__ = [
    "CollateralError",
    "CollateralSource",
    "Fetcher",
    "load_collateral",
    "platform_collateral",
]

log = logging.getLogger("cocoon.attestation")

FETCH_TIMEOUT_S = 30.0
MAX_CACHE_FILE_BYTES = 1 << 20  # collateral is ~20-30 KB; a bigger file is not ours


class CollateralError(RuntimeError):
    """No usable collateral: the PCS cannot be reached and nothing is cached."""


def load_collateral(text: str) -> Any:
    """dcap-qvl's collateral JSON as it was written (a PCK chain in it is kept)."""
    import dcap_qvl

    return dcap_qvl.QuoteCollateralV3.from_json(text)


def platform_collateral(collateral: Any) -> Any:
    """The same collateral without any machine's PCK certificate chain: what a platform shares."""
    import dcap_qvl

    return dcap_qvl.QuoteCollateralV3(
        collateral.pck_crl_issuer_chain,
        collateral.root_ca_crl,
        collateral.pck_crl,
        collateral.tcb_info_issuer_chain,
        collateral.tcb_info,
        collateral.tcb_info_signature,
        collateral.qe_identity_issuer_chain,
        collateral.qe_identity,
        collateral.qe_identity_signature,
    )


Fetcher = Callable[[str, bytes], Awaitable[Any]]


async def _dcap_fetch(url: str, raw_quote: bytes) -> Any:
    import dcap_qvl

    return await dcap_qvl.get_collateral(url, raw_quote)


class CollateralSource:
    """A platform's collateral for a quote from ``url``, cached in memory and under
    ``directory`` (see the module doc: never a machine's PCK chain)."""

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
        """``<ca>-<fmspc>`` of the quote's platform. Raises :class:`UnsupportedQuote` for a quote
        without an embedded PCK chain, ValueError for one that does not parse."""
        import dcap_qvl

        quote = dcap_qvl.parse_quote(raw_quote)
        if not quote.cert_chain_pem_bytes():
            raise UnsupportedQuote(
                "the quote carries no PCK certificate chain (certification data type 2 or 3): "
                "configure the host's quote generation (QGS / PCCS) to embed it (type 5) and "
                "attest again"
            )
        return f"{quote.ca()}-{quote.fmspc()}".lower()

    async def get(self, raw_quote: bytes) -> Any:
        """The platform collateral for this quote (without a PCK chain: each quote is verified
        against its own). Raises :class:`CollateralError` when none can be had."""
        key = self.cache_key(raw_quote)
        cached = self._memory.get(key) or self._read_disk(key)
        if cached is not None and self._clock() - cached[0] < self.refresh_s:
            return load_collateral(cached[1])
        try:
            fetched = await asyncio.wait_for(self._fetch(self.url, raw_quote), FETCH_TIMEOUT_S)
            collateral = platform_collateral(fetched)
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
        self._remember(key, text)
        return collateral

    def store(self, key: str, text: str) -> None:
        """Cache collateral JSON (e.g. recorded collateral) under ``key``, without its PCK chain."""
        self._remember(key, platform_collateral(load_collateral(text)).to_json())

    def _remember(self, key: str, text: str) -> None:
        entry = (self._clock(), text)
        self._memory[key] = entry
        path = self.directory / f"{key}.json"
        temporary = path.with_suffix(".tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps({"fetched_at": entry[0], "collateral": text}))
            temporary.replace(path)
        except OSError as error:  # the memory copy serves; a restart fetches again
            log.warning("collateral cache %s not written: %s", path, error)

    def _read_disk(self, key: str) -> tuple[float, str] | None:
        path = self.directory / f"{key}.json"
        try:
            if path.stat().st_size > MAX_CACHE_FILE_BYTES:
                return None
            data = json.loads(path.read_text())
            fetched_at = float(data["fetched_at"])
            # A file written before the cache dropped PCK chains may carry one: drop it here.
            text = platform_collateral(load_collateral(str(data["collateral"]))).to_json()
        except (OSError, ValueError, KeyError, TypeError):
            return None
        entry = (fetched_at, text)
        self._memory[key] = entry
        return entry
