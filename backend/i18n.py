"""Translations from the gettext catalogs in ``locales/<lang>/LC_MESSAGES/<domain>.po``.

One domain per user-facing part: ``bot`` (the Telegram bot) and ``miniapp`` (the Mini App's
pages and API messages). The ``.po`` files are the source of truth and are read directly with
Babel (no compiled ``.mo`` files to keep in step); English is the source language.
"""

from __future__ import annotations

import io
from functools import cache
from pathlib import Path

from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.support import Translations

LOCALES_DIR = Path(__file__).resolve().parent.parent / "locales"
LANGUAGES = ("en", "ru", "fr")
DEFAULT_LANGUAGE = "en"
LANGUAGE_NAMES = {"en": "English", "ru": "Русский", "fr": "Français"}


def pick_language(code: str | None) -> str:
    """The supported language closest to a Telegram ``language_code`` (``ru``, ``fr-CA``)."""
    if code:
        base = code.strip().lower().replace("_", "-").split("-", 1)[0]
        if base in LANGUAGES:
            return base
    return DEFAULT_LANGUAGE


def catalog_path(language: str, domain: str, root: Path = LOCALES_DIR) -> Path:
    return root / language / "LC_MESSAGES" / f"{domain}.po"


@cache
def translations(language: str, domain: str) -> Translations:
    """The compiled catalog of one language and domain (empty, so English, when missing)."""
    path = catalog_path(language, domain)
    if not path.exists():
        return Translations()
    with path.open("rb") as source:
        catalog = read_po(source, locale=language, domain=domain)
    buffer = io.BytesIO()
    write_mo(buffer, catalog)
    buffer.seek(0)
    return Translations(buffer, domain=domain)


def gettext(language: str, domain: str, message: str, /, **values: object) -> str:
    """``message`` in ``language``, with ``{placeholders}`` filled from ``values``."""
    text = translations(pick_language(language), domain).gettext(message)
    return text.format(**values) if values else text


def ngettext(
    language: str, domain: str, singular: str, plural: str, n: int, /, **values: object
) -> str:
    text = translations(pick_language(language), domain).ngettext(singular, plural, n)
    return text.format(n=n, **values)
