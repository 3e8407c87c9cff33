"""Cocoon's settings: one typed object, loaded once, passed down explicitly.

Every field can be set from the environment with the ``COCOON_`` prefix (``COCOON_REDIS_URL``)
or from a ``.env`` file in the working directory. Nested values (the model price table) take
JSON: ``COCOON_MODELS='{"smollm2-135m": {"prompt": 20000000, "completion": 80000000}}'``.
The nested groups (``COCOON_ATTESTATION__<NAME>``, ``COCOON_TON__<NAME>``) are defined here
too, so this module imports nothing of the packages that read it.

It imports nothing heavy.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

NANO_PER_TON = 1_000_000_000
MAX_NANO = 2**63 - 1
"""The largest amount the ledger stores (a signed 64-bit integer)."""

DEFAULT_MODEL = "smollm2-135m"


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "cocoon"


class ModelPrice(BaseModel):
    """Prices of one model, in nanoTON per one million tokens."""

    prompt: int = Field(ge=0, le=MAX_NANO, description="per 1M prompt tokens")
    cached_prompt: int | None = Field(
        default=None, ge=0, le=MAX_NANO, description="per 1M prompt tokens served from cache"
    )
    completion: int = Field(ge=0, le=MAX_NANO, description="per 1M completion tokens")
    context_length: int = Field(default=2048, gt=0, description="tokens the model can attend to")
    vision: bool = Field(
        default=False, description="the model reads images (the bot sends it photos)"
    )

    @model_validator(mode="after")
    def _cached_defaults_to_prompt(self) -> ModelPrice:
        if self.cached_prompt is None:
            self.cached_prompt = self.prompt
        return self


def _default_models() -> dict[str, ModelPrice]:
    # 0.02 TON per 1M prompt tokens, 0.01 cached, 0.08 per 1M completion tokens.
    return {
        DEFAULT_MODEL: ModelPrice(
            prompt=20_000_000, cached_prompt=10_000_000, completion=80_000_000, context_length=2048
        )
    }


# ------------------------------------------------------------- attestation

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
    enrollment_ttl_days: int = Field(
        default=30, ge=1, le=3650, description="life of a provider's reusable enrollment token"
    )
    enrollment_per_hour: int = Field(
        default=20,
        ge=1,
        le=10_000,
        description="workers one reusable enrollment token may onboard per clock hour",
    )
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


# -------------------------------------------------------------- TON payments

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
    page_size: int = Field(default=1000, ge=1, le=1000)
    backoff_max_s: float = Field(default=60.0, gt=0, le=3600)
    payout_ttl_s: int = Field(
        default=120, ge=10, le=3600, description="how long a signed payout message stays valid"
    )
    hot_wallet_kind: Literal["v4r2", "highload_v3"] = Field(
        default="v4r2",
        description="the hot wallet's contract: v4r2 (one payout per message) or highload_v3 "
        "(batches of up to 253 payouts per message); the same words, another address",
    )
    highload_timeout_s: int = Field(
        default=3600,
        ge=60,
        le=86400,
        description="the highload wallet's replay window (part of its address: changing it "
        "changes the wallet)",
    )
    payout_batch_size: int = Field(
        default=253, ge=1, le=253, description="payouts in one highload batch at most"
    )
    deposit_ttl_s: int = Field(
        default=300,
        ge=60,
        le=300,
        description="validUntil of a TON Connect top-up (wallets warn past 5 minutes)",
    )
    proof_domains: list[str] = Field(
        default_factory=list, description="domains a ton_proof may name (the Mini App's host)"
    )
    proof_ttl_s: int = Field(
        default=900, ge=30, le=86400, description="how old a ton_proof may be, and its payload"
    )
    usdt_master: str | None = Field(
        default=None,
        description="the USDT jetton master (any address form); unset: USDT is not taken",
    )
    usdt_nano_per_micro: int = Field(
        default=0,
        ge=0,
        le=10**12,
        description="nanoTON credited per USDT micro-unit (10^-6 USDT); 0: USDT is not taken",
    )

    @field_validator("api_url", "deposit_address", "usdt_master")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value.strip() or None if value else None

    @property
    def base_url(self) -> str:
        return (self.api_url or TONCENTER_URLS[self.network]).rstrip("/")

    @property
    def is_testnet(self) -> bool:
        return self.network == "testnet"

    @property
    def takes_usdt(self) -> bool:
        """USDT deposits are on: a master, a rate and a deposit wallet are set."""
        return bool(self.usdt_master and self.usdt_nano_per_micro and self.deposit_address)


# -------------------------------------------------------------- the settings


class Settings(BaseSettings):
    """All of Cocoon's settings. See the README's settings table."""

    model_config = SettingsConfigDict(
        env_prefix="COCOON_",
        env_file=".env",
        env_file_encoding="utf-8",
        env_nested_delimiter="__",
        extra="ignore",
    )

    # Storage
    data_dir: Path = Field(default_factory=_default_data_dir)
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy async URL; default: SQLite file cocoon.db in data_dir",
    )
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="redis://, rediss://, or redis+sentinel://host:port,.../SERVICE/DB "
        "(workers/redisconn.py)",
    )

    # Web server
    web_host: str = "127.0.0.1"
    web_port: int = Field(default=8080, ge=1, le=65535)
    public_url: str | None = Field(default=None, description="public https URL of cocoon web")

    # Telegram
    bot_token: SecretStr | None = None
    telegram_api_url: str | None = Field(
        default=None, description="base URL of a self-hosted telegram-bot-api server"
    )
    webhook_secret: SecretStr | None = None
    bot_mode: Literal["polling", "webhook", "off"] = Field(
        default="polling",
        description="how the bot gets updates: `cocoon bot` polls; webhook: `cocoon web` serves it",
    )
    bot_metrics_port: int | None = Field(
        default=None, ge=1, le=65535, description="port of `cocoon bot`'s GET /metrics (turns)"
    )
    admin_ids: list[int] = Field(
        default_factory=list, description="Telegram ids allowed the admin commands, JSON list"
    )
    context_key: SecretStr | None = Field(
        default=None,
        description="32-byte key (hex or base64) sealing chat context at rest; "
        "default: a key generated once in secrets_dir/context.key",
    )
    secrets_dir: Path | None = Field(
        default=None,
        description="where generated secrets live (the context key); default "
        "$XDG_CONFIG_HOME/cocoon: outside data_dir (backend.serverkeys)",
    )
    context_ttl_s: int = Field(default=7 * 86_400, gt=0, description="chat context lifetime")
    context_max_messages: int = Field(default=20, ge=2, le=200, description="messages kept")
    group_context: Literal["asker", "topic"] = Field(
        default="asker",
        description="in groups, a context per asker in each topic, or one per topic its "
        "members share (/new and /retry stay each member's own)",
    )
    max_prompt_chars: int = Field(default=8000, gt=0, description="longest message accepted")
    rate_limit_per_minute: int = Field(default=20, gt=0, description="turns per user per minute")
    max_tokens_default: int = Field(default=512, gt=0, description="reply budget of a chat turn")
    stars_nano_per_star: int = Field(
        default=4_000_000, gt=0, le=MAX_NANO, description="nanoTON credited per Telegram Star"
    )
    welcome_credit_nano: int = Field(
        default=0,
        ge=0,
        le=MAX_NANO,
        description="credit each bot user gets once, at their first /start, from the operator "
        "(0: none)",
    )

    # The OpenAI-compatible API (backend/openai_api)
    api_max_concurrent_per_user: int = Field(
        default=16, ge=1, le=100_000, description="API turns one user may run at once"
    )
    api_max_concurrent_per_key: int = Field(
        default=8, ge=1, le=100_000, description="API turns one API key may run at once"
    )
    api_rate_limit_per_key_per_minute: int = Field(
        default=60, ge=1, le=1_000_000, description="API turns one key may start per minute"
    )
    api_queue_timeout_s: float = Field(
        default=30.0,
        ge=0,
        le=600,
        description="how long a turn waits for a free worker slot before a 503 with Retry-After",
    )
    api_idempotency_ttl_s: int = Field(
        default=3600, ge=60, le=86_400, description="how long an Idempotency-Key's result is kept"
    )
    api_cors_origins: list[str] = Field(
        default_factory=lambda: ["*"],
        description='origins browsers may call the API from, JSON list (["*"]: any; []: none)',
    )

    # Mini App
    initdata_max_age_s: int = Field(
        default=86_400, gt=0, description="how old a Mini App's Telegram initData may be"
    )
    miniapp_dev: bool = Field(
        default=False,
        description="accept a locally signed initData for a dev user outside Telegram",
    )
    tonconnect_ui_url: str | None = Field(
        default=None, description="CDN URL of @tonconnect/ui; default: served by cocoon web"
    )
    tonconnect_wallets_url: str | None = Field(
        default=None,
        description="TON's wallets list for TON Connect from the chat; default: pytonconnect's",
    )
    app_name: str = Field(default="Cocoon", description="name shown by TON Connect wallets")

    # Operations
    log_json: bool = Field(default=False, description="JSON log lines (one object per line)")
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING, ERROR")
    hold_timeout_s: int = Field(
        default=900, gt=0, description="a hold still open after this is released by the sweeper"
    )
    worker_snapshot_s: float = Field(
        default=1.0, gt=0, le=60, description="how often the dispatcher re-reads the registry"
    )
    max_workers: int = Field(
        default=10_000, ge=1, le=1_000_000, description="worker index entries read, at most"
    )
    worker_first_token_timeout_s: float = Field(
        default=60.0,
        gt=0,
        le=86_400,
        description="how long a turn waits for its worker's first entry before it is given up "
        "on that worker (then tried once more on another)",
    )
    worker_idle_timeout_s: float = Field(
        default=60.0,
        gt=0,
        le=86_400,
        description="how long a turn waits between two entries of its worker's reply",
    )
    stop_grace_s: float = Field(
        default=8.0, gt=0, le=3600, description="seconds a process takes to stop after SIGTERM"
    )
    metrics_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="port of `cocoon web`'s GET /metrics alone, on COCOON_WEB_HOST (keep it to "
        "the operator's network); none: not served there",
    )
    metrics_token: SecretStr | None = Field(
        default=None,
        min_length=16,
        description="bearer token that opens GET /metrics on the main port; none: /metrics is "
        "not served on the main port (it shows revenue and users' funds)",
    )
    http_header_timeout_s: float = Field(
        default=15.0,
        gt=0,
        le=3600,
        description="a connection whose request line and headers are not all in within this "
        "(from its start, or from its last response) is closed; also the keep-alive idle time",
    )
    http_body_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="a request whose body is not all in within this after its headers is "
        "answered 408 and its connection closed",
    )

    # Money
    models: dict[str, ModelPrice] = Field(default_factory=_default_models)
    provider_share_bps: int = Field(
        default=8000, ge=0, le=10_000, description="provider's share of a turn's cost, 1/10000"
    )
    min_withdrawal_nano: int = Field(default=NANO_PER_TON, gt=0, le=MAX_NANO)

    # Embedded mode (`cocoon up`, `cocoon chat`)
    local_telegram_id: int = Field(
        default=1, gt=0, description="the user `cocoon chat` and the local API key act as"
    )
    dev_credit_nano: int = Field(
        default=NANO_PER_TON,
        ge=0,
        le=MAX_NANO,
        description="development credit `cocoon up` gives the local user once (0: none)",
    )
    worker_engine: str = Field(default="llama-cpp", description="engine of the worker `up` runs")

    # Attestation (COCOON_ATTESTATION__ALLOW_DEV, ...; AttestationSettings above)
    attestation: AttestationSettings = Field(default_factory=AttestationSettings)

    # TON payments (backend/ton; TonSettings above): COCOON_TON__DEPOSIT_ADDRESS, ...
    ton: TonSettings = Field(default_factory=TonSettings)

    @field_validator("database_url")
    @classmethod
    def _no_empty_url(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("metrics_token", mode="before")
    @classmethod
    def _no_empty_token(cls, value: object) -> object:
        return value or None  # COCOON_METRICS_TOKEN= (empty): no token

    @cached_property
    def db_url(self) -> str:
        """The database URL in force: the setting, or SQLite inside the data directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.data_dir / 'cocoon.db'}"

    def price(self, model: str) -> ModelPrice | None:
        return self.models.get(model)

    def default_model(self) -> str:
        """The model of a user who chose none: ``DEFAULT_MODEL`` while it is offered, else the
        first model of ``COCOON_MODELS``."""
        if DEFAULT_MODEL in self.models:
            return DEFAULT_MODEL
        return next(iter(self.models), DEFAULT_MODEL)


def load_settings(**overrides: Any) -> Settings:
    """Read the settings from the environment and ``.env``, with explicit overrides on top."""
    return Settings(**overrides)  # each override is validated as its field
