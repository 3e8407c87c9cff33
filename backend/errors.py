"""Cocoon's error vocabulary: every stable error code, and the one shape of a refusal.

A refusal is a :class:`CocoonError`: a ``code`` from :class:`ErrorCode` (the string clients see
on the wire), a readable English ``message`` (``str(error)``: for logs and the CLI) and the
``details`` a surface needs for its words (amounts in nanoTON, a limit). Each surface turns a
code into its own words once:

* the OpenAI-compatible API: HTTP status and OpenAI error type, ``backend/openai_api/protocol.py``;
* the Mini App: HTTP status in ``miniapp/routes.py``, words in ``miniapp/texts.py``;
* the bot: words in ``bot/errors.py``.

This module imports nothing: every layer may use it.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["CocoonError", "ErrorCode"]


class ErrorCode(StrEnum):
    """Every error code Cocoon answers with. The values never change: clients match on them."""

    # A chat turn (backend.dispatch.TurnError)
    INVALID_REQUEST = "invalid_request"
    UNKNOWN_MODEL = "unknown_model"
    INSUFFICIENT_BALANCE = "insufficient_balance"
    NO_WORKER = "no_worker"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    WORKER_ERROR = "worker_error"
    WORKER_MISBEHAVED = "worker_misbehaved"  # crossed a bound of the turn (backend.bounds)

    # The account (backend.accounts.AccountError)
    NOT_PROVIDER = "not_provider"
    NO_PAYOUT_WALLET = "no_payout_wallet"
    BELOW_MINIMUM = "below_minimum"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    INVALID_AMOUNT = "invalid_amount"
    INVALID_PAGE = "invalid_page"

    # A request at an HTTP edge (the Mini App's API, the OpenAI-compatible API)
    INVALID_JSON = "invalid_json"
    BODY_TOO_LARGE = "body_too_large"
    INVALID_API_KEY = "invalid_api_key"
    NOT_FOUND = "not_found"
    RATE_LIMITED = "rate_limited"
    MESSAGE_TOO_LONG = "message_too_long"
    INTERNAL = "internal"

    # Telegram initData (the Mini App's authentication)
    INIT_DATA_MISSING = "init_data_missing"
    INIT_DATA_INVALID = "init_data_invalid"
    INIT_DATA_EXPIRED = "init_data_expired"

    # Wallets and top-ups (the Mini App)
    PROOF_REFUSED = "proof_refused"
    PROOF_UNAVAILABLE = "proof_unavailable"
    TOPUP_UNAVAILABLE = "topup_unavailable"
    STARS_UNAVAILABLE = "stars_unavailable"
    STARS_FAILED = "stars_failed"


class CocoonError(Exception):
    """A request Cocoon refuses. ``code`` is stable for clients; ``str()`` is readable (the
    code itself when no message is given); ``details`` carries the values for the words."""

    def __init__(
        self, code: ErrorCode | str, message: str | None = None, **details: object
    ) -> None:
        self.code = ErrorCode(code)
        super().__init__(message or self.code.value)
        self.details = details
