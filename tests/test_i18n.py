"""Every user-visible string of the bot and the Mini App is in every catalog, translated, with
the same placeholders as its English source."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from babel.messages.extract import extract_from_dir
from babel.messages.pofile import read_po

from backend.i18n import LANGUAGES, catalog_path, gettext, pick_language

ROOT = Path(__file__).resolve().parent.parent
KEYWORDS = {
    "_": None,
    "gettext": None,
    "ngettext": (1, 2),
    "N_": None,
    "__": None,
    "lazy_gettext": None,
}
DOMAINS = {
    "bot": [("**.py", "python")],
    "miniapp": [("**.py", "python"), ("**/templates/**.html", "jinja2")],
}
PLACEHOLDER = re.compile(r"\{[a-zA-Z_][a-zA-Z0-9_]*(?:![rsa])?(?::[^{}]*)?\}")


def _source_messages(domain: str) -> set[str]:
    package = ROOT / domain
    found: set[str] = set()
    for _file, _line, message, _comments, _context in extract_from_dir(
        str(package),
        method_map=DOMAINS[domain],
        keywords=KEYWORDS,
        directory_filter=lambda path: "node_modules" not in Path(path).parts,
    ):
        if isinstance(message, tuple):
            found.update(m for m in message if m)
        elif message:
            found.add(message)
    return found


def _catalog(language: str, domain: str) -> dict[str, object]:
    path = catalog_path(language, domain)
    assert path.exists(), f"{path.relative_to(ROOT)} is missing"
    with path.open("rb") as source:
        catalog = read_po(source, locale=language, domain=domain)
    messages: dict[str, object] = {}
    for message in catalog:
        if not message.id:
            continue
        ids = message.id if isinstance(message.id, tuple) else (message.id,)
        for msgid in ids:
            messages[msgid] = message.string
    return messages


def _placeholders(text: str) -> set[str]:
    return {re.sub(r"[!:].*", "", p.strip("{}")) for p in PLACEHOLDER.findall(text)}


@pytest.mark.parametrize("domain", sorted(DOMAINS))
@pytest.mark.parametrize("language", LANGUAGES)
def test_catalog_has_every_string_translated(domain: str, language: str) -> None:
    if not (ROOT / domain / "__init__.py").exists():
        pytest.skip(f"{domain}/ is not a package")
    sources = _source_messages(domain)
    assert sources, f"no translatable strings found in {domain}/"
    catalog = _catalog(language, domain)
    missing = sorted(sources - catalog.keys())
    assert not missing, f"{language}/{domain}.po misses {missing[:10]}"
    problems = []
    for msgid in sorted(sources):
        string = catalog[msgid]
        strings = [s for s in string if s] if isinstance(string, tuple) else [string]
        if language != "en" and not any(strings):
            problems.append(f"untranslated: {msgid!r}")
            continue
        for text in strings:
            if text and _placeholders(text) != _placeholders(msgid):
                problems.append(f"placeholders differ: {msgid!r} -> {text!r}")
    assert not problems, f"{language}/{domain}.po: " + "; ".join(problems[:10])


@pytest.mark.parametrize("domain", sorted(DOMAINS))
@pytest.mark.parametrize("language", LANGUAGES)
def test_catalog_has_no_string_the_code_no_longer_uses(domain: str, language: str) -> None:
    """A msgid no code or template uses is dead weight a translator keeps translating (and a
    sign that its words were changed in the source but not here)."""
    if not (ROOT / domain / "__init__.py").exists():
        pytest.skip(f"{domain}/ is not a package")
    unused = sorted(_catalog(language, domain).keys() - _source_messages(domain))
    assert not unused, f"{language}/{domain}.po has strings no code uses: {unused[:10]}"


def test_language_is_chosen_from_telegram_code() -> None:
    assert pick_language("ru") == "ru"
    assert pick_language("fr-CA") == "fr"
    assert pick_language("pt-br") == "en"
    assert pick_language(None) == "en"


def test_unknown_message_falls_back_to_english_source() -> None:
    assert gettext("ru", "bot", "no such message {x}", x=1) == "no such message 1"
