"""The browser side of the Mini App tests: headless Chromium (Debian's, never downloaded)
through Playwright, with a TON Connect wallet injected through its JS bridge the way wallet
browsers do, signing in Python (``page.expose_function``)."""

from __future__ import annotations

import base64
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from pytoniq_core import Cell

from backend.ton.comment import decode_comment
from miniapp.assets import NODE_MODULES, TONCONNECT_DIST, TONCONNECT_FILE
from tests.support.env import IN_CI
from tests.support.miniapp_helpers import TestWallet, init_data

CHROMIUM = Path(os.environ.get("COCOON_TEST_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts" / "miniapp"
BRIDGE_KEY = "cocoontest"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def require_browser() -> None:
    """Skip the module when Chromium, Playwright or the npm packages are missing (outside CI;
    in CI that is a failure: `.ci/run` installs them)."""
    missing = []
    if shutil.which(str(CHROMIUM)) is None:
        missing.append(f"Chromium at {CHROMIUM} (apt-get install chromium)")
    if not (TONCONNECT_DIST / TONCONNECT_FILE).is_file():
        missing.append(f"@tonconnect/ui in {NODE_MODULES} (npm ci in miniapp/)")
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (the 'dev' extra)")
    if missing:
        reason = "browser tests need " + "; ".join(missing)
        if IN_CI:
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason, allow_module_level=True)


# Telegram's real theme parameters, as its apps send them (tgWebAppThemeParams). iOS light:
# the page on #efeff4 with white sections, iOS's system colours. Android dark: bg_color and
# section_bg_color both #212121 (cards must not vanish), the page #181818; no bottom bar colour.
THEMES: dict[str, dict[str, str]] = {
    "ios-light": {
        "bg_color": "#ffffff",
        "secondary_bg_color": "#efeff4",
        "section_bg_color": "#ffffff",
        "header_bg_color": "#f8f8f8",
        "bottom_bar_bg_color": "#f2f2f2",
        "text_color": "#000000",
        "hint_color": "#8e8e93",
        "subtitle_text_color": "#8e8e93",
        "section_header_text_color": "#6d6d72",
        "section_separator_color": "#c8c7cc",
        "link_color": "#007aff",
        "accent_text_color": "#007aff",
        "button_color": "#007aff",
        "button_text_color": "#ffffff",
        "destructive_text_color": "#ff3b30",
    },
    "android-dark": {
        "bg_color": "#212121",
        "secondary_bg_color": "#181818",
        "section_bg_color": "#212121",
        "header_bg_color": "#212121",
        "text_color": "#ffffff",
        "hint_color": "#aaaaaa",
        "subtitle_text_color": "#aaaaaa",
        "section_header_text_color": "#8774e1",
        "link_color": "#8774e1",
        "accent_text_color": "#8774e1",
        "button_color": "#8774e1",
        "button_text_color": "#ffffff",
        "destructive_text_color": "#ff595a",
    },
}


def launch_hash(
    telegram_id: int,
    *,
    language: str = "en",
    platform: str | None = None,
    theme: str | None = "ios-light",
    auth_date: int | None = None,
) -> str:
    """The fragment Telegram opens a Mini App with: signed initData, version, theme (None: no
    theme, as a plain browser in development mode has)."""
    parts = {
        "tgWebAppData": init_data(telegram_id, language=language, auth_date=auth_date),
        "tgWebAppVersion": "8.0",
    }
    if theme is not None:
        parts["tgWebAppThemeParams"] = json.dumps(THEMES[theme], separators=(",", ":"))
    if platform:
        parts["tgWebAppPlatform"] = platform
    return "#" + "&".join(f"{key}={quote(value, safe='')}" for key, value in parts.items())


# Telegram's side of the page, played as its apps do: the page's events land in
# window.telegramEvents; a test delivers Telegram's with Telegram.WebView.receiveEvent.
TELEGRAM_CLIENT = """
window.telegramEvents = [];
window.TelegramWebviewProxy = {
  postEvent(name, data) { window.telegramEvents.push([name, data ? JSON.parse(data) : null]); },
};
"""


def wallets_list(origin: str) -> list[dict[str, Any]]:
    """The TON Connect wallets list with only the test wallet (served instead of
    config.ton.org's, so the page makes no outside request)."""
    return [
        {
            "app_name": BRIDGE_KEY,
            "name": "Cocoon Test Wallet",
            "image": f"{origin}/app/static/icon.png",
            "about_url": f"{origin}/app",
            "platforms": ["chrome", "linux"],
            "bridge": [{"type": "js", "key": BRIDGE_KEY}],
        }
    ]


WALLET_BRIDGE = """
(() => {
  const key = "__KEY__";
  const deviceInfo = {
    platform: "linux", appName: key, appVersion: "1.0.0", maxProtocolVersion: 2,
    features: ["SendTransaction", {name: "SendTransaction", maxMessages: 4}],
  };
  const walletInfo = {
    name: "Cocoon Test Wallet", app_name: key, image: location.origin + "/app/static/icon.png",
    about_url: location.origin + "/app", platforms: ["chrome", "linux"],
  };
  let listeners = [];
  let nextId = 1;
  window[key] = { tonconnect: {
    deviceInfo, walletInfo, protocolVersion: 2, isWalletBrowser: true,
    async connect(version, message) {
      const asked = message.items.find((item) => item.name === "ton_proof");
      const manifest = await (await fetch(message.manifestUrl)).json();
      const reply = await window.cocoonWalletConnect(
        new URL(manifest.url).host, asked ? asked.payload : null);
      const items = [{name: "ton_addr", address: reply.address, network: "-239",
                      publicKey: reply.publicKey, walletStateInit: reply.walletStateInit}];
      if (asked) items.push({name: "ton_proof", proof: reply.proof});
      return {event: "connect", id: nextId++, payload: {items, device: deviceInfo}};
    },
    async restoreConnection() {
      return {event: "connect_error", id: nextId++, payload: {code: 100, message: "none"}};
    },
    async send(request) {
      if (request.method === "sendTransaction") {
        const boc = await window.cocoonWalletSend(request.params[0]);
        if (!boc) return {id: request.id, error: {code: 300, message: "User declined"}};
        return {id: request.id, result: boc};
      }
      if (request.method === "disconnect") return {id: request.id, result: {}};
      return {id: request.id, error: {code: 400, message: "unsupported"}};
    },
    listen(callback) {
      listeners.push(callback);
      return () => { listeners = listeners.filter((other) => other !== callback); };
    },
  }};
})();
""".replace("__KEY__", BRIDGE_KEY)


@dataclass
class InjectedWallet:
    """The Python half of the injected wallet: it signs what the page asks for and keeps
    every request, so a test can check what the Mini App asked the wallet to sign."""

    wallet: TestWallet = field(default_factory=TestWallet)
    connects: list[tuple[str, str | None]] = field(default_factory=list)
    transactions: list[dict[str, Any]] = field(default_factory=list)
    decline: bool = False

    def connect(self, domain: str, payload: str | None) -> dict[str, Any]:
        self.connects.append((domain, payload))
        account = self.wallet.account()
        return {
            "address": account["address"],
            "publicKey": account["publicKey"],
            "walletStateInit": account["walletStateInit"],
            "proof": self.wallet.proof(payload, domain) if payload else None,
        }

    def send(self, params: str) -> str | None:
        request = json.loads(params)
        self.transactions.append(request)
        if self.decline:
            return None
        [message] = request["messages"]
        memo = decode_comment(message.get("payload")).memo
        signed = self.wallet.wallet.sign_transfer(
            message["address"],
            int(message["amount"]),
            seqno=0,
            valid_until=int(request.get("valid_until") or request["validUntil"]),
            comment=memo,
        )
        return signed.boc

    @staticmethod
    def body(message: dict[str, Any]) -> Cell:
        return Cell.one_from_boc(base64.b64decode(message["payload"]))


async def open_page(context: Any, origin: str, wallet: InjectedWallet | None = None) -> Any:
    """A page of ``context`` that reaches loopback only, with the wallet injected."""
    page = await context.new_page()
    page.console_errors = []  # type: ignore[attr-defined]
    page.on(
        "console",
        lambda message: message.type == "error" and page.console_errors.append(message.text),  # type: ignore[attr-defined]
    )
    page.on("pageerror", lambda error: page.console_errors.append(str(error)))  # type: ignore[attr-defined]

    async def route(route: Any) -> None:
        url = route.request.url
        if url == "https://config.ton.org/wallets-v2.json":
            await route.fulfill(json=wallets_list(origin))
        elif url.startswith(origin):
            await route.continue_()
        else:
            await route.abort()

    await page.route("**/*", route)
    if wallet is not None:
        await page.expose_function("cocoonWalletConnect", wallet.connect)
        await page.expose_function("cocoonWalletSend", wallet.send)
        await page.add_init_script(WALLET_BRIDGE)
    return page


async def screenshot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")  # shown with pytest -s, and in a failing test's output
    return path
