"""The bot's translations: ``_()`` in the language of the update being handled.

The language is chosen per update (the user's ``/lang`` choice, else their Telegram language)
by :class:`~bot.middlewares.UserMiddleware`, which sets it with :func:`use_language` for the
handler's duration. Catalogs: ``locales/<lang>/LC_MESSAGES/bot.po`` (domain ``bot``), read
through :mod:`backend.i18n`. Write ``_("... {name} ...").format(name=...)``: the catalog holds
the placeholders, never an f-string.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

from backend.i18n import DEFAULT_LANGUAGE, pick_language, translations

DOMAIN = "bot"

_language: ContextVar[str] = ContextVar("cocoon_bot_language", default=DEFAULT_LANGUAGE)


def current_language() -> str:
    return _language.get()


@contextlib.contextmanager
def use_language(language: str | None) -> Iterator[str]:
    """Translate in ``language`` (any Telegram language code; unsupported ones fall back)."""
    chosen = pick_language(language)
    token = _language.set(chosen)
    try:
        yield chosen
    finally:
        _language.reset(token)


def _(message: str) -> str:
    """``message`` in the current language."""
    return translations(_language.get(), DOMAIN).gettext(message)


def ngettext(singular: str, plural: str, n: int) -> str:
    """The singular or plural form for ``n`` in the current language (``{n}`` not filled)."""
    return translations(_language.get(), DOMAIN).ngettext(singular, plural, n)


def N_(message: str) -> str:
    """Mark ``message`` for the catalog; translate it later with ``_(message)``."""
    return message
