"""Request and response bodies of the Mini App's JSON API (``/app/api/...``).

Amounts are integer nanoTON written as strings (1 TON = 10^9); every error is
``{"error": {"code", "message"}}`` with a stable code and a message in the caller's language.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Nano = str  # an integer amount of nanoTON, as a string


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    code: str  # stable: backend.errors.ErrorCode
    message: str  # in the page's language
    details: dict[str, str | int] = Field(
        default_factory=dict
    )  # what the page needs to say it itself (miniapp.routes)


class ErrorBody(BaseModel):
    error: ErrorDetail


# ------------------------------------------------------------------------------ me


class Balance(BaseModel):
    available: Nano
    held: Nano


class LinkedWallet(BaseModel):
    address: str  # user-friendly form
    raw: str


class ModelView(BaseModel):
    id: str
    prompt: Nano  # per 1M prompt tokens
    completion: Nano  # per 1M completion tokens
    context_length: int


class TopUpOptions(BaseModel):
    ton: bool  # a deposit wallet is configured
    deposit_address: str | None = None  # for a transfer by hand, with deposit_memo as comment
    presets: list[str]  # decimal GRAM
    stars: bool  # Telegram Stars invoices can be made
    stars_presets: list[int]
    nano_per_star: Nano
    usdt: bool = False  # USDT top-ups are taken (a USDT master and a rate are set)
    nano_per_usdt: Nano | None = None  # what 1 USDT credits now
    usdt_presets: list[str] = []  # decimal USDT


class Me(BaseModel):
    telegram_id: int
    first_name: str
    language: str
    dev: bool
    balance: Balance
    deposit_memo: str
    wallet: LinkedWallet | None
    payout_wallet: LinkedWallet | None
    is_provider: bool
    model: str
    models: list[ModelView]
    topup: TopUpOptions
    network: Literal["mainnet", "testnet"]


# ------------------------------------------------------------------- wallet linking


class ProofPayload(BaseModel):
    payload: str
    ttl_s: int


class TonAccount(BaseModel):
    """``wallet.account`` as TON Connect gives it."""

    model_config = ConfigDict(extra="ignore")
    address: str = Field(max_length=100)
    chain: str = Field(max_length=10)
    walletStateInit: str | None = Field(default=None, max_length=20_000)  # some wallets omit it
    publicKey: str | None = Field(default=None, max_length=128)


class ProofDomain(BaseModel):
    lengthBytes: int = Field(ge=0, le=1024)
    value: str = Field(max_length=1024)


class TonProof(BaseModel):
    """``wallet.connectItems.tonProof.proof``."""

    model_config = ConfigDict(extra="ignore")
    timestamp: int
    domain: ProofDomain
    payload: str = Field(max_length=256)
    signature: str = Field(max_length=256)


class LinkWalletRequest(Strict):
    purpose: Literal["user", "payout"] = "user"
    account: TonAccount
    proof: TonProof


# -------------------------------------------------------------------------- top-up


class TopUpRequest(Strict):
    amount: str = Field(min_length=1, max_length=40, description="decimal TON, e.g. 1.5")


class TonConnectMessage(BaseModel):
    address: str
    amount: Nano
    payload: str


class TonConnectTransaction(BaseModel):
    validUntil: int
    messages: list[TonConnectMessage]
    network: str | None = None


class TopUp(BaseModel):
    amount: Nano
    memo: str
    deposit_address: str
    transaction: TonConnectTransaction


class UsdtTopUpRequest(Strict):
    amount: str = Field(min_length=1, max_length=40, description="decimal USDT, e.g. 12.5")


class UsdtTopUp(BaseModel):
    usdt: str  # decimal USDT, as the wallet will show it
    units: str  # USDT micro-units (10^-6)
    amount: Nano  # what it credits at today's rate
    nano_per_usdt: Nano
    memo: str
    transaction: TonConnectTransaction


class StarsRequest(Strict):
    stars: int = Field(ge=1, le=10_000)


class StarsInvoice(BaseModel):
    invoice_url: str
    stars: int
    amount: Nano


# ------------------------------------------------------------------------- history


class HistoryEntry(BaseModel):
    kind: Literal["deposit", "turn", "payout"]
    at: str  # ISO 8601, UTC
    amount: Nano  # signed: deposits positive, turns and payouts negative
    details: dict[str, Any]


class History(BaseModel):
    items: list[HistoryEntry]
    page: int
    per_page: int
    has_more: bool
    next_cursor: str | None = None  # ?cursor= for the next page: new items never repeat a row


# ------------------------------------------------------------------------ provider


class WorkerEntry(BaseModel):
    worker_id: str
    model: str | None
    tee: str | None
    image: str | None
    state: str
    online: bool
    attestation_expires_at: str | None
    jobs: int
    earned: Nano


class EarningsView(BaseModel):
    available: Nano
    pending: Nano
    paid: Nano
    earned: Nano
    jobs: int


class NextPayoutView(BaseModel):
    kind: Literal["on_its_way", "ready", "after_online", "unknown"]
    at: str | None = None  # ISO 8601, UTC
    online_s: int | None = None  # more online time at the rate so far (after_online)


class EconomicsView(BaseModel):
    online_s: int
    tokens: int
    per_hour: Nano | None  # per hour of online time; None: not online long enough yet
    per_million_tokens: Nano | None
    fees: Nano  # what the network kept of the price of the replies served
    fee_bps: int  # the network's part of each reply's price, 1/10000
    next_payout: NextPayoutView


class ProviderDashboard(BaseModel):
    workers: list[WorkerEntry]
    earnings: EarningsView
    payout_wallet: LinkedWallet | None
    min_withdrawal: Nano
    economics: EconomicsView | None = None


class WithdrawRequest(Strict):
    amount: str = Field(min_length=1, max_length=40, description='decimal TON, or "all"')
    key: str = Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")


class PayoutView(BaseModel):
    id: int
    amount: Nano
    state: str
    destination: str


# ---------------------------------------------------------------------------- chat


class ModelChoice(Strict):
    model: str = Field(max_length=100)


class ChatMessageIn(Strict):
    role: Literal["user", "assistant"]
    content: str = Field(min_length=1)


class ChatRequest(Strict):
    model: str = Field(max_length=100)
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=200)
    conversation: str = Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")


class StopRequest(Strict):
    turn: str = Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")


class PrivacyReport(BaseModel):
    """Who served the turn: what the bot's /privacy shows."""

    worker_id: str
    tee: str  # "tdx" (hardware-attested) or "dev" (software-signed, development only)
    engine: str
    engine_version: str
    key_fingerprint: str  # the usage billed is always signed by this key (backend.dispatch)
    off_machine: bool = False  # its engine sends prompts off the machine (dev TEE only)
    image: str | None = None  # the released worker image its measurements matched
    mrtd: str | None = None
    attested_until: str | None = None  # ISO 8601; None: expired or gone offline since
    # The turn's receipt (GET /v1/receipts/{id}) when the worker's signature on it verified
    # with its attested key: what "verified" is shown from. None: no receipt verified.
    receipt_id: str | None = None


class ChatDone(BaseModel):
    type: Literal["done"] = "done"
    model: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    cost: Nano
    balance: Nano
    privacy: PrivacyReport
