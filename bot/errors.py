"""The bot's words for a refusal (a turn's, the account's): one text per error code.

Amounts in the details (``needed``, ``available``, ``minimum``, nano units) are shown in GRAM; a
turn's texts name the ``model``.
"""

from __future__ import annotations

from backend.errors import CocoonError, ErrorCode
from backend.money import format_gram
from bot.i18n import N_, _

TEXTS: dict[ErrorCode, str] = {
    # a chat turn
    ErrorCode.INSUFFICIENT_BALANCE: N_(
        "Not enough balance for this message: it can cost up to {needed} and you have "
        "{available}. Top up with /topup."
    ),
    ErrorCode.UNKNOWN_MODEL: N_(
        "The model {model} is not available any more. Choose another with /model."
    ),
    ErrorCode.NO_WORKER: N_(
        "No worker is serving {model} right now. Please try again in a minute."
    ),
    ErrorCode.TIMEOUT: N_("The worker stopped responding. You were not charged; please try again."),
    ErrorCode.CANCELLED: N_("Stopped before the first word. You were not charged."),
    ErrorCode.INVALID_REQUEST: N_(
        "This conversation is too long for the model. Start over with /new."
    ),
    ErrorCode.WORKER_ERROR: N_(
        "The worker could not answer. You were not charged; please try again."
    ),
    ErrorCode.WORKER_MISBEHAVED: N_(
        "The worker broke the limits of this answer and was stopped. You paid only for the "
        "text you received; please try again."
    ),
    # a withdrawal
    ErrorCode.NO_PAYOUT_WALLET: N_("Link a payout wallet first: /provider."),
    ErrorCode.BELOW_MINIMUM: N_("The smallest withdrawal is {minimum}."),
    ErrorCode.INSUFFICIENT_FUNDS: N_("That is more than your available earnings ({available})."),
    ErrorCode.INVALID_AMOUNT: N_("The amount must be a positive number of GRAM, like 1.5, or all."),
}
FALLBACK = ErrorCode.WORKER_ERROR
AMOUNTS = ("needed", "available", "minimum")


class _Values(dict[str, object]):
    """Format values; a placeholder with no value shows as a question mark, never an error."""

    def __missing__(self, key: str) -> str:
        return "?"


def code_text(code: ErrorCode, **values: object) -> str:
    """The text of ``code`` in the current language, its placeholders filled from ``values``."""
    shown = _Values(values)
    for name in AMOUNTS:
        amount = values.get(name)
        if isinstance(amount, int):
            shown[name] = format_gram(amount)
    return _(TEXTS.get(code, TEXTS[FALLBACK])).format_map(shown)


def error_text(error: CocoonError, **values: object) -> str:
    """The text of a refusal: its details, and ``values`` the caller knows (the ``model``)."""
    return code_text(error.code, **{**error.details, **values})
