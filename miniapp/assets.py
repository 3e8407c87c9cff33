"""The files the pages load, served from memory: the Mini App's own (``miniapp/static``) and
the browser libraries from ``miniapp/node_modules`` (``npm ci`` in ``miniapp/``, pinned by
``package-lock.json``: ``@tonconnect/ui``, Telegram's script from ``@twa-dev/sdk``, the QR code
generator ``qrcode-generator``, libsodium from ``libsodium-wrappers`` for the sealed chat, loaded
by the page when it is first used), so no CDN is needed at run time.

Each file is read once at start, gzipped once, and named in the pages with its content's hash
(``/app/static/app.js?v=1a2b3c…``): a versioned URL is cached for a year (``immutable``), any
other is revalidated (``no-cache`` with an ``ETag``), so a new release is seen at once and an
unchanged file never travels twice.

``COCOON_TONCONNECT_UI_URL`` points the pages at a CDN copy of ``@tonconnect/ui`` instead.
Without either, the pages still load but cannot connect a wallet, and the server says so when
it starts.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import mimetypes
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from backend.settings import Settings

log = logging.getLogger("cocoon.miniapp")

PACKAGE_DIR = Path(__file__).resolve().parent
STATIC_DIR = PACKAGE_DIR / "static"
NODE_MODULES = PACKAGE_DIR / "node_modules"
TONCONNECT_DIST = NODE_MODULES / "@tonconnect" / "ui" / "dist"
TONCONNECT_FILE = "tonconnect-ui.min.js"
TELEGRAM_JS = NODE_MODULES / "@twa-dev" / "sdk" / "src" / "telegram-web-apps.js"
QRCODE_JS = NODE_MODULES / "qrcode-generator" / "dist" / "qrcode.js"
# libsodium (WebAssembly inside, asm.js fallback) and its wrappers: global ``sodium``.
SODIUM_JS = {
    "libsodium.js": "libsodium/dist/modules/libsodium.js",
    "libsodium-wrappers.js": "libsodium-wrappers/dist/modules/libsodium-wrappers.js",
}
TELEGRAM_CDN = "https://telegram.org/js/telegram-web-app.js"

STATIC_ROUTE = "/app/static/"
VENDOR_ROUTE = "/app/vendor/"
TONCONNECT_ROUTE = VENDOR_ROUTE + "tonconnect/"
TELEGRAM_ROUTE = VENDOR_ROUTE + "telegram-web-app.js"
QRCODE_ROUTE = VENDOR_ROUTE + "qrcode.js"

# The page's own scripts, served as one: the shared part first, then each view.
BUNDLE = "cocoon.js"
BUNDLED = [
    "app.js",
    "tonconnect.js",
    "markdown.js",
    "wallet.js",
    "history.js",
    "chat.js",
    "sealed.js",
    "provider.js",
]

IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"
COMPRESSIBLE = ("text/", "application/javascript", "application/json", "image/svg+xml")


@dataclass(frozen=True)
class Asset:
    """One file, as it is served: its bytes, gzipped where that helps, and its version."""

    body: bytes
    content_type: str
    version: str  # the first 16 hex digits of its SHA-256
    gzipped: bytes | None = None

    @classmethod
    def load(cls, path: Path, body: bytes) -> Asset:
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if content_type == "text/javascript":
            content_type = "application/javascript"
        squeezed = None
        if content_type.startswith(COMPRESSIBLE):
            packed = gzip.compress(body, compresslevel=9, mtime=0)
            squeezed = packed if len(packed) < len(body) else None
        return cls(body, content_type, hashlib.sha256(body).hexdigest()[:16], squeezed)


@dataclass
class Files:
    """Files served under one route prefix, by name."""

    route: str
    files: dict[str, Asset] = field(default_factory=dict)

    def add(self, name: str, path: Path) -> None:
        self.files[name] = Asset.load(path, path.read_bytes())

    def bundle(self, name: str, paths: list[Path]) -> None:
        """One file of several (fewer requests: the first load's round trips are its cost)."""
        self.files[name] = Asset.load(Path(name), b"\n".join(p.read_bytes() for p in paths))

    def url(self, name: str) -> str:
        """The versioned URL of ``name`` (cached for a year: its version changes with it)."""
        return f"{self.route}{name}?v={self.files[name].version}"

    async def handle(self, request: web.Request) -> web.Response:
        asset = self.files.get(request.match_info["name"])
        if asset is None:
            raise web.HTTPNotFound()
        etag = f'"{asset.version}"'
        versioned = request.query.get("v") == asset.version
        headers = {
            "Cache-Control": IMMUTABLE if versioned else REVALIDATE,
            "ETag": etag,
            "Vary": "Accept-Encoding",
            "X-Content-Type-Options": "nosniff",
        }
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers=headers)
        body = asset.body
        if asset.gzipped is not None and "gzip" in request.headers.get("Accept-Encoding", ""):
            body = asset.gzipped
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=body, content_type=asset.content_type, headers=headers)


@dataclass(frozen=True)
class Assets:
    tonconnect_url: str | None  # None: no TON Connect (the page says so)
    telegram_url: str
    static: Files
    vendor: Files
    qrcode_url: str | None = None  # None: the deposit address is shown without a QR code
    problems: list[str] = field(default_factory=list)


def find_assets(settings: Settings, node_modules: Path = NODE_MODULES) -> Assets:
    static = Files(STATIC_ROUTE)
    for path in sorted(STATIC_DIR.iterdir()):
        if path.is_file():
            static.add(path.name, path)
    static.bundle(BUNDLE, [STATIC_DIR / name for name in BUNDLED])
    vendor = Files(VENDOR_ROUTE)
    problems = []
    tonconnect = node_modules / "@tonconnect" / "ui" / "dist" / TONCONNECT_FILE
    if settings.tonconnect_ui_url:
        tonconnect_url: str | None = settings.tonconnect_ui_url
    elif tonconnect.is_file():
        vendor.add("tonconnect/" + TONCONNECT_FILE, tonconnect)
        tonconnect_url = vendor.url("tonconnect/" + TONCONNECT_FILE)
    else:
        tonconnect_url = None
        problems.append(
            "Mini App: @tonconnect/ui is not installed, so its pages cannot connect a TON "
            f"wallet. Run `npm ci` in {PACKAGE_DIR} (Node.js 18+), or set "
            "COCOON_TONCONNECT_UI_URL to a copy of tonconnect-ui.min.js on a CDN."
        )
    telegram = node_modules / "@twa-dev" / "sdk" / "src" / "telegram-web-apps.js"
    if telegram.is_file():
        vendor.add("telegram-web-app.js", telegram)
        telegram_url = vendor.url("telegram-web-app.js")
    else:
        telegram_url = TELEGRAM_CDN
    qrcode = node_modules / "qrcode-generator" / "dist" / "qrcode.js"
    qrcode_url = None
    if qrcode.is_file():
        vendor.add("qrcode.js", qrcode)
        qrcode_url = vendor.url("qrcode.js")
    for name, relative in SODIUM_JS.items():
        path = node_modules / relative
        if path.is_file():
            vendor.add(name, path)
        else:
            problems.append(
                f"Mini App: {path.name} is not installed, so the sealed chat cannot run in the "
                f"page. Run `npm ci` in {PACKAGE_DIR}."
            )
            break
    return Assets(tonconnect_url, telegram_url, static, vendor, qrcode_url, problems)


def report(assets: Assets) -> None:
    """Say at startup what the pages will miss."""
    for problem in assets.problems:
        log.warning("%s", problem)
