"""The bot's words for a refusal (a turn's, the account's): one text per error code.

Amounts in the details (``needed``, ``available``, ``minimum``, nano units) are shown in GRAM; a
turn's texts name the ``model``.
"""

from __future__ import annotations

from backend.errors import CocoonError, ErrorCode
from backend.money import AmountError, AmountProblem, format_gram
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
# A typed amount refused for a reason of its own (backend.money's grammar); the others get
# INVALID_AMOUNT's words.
AMOUNT_PROBLEMS: dict[AmountProblem, str] = {
    AmountProblem.COMMA: N_(
        "Write decimals with a point, like 1.5: {amount} could mean a whole number or a "
        "fraction, so nothing was done."
    ),
    AmountProblem.PRECISION: N_("At most 9 digits after the point: nothing was done."),
    AmountProblem.TOO_LARGE: N_("This amount is too large: nothing was done."),
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


def amount_text(error: AmountError, typed: str) -> str:
    """Why the amount a person ``typed`` was refused, in the current language."""
    words = AMOUNT_PROBLEMS.get(error.problem)
    if words is None:
        return code_text(ErrorCode.INVALID_AMOUNT)
    return _(words).format(amount=typed.strip()[:40])
