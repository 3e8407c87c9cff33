"""The public attestation report: ``GET /v1/attestation/report?model=M&nonce=HEX`` (no key).

For each accepted worker of model ``M`` (at most :data:`MAX_WORKERS`), the evidence the backend
verified when it onboarded the worker, as the worker sent it (the claims: its keys, the model
and weights digest, the engine and its configuration; the TDX quote, with the collateral the
backend checked it against, or the development TEE's proof; NVIDIA evidence when present), the
backend's record of it (TEE kind, matching image, expiry), and the client's ``nonce`` signed by
the worker's attested key (:func:`workers.receipts.sign_challenge`), so that the answer is
fresh: the backend cannot replay an old report, nor answer for a worker that is gone.

The nonce reaches the worker as a challenge job on its own queue (:mod:`workers.jobs`), and
its signature comes back as that job's one stream entry: the worker writes only its own keys.
A worker that does not answer within :data:`CHALLENGE_TIMEOUT_S` is listed under
``unanswered``, not in ``workers``. At most :data:`MAX_IN_FLIGHT` reports are built at once
(one job per worker each), :data:`MAX_PER_CLIENT` for one client address; past that the answer
is 503 (or 429), and the client asks again.

The policy's released images are published with the report (``policy``), so a client can see
what the operator allows; a careful client checks against its own copy
(:mod:`backend.client.verify`, ``cocoon attest report --policy FILE``).

The evidence is kept by onboarding (:func:`keep_evidence`) under ``cocoon:evidence:<worker>``,
written by the backend only and expiring with the attestation record.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError

from backend.attestation.collateral import CollateralError
from backend.attestation.tdx import UnsupportedQuote
from backend.attestation.verifier import Verifier
from backend.settings import Settings
from workers import registry, streams
from workers.evidence import Evidence
from workers.jobs import aenqueue_challenge, job_id_for
from workers.receipts import NONCE_PATTERN
from workers.redis_keys import redis_key
from workers.wire import canonical_json

__all__ = [
    "REPORTS",
    "ReportError",
    "ReportService",
    "keep_evidence",
    "read_evidence",
    "report_view",
]

log = logging.getLogger("cocoon.attestation")

EVIDENCE = "evidence"
MAX_WORKERS = 16
MAX_IN_FLIGHT = 8
MAX_PER_CLIENT = 2
CHALLENGE_TIMEOUT_S = 5.0
MAX_SIGNATURE_BYTES = 128


def evidence_key(worker_id: str) -> str:
    return redis_key(EVIDENCE, worker_id)


async def keep_evidence(
    redis: aioredis.Redis, worker_id: str, evidence: Evidence, expires_at: float
) -> None:
    """Keep the accepted evidence for the public report; it expires with the record."""
    await redis.set(
        evidence_key(worker_id), evidence.model_dump_json(), exat=max(1, math.ceil(expires_at))
    )


async def read_evidence(redis: aioredis.Redis, worker_id: str) -> Evidence | None:
    raw = await redis.get(evidence_key(worker_id))
    if raw is None:
        return None
    try:
        return Evidence.model_validate_json(raw)
    except ValueError:
        log.warning("the kept evidence of %s is not readable", worker_id)
        return None


class ReportError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ReportService:
    """Builds reports; one per web process (it bounds how many are built at once)."""

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        verifier: Verifier,
        snapshot: registry.WorkerSnapshot,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.verifier = verifier
        self.snapshot = snapshot
        self.timeout_s = CHALLENGE_TIMEOUT_S
        self._in_flight = 0
        self._by_client: dict[str, int] = {}

    async def report(self, model: Any, nonce: Any, client: str = "") -> dict[str, Any]:
        if not isinstance(model, str) or model not in self.settings.models:
            known = ", ".join(sorted(self.settings.models))
            raise ReportError(404, f"unknown model {str(model)[:200]!r}; available: {known}")
        if not isinstance(nonce, str) or not NONCE_PATTERN.match(nonce):
            raise ReportError(400, "nonce must be 16 to 64 random bytes in lower-case hex")
        if self._in_flight >= MAX_IN_FLIGHT:
            raise ReportError(503, "too many attestation reports are being built; try again")
        if self._by_client.get(client, 0) >= MAX_PER_CLIENT:
            raise ReportError(429, "your earlier reports are still being built; wait for them")
        self._in_flight += 1
        self._by_client[client] = self._by_client.get(client, 0) + 1
        try:
            return await self._build(model, nonce)
        finally:
            self._in_flight -= 1
            if (left := self._by_client.pop(client) - 1) > 0:
                self._by_client[client] = left

    async def _build(self, model: str, nonce: str) -> dict[str, Any]:
        workers = [w for w in await self.snapshot.workers(model) if w.attested][:MAX_WORKERS]
        answers = await asyncio.gather(*(self._worker(w.worker_id, model, nonce) for w in workers))
        listed = [a for a in answers if a is not None and "signature" in a]
        policy = self.verifier.policy
        return {
            "model": model,
            "nonce": nonce,
            "generated_at": time.time(),
            "dev_mode": self.settings.attestation.allow_dev,
            "workers": listed,
            "unanswered": [
                a["worker_id"] for a in answers if a is not None and "signature" not in a
            ],
            "policy": {
                "tcb_statuses": list(policy.tcb_statuses),
                "images": [image.model_dump(mode="json") for image in policy.images],
                "models": {m: w.model_dump(mode="json") for m, w in policy.models.items()},
            },
        }

    async def _worker(self, worker_id: str, model: str, nonce: str) -> dict[str, Any] | None:
        record = await registry.read_attestation(self.redis, worker_id)
        evidence = await read_evidence(self.redis, worker_id)
        if record is None or evidence is None or record.model != model:
            return None
        entry: dict[str, Any] = {
            "worker_id": worker_id,
            "tee": record.tee,
            "model": record.model,
            "image": record.image,
            "nvidia": record.nvidia,
            "off_machine": record.off_machine,
            "attested_at": record.attested_at,
            "expires_at": record.expires_at,
            "evidence": evidence.model_dump(mode="json"),
            # The exact bytes whose SHA-512 is the report data (numbers as written here: a
            # client in another language hashes these, not its own rendering of the claims).
            "claims_json": canonical_json(evidence.claims).decode("utf-8"),
            "collateral": await self._collateral(evidence),
        }
        signature = await self._challenge(worker_id, nonce)
        if signature is not None:
            entry["signature"] = signature
        return entry

    async def _collateral(self, evidence: Evidence) -> str | None:
        """The collateral the backend checks the quote against (dcap-qvl JSON), for the client
        to check it offline; None for dev evidence, or when none can be had now."""
        if evidence.quote is None:
            return None
        import base64

        try:
            collateral = await self.verifier.collateral.get(base64.b64decode(evidence.quote))
        except (CollateralError, UnsupportedQuote, ValueError) as error:
            log.warning("no collateral for the report: %s", error)
            return None
        return str(collateral.to_json())

    async def _challenge(self, worker_id: str, nonce: str) -> str | None:
        """The worker's signature of ``nonce`` (base64), or None when it did not answer."""
        job_id = job_id_for(worker_id, "ch" + uuid.uuid4().hex, 0)
        ttl = max(1, math.ceil(self.timeout_s))
        try:
            await aenqueue_challenge(self.redis, worker_id, job_id, nonce, ttl_s=ttl)
            limits = streams.StreamLimits(
                total_bytes=MAX_SIGNATURE_BYTES * 2, entry_bytes=MAX_SIGNATURE_BYTES * 2, entries=1
            )
            async for data in streams.read_stream(
                self.redis,
                job_id,
                first_timeout_s=self.timeout_s,
                idle_timeout_s=self.timeout_s,
                limits=limits,
            ):
                return bytes(data).decode("ascii", "replace")[:MAX_SIGNATURE_BYTES]
        except (streams.StreamTimeout, streams.StreamOverrun) as error:
            log.info("worker %s did not answer the report's challenge: %s", worker_id, error)
        except RedisError as error:
            log.warning("challenge of %s failed: %s", worker_id, error)
        finally:
            try:
                await streams.delete_stream(self.redis, job_id)
            except RedisError:
                pass
        return None


REPORTS = web.AppKey("attestation_reports", ReportService)


async def report_view(request: web.Request) -> web.Response:
    """``GET /v1/attestation/report?model=M&nonce=HEX``: public, no key."""
    try:
        service = request.app[REPORTS]
        query = request.query
        body = await service.report(query.get("model"), query.get("nonce"), request.remote or "")
    except ReportError as error:
        return web.json_response({"error": str(error)}, status=error.status)
    except RedisError as error:
        log.error("attestation report failed on Redis: %s", error)
        return web.json_response({"error": "the backend cannot build reports now"}, status=503)
    return web.json_response(body, headers={"Cache-Control": "no-store"})
