"""The node's attestation client: it onboards the node, renews its evidence, and says what the
node claims.

With ``--register-url URL --token T`` the node first proves itself to the backend
(:func:`workers.evidence.register_with_backend`): it asks for a nonce, takes evidence bound to
its claims and that nonce (a TDX quote through configfs-tsm, or, with ``--tee dev`` or
``auto`` on a machine without TDX, the development TEE), and receives, sealed to its key, its
worker id and Redis credentials of its own. The claims are its keys, the model id, the digest
of the weights its engine loaded (:mod:`workers.weights`, hashed once and cached by path, size
and times), the engine's kind, version and attested configuration
(:meth:`workers.engines.Engine.attested_config`), and the worker version.

An engine that sends prompts off the machine (:func:`workers.evidence.off_machine_reason`: the
``openai`` engine pointed anywhere but loopback) runs only with the development TEE:
:func:`placement_refusal` stops the node before it loads anything otherwise.

The node attests again before the evidence expires (:meth:`Attestation.renew_forever`) and
when Redis refuses its credentials (:meth:`Attestation.renew`); a refusal revokes it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from workers import redis_auth
from workers.engines import Engine
from workers.evidence import (
    AttestationRefused,
    EvidenceError,
    Registration,
    config_json,
    config_sha256,
    off_machine_reason,
    register_with_backend,
    resolve_tee,
    worker_version,
)
from workers.job_run import describe_error
from workers.node_cli import NodeConfig
from workers.weights import WeightsError, default_cache, weights_digest
from workers.wire import WorkerKeys

__all__ = [
    "Attestation",
    "BackendUnreachable",
    "EngineRefused",
    "loaded_weights_digest",
    "placement_refusal",
]

log = logging.getLogger("cocoon.worker")


class BackendUnreachable(Exception):
    """The backend could not be reached to attest within ``register_wait_s``: not onboarded."""


class EngineRefused(RuntimeError):
    """The engine's configuration is not allowed for this node's TEE (it would send prompts
    off the machine of an attested worker)."""


def placement_refusal(engine: Engine, tee: str) -> str | None:
    """Why ``engine`` may not run with evidence of kind ``tee`` (None: it may; a development
    TEE may run an off-machine engine, and is warned)."""
    reason = off_machine_reason(engine.name, engine.attested_config())
    if reason is None:
        return None
    if resolve_tee(tee) == "dev":
        log.warning("%s: allowed with the development TEE only, and shown so everywhere", reason)
        return None
    return (
        f"{reason}: an attested worker may not send prompts off its machine (point base_url at "
        "a server on loopback inside this TEE, or run with --tee dev for development)"
    )


def loaded_weights_digest(engine: Engine) -> str:
    """The digest of the weights ``engine`` loaded ('' when it loads none itself)."""
    path = engine.weights_path()
    if path is None:
        return ""
    try:
        return weights_digest(path, default_cache())
    except (WeightsError, OSError) as error:
        raise EvidenceError(f"cannot hash the weights the engine loaded: {error}") from error


class Attestation:
    """The node's standing with the backend that attested it (None: a direct dev worker)."""

    def __init__(self, config: NodeConfig, keys: WorkerKeys, engine: Engine) -> None:
        import nacl.signing

        self.config = config
        self.keys = keys
        self.engine = engine
        self.dev_key = nacl.signing.SigningKey.generate()  # the development TEE's software key
        self.registration: Registration | None = None
        self.revoked: AttestationRefused | None = None
        self._renewing = asyncio.Lock()  # a renewal token is good for one attestation
        # The weights' digest, once (the engine is loaded: they do not change under us).
        self.model_sha256: str | None = None

    async def prepare(self) -> None:
        """Hash the weights the engine loaded (in a thread; cached across restarts) and say
        what this node will claim. Raises EvidenceError when they cannot be hashed."""
        if self.model_sha256 is not None:
            return
        self.model_sha256 = await asyncio.to_thread(loaded_weights_digest, self.engine)
        config = self.engine.attested_config()
        log.info(
            "claims: model %s, weights sha256 %s, engine %s %s, configuration sha256 %s %s",
            self.engine.model,
            self.model_sha256 or "(none: the engine loads no weights itself)",
            self.engine.name,
            self.engine.version,
            config_sha256(config),
            config_json(config).decode(),
        )

    def claims(self) -> dict[str, Any]:
        assert self.model_sha256 is not None, "prepare() first"
        return {
            "box_public_key": self.keys.box_public_b64,
            "verify_key": self.keys.verify_key_b64,
            "model": self.engine.model,
            "model_sha256": self.model_sha256,
            "engine": self.engine.name,
            "engine_version": str(self.engine.version)[:64],
            "engine_config": self.engine.attested_config(),
            "worker_version": worker_version(),
        }

    async def attest(self, token: str) -> Registration:
        """Attest with ``token``, retrying while the backend cannot be reached."""
        import aiohttp

        await self.prepare()
        deadline = time.monotonic() + self.config.register_wait_s
        while True:
            try:
                registration = await register_with_backend(
                    self.config.register_url or "",
                    token,
                    self.claims(),
                    self.keys.box_key,
                    tee=self.config.tee,
                    dev_key=self.dev_key,
                )
            except (aiohttp.ClientError, OSError, TimeoutError) as error:
                if time.monotonic() > deadline:
                    raise BackendUnreachable(
                        f"the backend at {self.config.register_url} could not be reached for "
                        f"{self.config.register_wait_s:g} s ({describe_error(error)})"
                    ) from error
                log.warning("backend not reachable for attestation (%s); retrying", error)
                await asyncio.sleep(1.0)
                continue
            if not registration.redis_url and self.registration is not None:  # a renewal
                registration = registration.model_copy(
                    update={
                        "redis_url": self.registration.redis_url,
                        "redis_ca_pem": self.registration.redis_ca_pem,
                    }
                )
            problem = redis_auth.tls_refusal(registration.redis_url, registration.tee)
            if problem:
                raise redis_auth.TlsRefused(problem)
            self.registration = registration
            log.info(
                "attested as %s: tee=%s%s, until %s",
                registration.worker_id,
                registration.tee,
                " (development TEE, not hardware-attested)" if registration.tee == "dev" else "",
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(registration.expires_at)),
            )
            return registration

    async def renew(self) -> Registration:
        """Attest again with the renewal token (one renewal at a time: a second caller gets
        the first one's result). Raises AttestationRefused, TlsRefused, or a network error."""
        assert self.registration is not None
        token = self.registration.renewal_token
        async with self._renewing:
            if self.registration.renewal_token != token:  # renewed meanwhile
                return self.registration
            return await self.attest(token)

    def refused(self, error: Exception) -> None:
        log.critical("re-attestation refused, the worker is revoked: %s", error)
        self.revoked = (
            error if isinstance(error, AttestationRefused) else AttestationRefused(0, [str(error)])
        )

    async def renew_forever(self) -> None:
        """Attest again before the evidence expires. Returns only when refused (revoked)."""
        while True:
            assert self.registration is not None
            left = self.registration.expires_at - time.time()
            await asyncio.sleep(max(1.0, left - max(30.0, min(3600.0, left / 10))))
            try:
                await self.renew()
            except (AttestationRefused, redis_auth.TlsRefused) as error:
                self.refused(error)
                return
            except Exception as error:
                log.warning("re-attestation failed (%s); trying again", type(error).__name__)
                await asyncio.sleep(30)
