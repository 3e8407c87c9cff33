"""The browser libraries the pages load: served from ``miniapp/node_modules`` (``npm ci`` in
``miniapp/``, pinned by ``package-lock.json``), so no CDN is needed at run time.

``COCOON_TONCONNECT_UI_URL`` points the pages at a CDN copy of ``@tonconnect/ui`` instead.
Without either, the pages still load but cannot connect a wallet, and the server says so when
it starts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from backend.settings import Settings

log = logging.getLogger("cocoon.miniapp")

PACKAGE_DIR = Path(__file__).resolve().parent
NODE_MODULES = PACKAGE_DIR / "node_modules"
TONCONNECT_DIST = NODE_MODULES / "@tonconnect" / "ui" / "dist"
TONCONNECT_FILE = "tonconnect-ui.min.js"
TELEGRAM_JS = NODE_MODULES / "@twa-dev" / "sdk" / "src" / "telegram-web-apps.js"
TELEGRAM_CDN = "https://telegram.org/js/telegram-web-app.js"

TONCONNECT_ROUTE = "/app/vendor/tonconnect/"
TELEGRAM_ROUTE = "/app/vendor/telegram-web-app.js"


@dataclass(frozen=True)
class Assets:
    tonconnect_url: str | None  # None: no TON Connect (the page says so)
    telegram_url: str
    tonconnect_dir: Path | None = None  # served by us
    telegram_file: Path | None = None
    problems: list[str] = field(default_factory=list)


def find_assets(settings: Settings, node_modules: Path = NODE_MODULES) -> Assets:
    dist = node_modules / "@tonconnect" / "ui" / "dist"
    telegram = node_modules / "@twa-dev" / "sdk" / "src" / "telegram-web-apps.js"
    problems = []
    tonconnect_dir: Path | None = None
    if settings.tonconnect_ui_url:
        tonconnect_url: str | None = settings.tonconnect_ui_url
    elif (dist / TONCONNECT_FILE).is_file():
        tonconnect_dir = dist
        tonconnect_url = TONCONNECT_ROUTE + TONCONNECT_FILE
    else:
        tonconnect_url = None
        problems.append(
            "Mini App: @tonconnect/ui is not installed, so its pages cannot connect a TON "
            f"wallet. Run `npm ci` in {PACKAGE_DIR} (Node.js 18+), or set "
            "COCOON_TONCONNECT_UI_URL to a copy of tonconnect-ui.min.js on a CDN."
        )
    if telegram.is_file():
        telegram_file: Path | None = telegram
        telegram_url = TELEGRAM_ROUTE
    else:
        telegram_file, telegram_url = None, TELEGRAM_CDN
    return Assets(tonconnect_url, telegram_url, tonconnect_dir, telegram_file, problems)


def report(assets: Assets) -> None:
    """Say at startup what the pages will miss."""
    for problem in assets.problems:
        log.warning("%s", problem)
