"""Worker onboarding: token → nonce → evidence → registered, with Redis credentials of its own.

HTTP API (served by ``cocoon web``; request and response bodies are JSON):

``POST /v1/workers/nonce`` ``{"token": T}``
    → 200 ``{"nonce": N, "expires_in": seconds}``; 401 for an unknown or used token.
``POST /v1/workers/register`` ``{"token": T, "evidence": Evidence}``
    → 200 ``{"accepted": true, "worker_id", "tee", "image", "expires_at", "sealed"}`` where
    ``sealed`` is base64 of a libsodium sealed box, to the worker's claimed X25519 key, holding
    :class:`Credentials` (its Redis URL with its own ACL user, its renewal token). Only the
    worker whose key the evidence binds can open it.
    → 403 ``{"accepted": false, "reasons": [...]}`` when the evidence is refused; 400 for a
    malformed body; 401 for an unknown or used token. 503 when the backend cannot decide now
    (no usable collateral, Redis refuses), 500 for a fault of the backend's own: neither is a
    refusal, neither spends the nonce or the token, and a renewal that meets one revokes nothing.

``T`` is a provider's one-time registration token (``cocoon provider token``), a provider's
reusable enrollment token (``cce_...``, :mod:`backend.attestation.enrollment`: it onboards any
number of workers, each attested in full, at most ``COCOON_ATTESTATION__ENROLLMENT_PER_HOUR``
an hour, 429 past that; 401 with the reason once it is revoked or expired) or, to attest
again before the evidence expires, the renewal token from the previous credentials. A refused
re-attestation revokes the worker: its record, its registry entry and its Redis user go, and it
leaves dispatch at once. :func:`sweep` does the same for workers whose evidence expired.

Shared state is the backend's: an accepted worker is put in the worker index here, with the
capacity the policy allows its image (``AttestationRecord.capacity``); it leaves the index when
it is revoked or expires. A worker outside the development TEE is told only a ``rediss://``
URL (``COCOON_ATTESTATION__WORKER_REDIS_URL``, with the CA bundle of
``COCOON_ATTESTATION__WORKER_REDIS_CA_FILE`` in its credentials); a backend configured with a
plain ``redis://`` one answers 503 to such a worker and decides nothing.

Redis restarts. ACL users live in the server's memory, not in its data. The SHA-256 of each
worker's password is kept next to its record (:func:`store.keep_acl_digest`), and
:meth:`Onboarding.restore_users` recreates the users of unexpired workers that Redis no longer
knows, with the same password: at start-up, as soon as Redis's ``run_id`` changes (a restart
or a failover) and every ten checks regardless (the keeper task of
:func:`backend.attestation.routes.setup`). A renewal whose worker has no user is given one the
same way; a node whose credentials Redis refuses attests again with its renewal token.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import nacl.public
import redis.asyncio as aioredis
from aiohttp import web
from pydantic import BaseModel, ValidationError

from backend.attestation import acl, enrollment, report, store
from backend.attestation.verifier import Verdict, Verifier, VerifierUnavailable
from backend.db import Database
from backend.settings import Settings
from workers import redisconn, registry
from workers.evidence import Evidence, config_sha256
from workers.wire import WireError, key_fingerprint

log = logging.getLogger("cocoon.attestation")

MAX_CA_BYTES = 256 * 1024


class Credentials(BaseModel):
    """What a registered worker receives, sealed to its key."""

    worker_id: str
    redis_url: str  # empty after a renewal: the worker keeps the credentials it has
    expires_at: float
    renewal_token: str
    tee: str
    redis_ca_pem: str | None = None  # the CA bundle that signs the Redis server's certificate


class OnboardingError(Exception):
    def __init__(self, status: int, message: str, reasons: list[str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reasons = reasons or [message]


def tls_problem(base: str, tee: str) -> str | None:
    """Why ``base`` may not be given to a worker of ``tee`` (None: it may)."""
    if not redisconn.lacks_tls(base, tee):
        return None
    scheme = urlsplit(base).scheme
    return (
        f"this backend tells workers a {scheme}:// Redis URL, and a worker outside the "
        "development TEE is given only rediss:// (TLS): the operator must set "
        "COCOON_ATTESTATION__WORKER_REDIS_URL to a rediss:// URL; nothing was decided"
    )


def worker_redis_url(base: str, user: str, password: str) -> str:
    """``base`` (one server, or the sentinels of a primary) with a worker's user in it."""
    return redisconn.with_credentials(base, user, password)


