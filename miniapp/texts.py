"""The Mini App's words: API error messages, and gettext for the Jinja2 templates.

Messages are marked with ``N_`` (extracted into ``locales/<lang>/LC_MESSAGES/miniapp.po``) and
translated when an answer is made, in the caller's language. Placeholders are ``{name}``.
"""

from __future__ import annotations

from typing import Any

import jinja2

from backend.errors import ErrorCode
from backend.i18n import DEFAULT_LANGUAGE, LANGUAGES, pick_language, translations
from backend.money import AmountProblem

DOMAIN = "miniapp"


def N_(message: str) -> str:
    """Mark a message for extraction; it is translated later, where the language is known."""
    return message


# The words of every refusal of the Mini App's API (its HTTP status: miniapp.routes.STATUS).
ERRORS: dict[ErrorCode, str] = {
    ErrorCode.INIT_DATA_MISSING: N_("Open this page from the Cocoon bot in Telegram."),
    ErrorCode.INIT_DATA_INVALID: N_(
        "Telegram's signature on this session is not valid. Open the app again from the bot."
    ),
    ErrorCode.INIT_DATA_EXPIRED: N_(
        "This session is too old. Close the app and open it again from the bot."
    ),
    ErrorCode.INVALID_JSON: N_("The request is not valid JSON."),
    ErrorCode.INVALID_REQUEST: N_("The request is not valid: {detail}"),
    ErrorCode.INVALID_AMOUNT: N_("This amount cannot be used: {detail}"),
    ErrorCode.NOT_FOUND: N_("There is nothing here."),
    ErrorCode.PROOF_REFUSED: N_("The wallet was not linked: {detail}"),
    ErrorCode.PROOF_UNAVAILABLE: N_(
        "Wallet linking is not configured on this server (no TON Connect domain)."
    ),
    ErrorCode.TOPUP_UNAVAILABLE: N_("Top-ups in GRAM are not available on this server right now."),
    ErrorCode.STARS_UNAVAILABLE: N_("Payments in Telegram Stars are not available on this server."),
    ErrorCode.STARS_FAILED: N_("Telegram could not make the invoice. Try again in a minute."),
    ErrorCode.NOT_PROVIDER: N_(
        "This page is for providers. Ask the bot with /provider to become one."
    ),
    ErrorCode.NO_PAYOUT_WALLET: N_("Link a payout wallet first."),
    ErrorCode.BELOW_MINIMUM: N_("The smallest withdrawal is {minimum}."),
    ErrorCode.INSUFFICIENT_FUNDS: N_("That is more than your available earnings ({available})."),
    ErrorCode.INVALID_PAGE: N_("That page of the history does not exist."),
    ErrorCode.UNKNOWN_MODEL: N_("This model is not available."),
    ErrorCode.INSUFFICIENT_BALANCE: N_(
        "Your balance is too low for this message: it can cost up to {needed}. Top up first."
    ),
    ErrorCode.NO_WORKER: N_("No worker is serving this model right now. Try again in a minute."),
    ErrorCode.TIMEOUT: N_("The worker took too long to answer. You were not charged for it."),
    ErrorCode.CANCELLED: N_("The reply was stopped."),
    ErrorCode.WORKER_ERROR: N_("The worker failed while answering. You were not charged for it."),
    ErrorCode.WORKER_MISBEHAVED: N_(
        "The worker broke the limits of this answer and was stopped. You paid only for the "
        "text you received."
    ),
    ErrorCode.RATE_LIMITED: N_("Too many messages in a minute. Wait a moment and send again."),
    ErrorCode.MESSAGE_TOO_LONG: N_("This message is too long (at most {limit} characters)."),
    ErrorCode.INTERNAL: N_("Something went wrong on our side. Try again."),
}


# Why a typed amount was refused (backend.money's grammar; the page checks it with the same).
AMOUNT_PROBLEMS: dict[AmountProblem, str] = {
    AmountProblem.EMPTY: N_("Enter an amount."),
    AmountProblem.FORMAT: N_("Enter digits only, like 1.5."),
    AmountProblem.COMMA: N_("Use a point for decimals, like 1.5."),
    AmountProblem.PRECISION: N_("At most 9 digits after the point."),
    AmountProblem.NOT_WHOLE: N_("Enter digits only, like 1.5."),
    AmountProblem.NOT_POSITIVE: N_("The amount must be more than 0."),
    AmountProblem.TOO_LARGE: N_("This amount is too large."),
}


def translate(language: str, message: str, /, **values: object) -> str:
    text = translations(pick_language(language), DOMAIN).gettext(message)
    return text.format(**values) if values else text


@jinja2.pass_context
def _gettext(context: jinja2.runtime.Context, message: str) -> str:
    return translations(context.get("lang", DEFAULT_LANGUAGE), DOMAIN).gettext(message)


@jinja2.pass_context
def _ngettext(context: jinja2.runtime.Context, singular: str, plural: str, n: int) -> str:
    return translations(context.get("lang", DEFAULT_LANGUAGE), DOMAIN).ngettext(singular, plural, n)


def install(env: jinja2.Environment) -> None:
    """``_()`` and ``ngettext()`` in templates, in the language of the context's ``lang``.
    Old-style: the translated text comes back as is; fill placeholders with ``.format()``."""
    env.add_extension("jinja2.ext.i18n")
    # jinja2.ext.i18n adds this method to the environment at run time; its stubs cannot know.
    env.install_gettext_callables(  # type: ignore[attr-defined]
        gettext=_gettext, ngettext=_ngettext, newstyle=False
    )


def page_language(query_lang: str | None, accept_language: str | None) -> str:
    """The language of a page: ``?lang=``, else the browser's first supported language."""
    if query_lang and query_lang in LANGUAGES:
        return query_lang
    for part in (accept_language or "").split(","):
        base = part.split(";", 1)[0].strip().lower().replace("_", "-").split("-", 1)[0]
        if base in LANGUAGES:
            return base
    return DEFAULT_LANGUAGE


def error_message(language: str, code: ErrorCode, **values: Any) -> str:
    return translate(language, ERRORS.get(code, ERRORS[ErrorCode.INTERNAL]), **values)


def amount_problem(language: str, problem: str) -> str:
    """Why an amount was refused, in ``language`` (an unknown problem: the format's words)."""
    try:
        words = AMOUNT_PROBLEMS[AmountProblem(problem)]
    except ValueError:
        words = AMOUNT_PROBLEMS[AmountProblem.FORMAT]
    return translate(language, words)


def page_errors(language: str) -> dict[str, str]:
    """The words of every error code and amount problem in ``language``, placeholders left in
    (``err_<code>``, ``amount_<problem>``): the page says a refusal in its own language, from
    the code and details the API answers with."""
    words = {f"err_{code.value}": translate(language, text) for code, text in ERRORS.items()}
    words.update(
        {
            f"amount_{problem.value}": translate(language, text)
            for problem, text in AMOUNT_PROBLEMS.items()
        }
    )
    return words
