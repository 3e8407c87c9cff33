"""Settings of TON payments: one nested model, ``Settings.ton`` (env ``COCOON_TON__...``).

Imports nothing heavy: ``backend.settings`` imports this module.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator

TONCENTER_URLS = {
    "mainnet": "https://toncenter.com",
    "testnet": "https://testnet.toncenter.com",
}


class TonSettings(BaseModel):
    """Deposit wallet, TON Center access, hot wallet and ton_proof rules."""

    network: Literal["mainnet", "testnet"] = "mainnet"
    api_url: str | None = Field(
        default=None,
        description="TON Center base URL; default toncenter.com or testnet.toncenter.com",
    )
    api_key: SecretStr | None = None
    deposit_address: str | None = Field(
        default=None, description="the service's deposit wallet (any address form)"
    )
    hot_wallet_mnemonic: SecretStr | None = Field(
        default=None, description="24 words of the payout hot wallet (wallet v4r2); a secret"
    )
    poll_interval_s: float = Field(default=3.0, gt=0, le=3600)
    page_size: int = Field(default=100, ge=1, le=1000)
    backoff_max_s: float = Field(default=60.0, gt=0, le=3600)
    payout_ttl_s: int = Field(
        default=120, ge=10, le=3600, description="how long a signed payout message stays valid"
    )
    deposit_ttl_s: int = Field(
        default=600, ge=60, le=86400, description="validUntil of a TON Connect top-up"
    )
    proof_domains: list[str] = Field(
        default_factory=list, description="domains a ton_proof may name (the Mini App's host)"
    )
    proof_ttl_s: int = Field(
        default=900, ge=30, le=86400, description="how old a ton_proof may be, and its payload"
    )

    @field_validator("api_url", "deposit_address")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value.strip() or None if value else None

    @property
    def base_url(self) -> str:
        return (self.api_url or TONCENTER_URLS[self.network]).rstrip("/")

    @property
    def is_testnet(self) -> bool:
        return self.network == "testnet"