class Onboarding:
    """The service behind the routes; one per web process."""

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        verifier: Verifier,
        *,
        clock: Callable[[], float] = time.time,
        db: Database | None = None,
    ) -> None:
        self.settings = settings
        self.db = db  # when set, worker states are recorded and providers notified
        self.att = settings.attestation
        self.redis = redis
        self.verifier = verifier
        self.clock = clock
        self._ca_pem: str | None = None

    async def nonce(self, token: Any) -> dict[str, Any]:
        grant = await self._grant(token)
        if grant.kind == "enrollment":
            now = self.clock()
            per_hour = self.att.enrollment_per_hour
            if not await enrollment.count_nonce(self.redis, grant.token_hash, per_hour, now):
                raise OnboardingError(
                    429,
                    "this enrollment token asked for too many nonces this hour; try again in "
                    f"{enrollment.wait_s(now)} s",
                )
        nonce = await store.issue_nonce(self.redis, grant, self.att.nonce_ttl_s)
        return {"nonce": nonce, "expires_in": self.att.nonce_ttl_s}

    async def register(self, token: Any, evidence_data: Any) -> dict[str, Any]:
        grant = await self._grant(token)
        try:
            evidence = Evidence.model_validate(evidence_data)
        except ValidationError as error:
            first = error.errors(include_input=False, include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"])
            raise OnboardingError(400, f"malformed evidence: {where}: {first['msg']}") from None
        claims = evidence.claims
        # The nonce is checked now and used up once a decision is made: a backend fault
        # (503, 500) decides nothing, and the worker may try again with the same evidence.
        refused = await store.check_nonce(self.redis, claims.nonce, grant)
        try:
            worker_id = "w-" + key_fingerprint(claims.box_public_key, claims.verify_key)
        except WireError as error:
            if refused is None:
                await store.consume_nonce(self.redis, claims.nonce, grant)
            raise OnboardingError(400, f"malformed evidence: the claimed keys: {error}") from None
        reasons = [refused] if refused else []
        if grant.kind == "renewal" and worker_id != grant.worker_id:
            reasons.append("a renewal token attests the same worker keys again, not new ones")
        verdict = None
        if not reasons:
            try:
                verdict = await self.verifier.verify(evidence)
            except VerifierUnavailable as error:
                log.warning("worker %s: evidence not verified now: %s", worker_id, error)
                raise OnboardingError(
                    503,
                    "the backend cannot verify evidence right now; nothing was decided: try "
                    "again later (the nonce stays good until it expires)",
                    [str(error)],
                ) from None
            reasons = list(verdict.reasons)
        problem = None if reasons else tls_problem(self._base_url(), evidence.tee)
        if problem:  # accepted, but this backend may not tell it a plain URL: decide nothing
            log.error("worker %s not registered: %s", worker_id, problem)
            raise OnboardingError(503, problem)
        if refused is None:
            used = await store.consume_nonce(self.redis, claims.nonce, grant)
            if used and not reasons:  # a concurrent attempt with this nonce was decided first
                reasons = [used]
        if reasons:
            log.warning(
                "worker %s refused (tee=%s): %s", worker_id, evidence.tee, "; ".join(reasons)
            )
            if grant.kind == "renewal" and grant.worker_id:
                await self.revoke(grant.worker_id, record=False)
                await store.consume_token(self.redis, token)
            await self._record(
                grant.worker_id or worker_id,
                "failed",
                provider_id=grant.provider_id,
                model=claims.model,
                tee=evidence.tee,
                note="; ".join(reasons)[:1000],
            )
            raise OnboardingError(403, "evidence refused", reasons)
        if verdict is None:  # no reason to refuse, so the verifier ran; fail closed all the same
            raise OnboardingError(403, "evidence refused", ["the evidence was not verified"])
        now = self.clock()
        token_ttl_ms = 0
        if grant.kind == "enrollment":  # reusable: one of this hour's onboardings is taken
            await self._take_enrollment_slot(grant, now)
        else:
            token_ttl_ms = await store.token_ttl_ms(self.redis, token)
            if not await store.consume_token(self.redis, token):
                raise OnboardingError(401, "the token was used meanwhile")
        try:
            reply = await self._admit(worker_id, evidence, grant, verdict)
        except Exception:
            # The backend failed after the decision: give the worker its token (or its hour's
            # onboarding) and nonce back, so that it can try again rather than ask its
            # operator for a new token.
            with contextlib.suppress(Exception):
                if grant.kind == "enrollment":
                    await enrollment.release(self.redis, grant.token_hash, now)
                else:
                    await store.restore_token(self.redis, token, grant, token_ttl_ms)
                await store.restore_nonce(self.redis, claims.nonce, grant, self.att.nonce_ttl_s)
            raise
        if grant.enrollment_id is not None and self.db is not None:
            try:
                await enrollment.note_onboarded(self.db, grant.enrollment_id)
            except Exception as error:  # a count for the provider's list: best effort
                log.warning("enrollment %s: onboarding not counted: %s", grant.enrollment_id, error)
        return reply

    async def _take_enrollment_slot(self, grant: store.TokenGrant, now: float) -> None:
        per_hour = self.att.enrollment_per_hour
        if not await enrollment.reserve(self.redis, grant.token_hash, per_hour, now):
            raise OnboardingError(
                429,
                f"this enrollment token has onboarded {per_hour} workers this hour, its limit; "
                f"try again in {enrollment.wait_s(now)} s (the nonce stays good until it "
                "expires)",
            )

    async def _admit(
        self, worker_id: str, evidence: Evidence, grant: store.TokenGrant, verdict: Verdict
    ) -> dict[str, Any]:
        now = self.clock()
        expires_at = now + self.att.lifetime_s
        claims = evidence.claims
        record = registry.AttestationRecord(
            worker_id=worker_id,
            tee=evidence.tee,
            box_public_key=claims.box_public_key,
            verify_key=claims.verify_key,
            model=claims.model,
            provider_id=grant.provider_id,
            attested_at=now,
            expires_at=expires_at,
            image=verdict.image,
            measurements=verdict.measurements,
            nvidia=verdict.nvidia,
            capacity=self.verifier.policy.capacity(verdict.image) or self.att.default_capacity,
            engine=claims.engine,
            engine_version=claims.engine_version,
            model_sha256=claims.model_sha256,
            engine_config_sha256=config_sha256(claims.engine_config),
            off_machine=verdict.off_machine,
        )
        redis_url, digest = await self._credentials(worker_id, grant)
        await store.keep_acl_digest(self.redis, worker_id, digest, expires_at)
        await registry.write_attestation(self.redis, record)
        await report.keep_evidence(self.redis, worker_id, evidence, expires_at)
        await registry.add_to_index(self.redis, worker_id, now)
        await self._record(
            worker_id,
            "attested",
            provider_id=grant.provider_id,
            model=claims.model,
            tee=evidence.tee,
            image=verdict.image,
            mrtd=(verdict.measurements or {}).get("mr_td"),
            attested_at=now,
            expires_at=expires_at,
        )
        renewal = await store.issue_renewal_token(
            self.redis, worker_id, grant.provider_id, self.att.lifetime_s + 3600
        )
        credentials = Credentials(
            worker_id=worker_id,
            redis_url=redis_url,
            expires_at=expires_at,
            renewal_token=renewal,
            tee=evidence.tee,
            redis_ca_pem=self._ca() if redis_url else None,
        )
        box = nacl.public.SealedBox(nacl.public.PublicKey(base64.b64decode(claims.box_public_key)))
        sealed = box.encrypt(credentials.model_dump_json().encode())
        log.info(
            "worker %s attested (%s): tee=%s%s image=%s provider=%s model=%s engine=%s %s%s "
            "until %s",
            worker_id,
            grant.kind,
            evidence.tee,
            " (development TEE, not hardware-attested)" if evidence.tee == "dev" else "",
            verdict.image,
            grant.provider_id,
            claims.model,
            claims.engine,
            claims.engine_version,
            " (sends prompts off the machine)" if verdict.off_machine else "",
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires_at)),
        )
        return {
            "accepted": True,
            "worker_id": worker_id,
            "tee": evidence.tee,
            "image": verdict.image,
            "expires_at": expires_at,
            "sealed": base64.b64encode(sealed).decode(),
        }

    def _base_url(self) -> str:
        return self.att.worker_redis_url or self.settings.redis_url

    def _ca(self) -> str | None:
        """The CA bundle workers are given (read once; None when none is configured)."""
        path = self.att.worker_redis_ca_file
        if path is None:
            return None
        if self._ca_pem is None:
            data = path.read_bytes()[: MAX_CA_BYTES + 1]
            if len(data) > MAX_CA_BYTES or b"-----BEGIN CERTIFICATE-----" not in data:
                raise ValueError(f"{path} is not a PEM CA bundle of at most {MAX_CA_BYTES} bytes")
            self._ca_pem = data.decode("ascii")
        return self._ca_pem

    async def _credentials(self, worker_id: str, grant: store.TokenGrant) -> tuple[str, str]:
        """(the Redis URL to give the worker, its password's SHA-256).

        A renewal keeps the password the worker has (URL ``""``): its user stays as it is, or,
        when Redis lost it (a restart, a failover), is recreated from the kept digest. Else a
        new password, and a URL that carries it.
        """
        if grant.kind == "renewal":
            digest = await acl.user_digest(self.redis, worker_id)
            if digest is not None:
                return "", digest
            kept = (await store.acl_digests(self.redis, [worker_id])).get(worker_id)
            if kept is not None:
                await acl.restore_worker_user(self.redis, worker_id, kept)
                log.warning("worker %s: its Redis user was missing; recreated", worker_id)
                return "", kept
        user, password = await acl.create_worker_user(self.redis, worker_id)
        return worker_redis_url(self._base_url(), user, password), acl.password_digest(password)

    async def _record(
        self,
        worker_id: str,
        state: str,
        *,
        attested_at: float | None = None,
        expires_at: float | None = None,
        **values: Any,
    ) -> None:
        """Remember the worker's state in the database (its provider is told of a change by
        the bot). Best effort: onboarding never fails because the database does."""
        if self.db is None:
            return
        import datetime as dt

        from backend.accounts import record_worker
        from backend.models import WorkerState

        def when(epoch: float | None) -> dt.datetime | None:
            return dt.datetime.fromtimestamp(epoch, dt.UTC) if epoch is not None else None

        try:
            await record_worker(
                self.db,
                worker_id,
                WorkerState(state),
                attested_at=when(attested_at),
                expires_at=when(expires_at),
                **values,
            )
        except Exception as error:  # the database is down: onboarding goes on
            log.warning("worker %s: state %s not recorded: %s", worker_id, state, error)

    async def revoke(self, worker_id: str, *, record: bool = True) -> None:
        """Out of dispatch at once, and its Redis user (and connections) gone."""
        # The kept digest first (so that nothing recreates the user), then the user: once its
        # connections are cut, the node cannot write its entry again.
        await store.forget_acl_digest(self.redis, worker_id)
        with contextlib.suppress(ValueError):
            await acl.delete_worker_user(self.redis, worker_id)
        await registry.revoke_attestation(self.redis, worker_id)
        await self.redis.delete(report.evidence_key(worker_id))  # out of the public report
        log.warning("worker %s revoked: it gets no more jobs", worker_id)
        if record:
            await self._record(worker_id, "revoked")

    async def sweep(self) -> list[str]:
        """Revoke workers whose Redis user outlived their attestation record (expired)."""
        revoked = []
        for worker_id in await acl.worker_users(self.redis):
            if await registry.read_attestation(self.redis, worker_id) is None:
                await self.revoke(worker_id)
                revoked.append(worker_id)
        return revoked

    async def restore_users(self) -> list[str]:
        """Recreate the Redis users of indexed, unexpired workers that Redis does not know
        (after a restart or a failover), each with the password it was given."""
        ids, _bogus = await registry.index_ids(self.redis, self.settings.max_workers)
        present = set(await acl.worker_users(self.redis))
        missing = [w for w in ids if acl.is_attested_id(w) and w not in present]
        if not missing:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for worker_id in missing:
            pipe.exists(registry.attestation_key(worker_id))
        attested = [w for w, alive in zip(missing, await pipe.execute(), strict=True) if alive]
        restored = []
        for worker_id, digest in (await store.acl_digests(self.redis, attested)).items():
            await acl.restore_worker_user(self.redis, worker_id, digest)
            restored.append(worker_id)
        if restored:
            log.warning("recreated the Redis users of %d workers: %s", len(restored), restored)
        return restored

    async def _grant(self, token: Any) -> store.TokenGrant:
        if enrollment.is_enrollment_token(token):
            return await self._enrollment_grant(token)
        grant = await store.lookup_token(self.redis, token) if isinstance(token, str) else None
        if grant is None:
            raise OnboardingError(401, "unknown, expired or already used token")
        return grant

    async def _enrollment_grant(self, token: str) -> store.TokenGrant:
        """A reusable enrollment token's grant: its provider; refused with the reason when it is
        unknown, revoked or expired, or has onboarded its hour's workers."""
        if self.db is None:
            raise OnboardingError(
                503, "this backend has no database: it cannot check enrollment tokens"
            )
        import datetime as dt

        record = await enrollment.lookup(self.db, token)
        if record is None:
            raise OnboardingError(401, "unknown enrollment token")
        now = self.clock()
        problem = record.problem(dt.datetime.fromtimestamp(now, dt.UTC))
        if problem:
            raise OnboardingError(401, problem)
        per_hour = self.att.enrollment_per_hour
        if await enrollment.onboarded_this_hour(self.redis, record.token_hash, now) >= per_hour:
            raise OnboardingError(
                429,
                f"this enrollment token has onboarded {per_hour} workers this hour, its limit; "
                f"try again in {enrollment.wait_s(now)} s",
            )
        return store.TokenGrant(
            "enrollment", record.token_hash, record.provider_id, enrollment_id=record.id
        )


ONBOARDING = web.AppKey("onboarding", Onboarding)
"""The service in the web app (:func:`backend.attestation.routes.setup` puts it there)."""
