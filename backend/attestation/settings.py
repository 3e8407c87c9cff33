"""Attestation settings (``COCOON_ATTESTATION__<NAME>``), one nested object of :class:`Settings`."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

INTEL_PCS_URL = "https://api.trustedservices.intel.com"


class AttestationSettings(BaseModel):
    """How the backend verifies workers. See the README's settings table."""

    allow_dev: bool = Field(
        default=False,
        description="accept development-TEE evidence and directly registered dev workers",
    )
    policy_file: Path | None = Field(
        default=None,
        description="JSON allow-list of released worker images and accepted TCB statuses",
    )
    pccs_url: str = Field(default=INTEL_PCS_URL, description="PCCS or Intel PCS base URL")
    collateral_dir: Path | None = Field(
        default=None, description="collateral cache on disk; default <data dir>/collateral"
    )
    collateral_refresh_s: int = Field(
        default=3600, ge=0, description="cached collateral younger than this is used as is"
    )
    lifetime_s: int = Field(default=86_400, gt=0, description="how long evidence is good for")
    nonce_ttl_s: int = Field(default=300, gt=0, description="a nonce must be used this soon")
    token_ttl_s: int = Field(default=7 * 86_400, gt=0, description="registration token life")
    worker_redis_url: str | None = Field(
        default=None,
        description="Redis URL workers are told (rediss:// for attested workers); "
        "default COCOON_REDIS_URL",
    )
    worker_redis_ca_file: Path | None = Field(
        default=None,
        description="PEM CA bundle given to workers to check the worker Redis URL's TLS "
        "certificate; default: the worker's system CAs",
    )
    default_capacity: int = Field(
        default=64,
        ge=1,
        le=1_000_000,
        description="jobs at once dispatched to a worker whose image the policy gives no "
        "max_capacity (and to unattested dev workers)",
    )
    users_check_s: float = Field(
        default=1.0,
        gt=0,
        le=3600,
        description="how often cocoon web checks that Redis was not restarted (then recreates "
        "missing worker users at once; every 10 such checks regardless)",
    )
    require_nvidia: bool = Field(
        default=False, description="refuse TDX evidence that carries no NVIDIA GPU evidence"
    )
