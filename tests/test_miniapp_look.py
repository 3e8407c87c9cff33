"""What a person sees in the Mini App: every view at 360 px under Telegram's real iOS-light and
Android-dark theme parameters, in English, Russian and French. Each fails on horizontal
overflow, on a card or row whose background is the page's own, on a tab label clipped, on a
tap target under 44 px; screenshots of every view land in ``tests/artifacts/miniapp/``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select

from backend import accounts
from backend.models import TonWallet
from tests.support.miniapp_browser import (
    TELEGRAM_CLIENT,
    THEMES,
    launch_hash,
    open_page,
    screenshot,
)
from tests.support.miniapp_helpers import TON, TestWallet
from tests.support.miniapp_stack import Stack, browser_module, no_console_errors, seeded_provider

pytestmark, stack_fixture, context_fixture = browser_module()

VIEWS = ("wallet", "history", "chat", "provider")

# Everything on the view on screen that breaks the look, as a list of sentences.
PROBLEMS = (Path(__file__).parent / "support" / "miniapp_look.js").read_text()


async def seeded_history(stack: Stack, telegram_id: int) -> None:
    """A provider with a top-up, a paid reply and a payout to a long address in its history."""
    user_id = await seeded_provider(stack, telegram_id)
    wallet = TestWallet()
    async with stack.db.session() as session, session.begin():
        existing = await session.scalar(
            select(TonWallet).where(TonWallet.user_id == user_id, TonWallet.purpose == "payout")
        )
        if existing is not None:
            return
        await session.execute(
            insert(TonWallet).values(
                user_id=user_id,
                purpose="payout",
                address=wallet.raw,
                public_key=wallet.account()["publicKey"],
            )
        )
    await stack.ledger.credit_deposit(user_id, 2 * TON, f"dep:look:{telegram_id}")
    await accounts.withdraw(stack.ledger, stack.settings, user_id, TON, f"look:{telegram_id}")


@pytest.mark.parametrize("language", ["en", "ru", "fr"])
@pytest.mark.parametrize("theme", sorted(THEMES))
async def test_every_view_looks_native_at_360_px(
    stack: Stack, context: Any, theme: str, language: str
) -> None:
    telegram_id = 9900 + sorted(THEMES).index(theme) * 10 + ["en", "ru", "fr"].index(language)
    await seeded_history(stack, telegram_id)
    page = await open_page(context, stack.origin)
    await page.add_init_script(TELEGRAM_CLIENT)
    platform = theme.split("-")[0]
    url = "/app" + launch_hash(telegram_id, language=language, platform=platform, theme=theme)
    await page.goto(stack.origin + url)
    await page.wait_for_selector("#balance:not(.skeleton)")
    await page.wait_for_selector("#tab-provider:visible")
    colours = THEMES[theme]
    page_colour = await page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert page_colour == rgb(colours["secondary_bg_color"])  # the page on secondary_bg_color
    events = dict(await page.evaluate("window.telegramEvents.map(e => [e[0], e[1]])"))
    assert events["web_app_set_header_color"] == {"color_key": "secondary_bg_color"}
    assert events["web_app_set_background_color"] == {"color": colours["secondary_bg_color"]}
    for view in VIEWS:
        await page.click(f"nav a[data-tab='{view}']")
        await page.wait_for_selector(f"[data-view='{view}']:not([hidden])")
        ready = {
            "wallet": "#balance:not(.skeleton)",
            "history": "#history-list[aria-busy='false'] .item-payout",
            "chat": "#model option",
            "provider": "#workers li",
        }[view]
        await page.wait_for_selector(ready, state="attached")
        if view == "history":
            await page.click("#history-list .item-payout .item-open")  # its details, opened
        problems = await page.evaluate(PROBLEMS)
        await screenshot(page, f"look-{theme}-{language}-{view}")
        assert problems == [], f"{view}: {problems}"
    no_console_errors(page, expected=("ERR_", "TON_CONNECT"))


def rgb(hex_colour: str) -> str:
    value = hex_colour.lstrip("#")
    r, g, b = (int(value[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgb({r}, {g}, {b})"


async def test_a_theme_change_is_followed_at_once(stack: Stack, context: Any) -> None:
    await seeded_provider(stack, 9950)
    page = await open_page(context, stack.origin)
    await page.add_init_script(TELEGRAM_CLIENT)
    await page.goto(stack.origin + "/app" + launch_hash(9950, platform="ios", theme="ios-light"))
    await page.wait_for_selector("#balance:not(.skeleton)")
    dark = THEMES["android-dark"]
    await page.evaluate(
        "theme => Telegram.WebView.receiveEvent('theme_changed', {theme_params: theme})", dark
    )
    assert await page.evaluate("getComputedStyle(document.body).backgroundColor") == rgb(
        dark["secondary_bg_color"]
    )
    card = await page.evaluate("getComputedStyle(document.querySelector('.card')).backgroundColor")
    assert card != rgb(dark["secondary_bg_color"])
    assert await page.evaluate("document.documentElement.dataset.scheme") == "dark"
    # Safe-area insets (the home bar, a fullscreen header) keep the tab bar and page clear.
    insets = {"top": 0, "bottom": 34, "left": 0, "right": 0}
    await page.evaluate("i => Telegram.WebView.receiveEvent('safe_area_changed', i)", insets)
    content = {"top": 56, "bottom": 0, "left": 0, "right": 0}
    await page.evaluate(
        "i => Telegram.WebView.receiveEvent('content_safe_area_changed', i)", content
    )
    nav = await page.evaluate("getComputedStyle(document.querySelector('nav.tabs')).paddingBottom")
    top = await page.evaluate("getComputedStyle(document.body).paddingTop")
    assert nav == "34px" and top == "56px"


async def test_development_mode_follows_the_browsers_scheme(stack: Stack, context: Any) -> None:
    await seeded_provider(stack, 9951)
    for scheme, page_colour in (("light", "rgb(239, 239, 244)"), ("dark", "rgb(28, 28, 29)")):
        page = await open_page(context, stack.origin)
        await page.emulate_media(color_scheme=scheme)
        await page.goto(stack.origin + "/app" + launch_hash(9951, theme=None))
        await page.wait_for_selector("#balance:not(.skeleton)")
        assert await page.evaluate("getComputedStyle(document.body).backgroundColor") == page_colour
        card = await page.evaluate(
            "getComputedStyle(document.querySelector('.card')).backgroundColor"
        )
        assert card != page_colour
        await screenshot(page, f"look-browser-{scheme}")
        await page.close()
