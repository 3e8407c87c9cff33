"""The Mini App's words: API error messages, and gettext for the Jinja2 templates.

Messages are marked with ``N_`` (extracted into ``locales/<lang>/LC_MESSAGES/miniapp.po``) and
translated when an answer is made, in the caller's language. Placeholders are ``{name}``.
"""

from __future__ import annotations

from typing import Any

import jinja2

from backend.i18n import DEFAULT_LANGUAGE, LANGUAGES, pick_language, translations

DOMAIN = "miniapp"


def N_(message: str) -> str:
    """Mark a message for extraction; it is translated later, where the language is known."""
    return message


ERRORS: dict[str, str] = {
    "init_data_missing": N_("Open this page from the Cocoon bot in Telegram."),
    "init_data_invalid": N_(
        "Telegram's signature on this session is not valid. Open the app again from the bot."
    ),
    "init_data_expired": N_(
        "This session is too old. Close the app and open it again from the bot."
    ),
    "invalid_json": N_("The request is not valid JSON."),
    "invalid_request": N_("The request is not valid: {detail}"),
    "invalid_amount": N_("This amount cannot be used: {detail}"),
    "not_found": N_("There is nothing here."),
    "proof_refused": N_("The wallet was not linked: {detail}"),
    "proof_unavailable": N_(
        "Wallet linking is not configured on this server (no TON Connect domain)."
    ),
    "topup_unavailable": N_("Top-ups in TON are not available on this server right now."),
    "stars_unavailable": N_("Payments in Telegram Stars are not available on this server."),
    "stars_failed": N_("Telegram could not make the invoice. Try again in a minute."),
    "not_provider": N_("This page is for providers. Ask the bot with /provider to become one."),
    "no_payout_wallet": N_("Link a payout wallet first."),
    "below_minimum": N_("The smallest withdrawal is {minimum}."),
    "insufficient_funds": N_("That is more than your available earnings ({available})."),
    "invalid_page": N_("That page of the history does not exist."),
    "unknown_model": N_("This model is not available."),
    "insufficient_balance": N_(
        "Your balance is too low for this message: it can cost up to {needed}. Top up first."
    ),
    "no_worker": N_("No worker is serving this model right now. Try again in a minute."),
    "timeout": N_("The worker took too long to answer. You were not charged for it."),
    "cancelled": N_("The reply was stopped."),
    "worker_error": N_("The worker failed while answering. You were not charged for it."),
    "rate_limited": N_("Too many messages in a minute. Wait a moment and send again."),
    "message_too_long": N_("This message is too long (at most {limit} characters)."),
    "internal": N_("Something went wrong on our side. Try again."),
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


def error_message(language: str, code: str, **values: Any) -> str:
    return translate(language, ERRORS.get(code, ERRORS["internal"]), **values)
