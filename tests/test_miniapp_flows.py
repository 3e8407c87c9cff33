"""The Mini App's behaviour as a person meets it, in headless Chromium: tabs that switch in
place, the loading budget on an emulated "Fast 3G" line, the offline banner, the expired
session, a refused chat message that keeps its text, one invoice per tap, the deposit address
with its QR code and copy, and one amount grammar on the page and the server."""

from __future__ import annotations

import json
import time
from typing import Any

from backend.money import AmountError, parse_amount
from backend.ton.comment import friendly_address
from backend.users import get_or_create_user
from tests.support.miniapp_browser import TELEGRAM_CLIENT, launch_hash, open_page, screenshot
from tests.support.miniapp_helpers import DEPOSIT
from tests.support.miniapp_stack import Stack, browser_module, no_console_errors, seeded_provider

pytestmark, stack_fixture, context_fixture = browser_module()

# Chromium DevTools' "Fast 3G" preset (its network throttling presets).
FAST_3G = {
    "offline": False,
    "latency": 562.5,
    "downloadThroughput": 1.6 * 1024 * 1024 / 8 * 0.9,
    "uploadThroughput": 750 * 1024 / 8 * 0.9,
}
FIRST_DATA_MS = 1500
FIRST_LOAD_BYTES = 200 * 1024
TAB_SWITCH_MS = 100


async def test_tabs_switch_in_place_and_deep_links_work(stack: Stack, context: Any) -> None:
    await seeded_provider(stack, 9960)
    page = await open_page(context, stack.origin)
    documents: list[str] = []
    page.on("request", lambda r: r.resource_type == "document" and documents.append(r.url))
    await page.goto(stack.origin + "/app" + launch_hash(9960))
    await page.wait_for_selector("#balance:not(.skeleton)")
    await page.wait_for_selector("#tab-provider:visible")
    for view in ("history", "chat", "provider", "wallet", "history"):
        # The switch is the page's own work: the best of three (a busy machine can stall one).
        timings = []
        for back in ("wallet" if view != "wallet" else "history", view) * 3:
            elapsed, shown = await page.evaluate(
                """view => {
                    const start = performance.now();
                    document.querySelector(`nav a[data-tab='${view}']`).click();
                    const shown = !document.querySelector(`[data-view='${view}']`).hidden;
                    return [performance.now() - start, shown];
                }""",
                back,
            )
            assert shown, back
            if back == view:
                timings.append(elapsed)
        assert min(timings) <= TAB_SWITCH_MS, (view, timings)
        tab = page.locator(f"nav a[data-tab='{view}']")
        assert await tab.get_attribute("aria-current") == "page"
    assert page.url.startswith(stack.origin + "/app/history")
    await page.go_back()  # the browser's (and Telegram's) back: the view before
    await page.wait_for_selector("[data-view='wallet']:not([hidden])")
    assert len(documents) == 1, documents  # one page load for all of it
    # A deep link opens its view directly.
    await page.goto(stack.origin + "/app/chat" + launch_hash(9960))
    await page.wait_for_selector("[data-view='chat']:not([hidden]) #model option", state="attached")
    assert await page.locator("[data-view='wallet']").is_hidden()
    no_console_errors(page, expected=("ERR_", "TON_CONNECT"))


async def first_open_on_fast_3g(
    context: Any, url: str, *, cached: bool = False
) -> tuple[float, dict[str, float], dict[str, str]]:
    """Open ``url`` in a new page on the emulated line: (ms to the first data on screen, bytes
    per request, url per request). Without ``cached``, the browser's cache is not used."""
    page = await context.new_page()  # no request routing: it would turn the cache off
    cdp = await context.new_cdp_session(page)
    await cdp.send("Network.enable")
    await cdp.send("Network.setCacheDisabled", {"cacheDisabled": not cached})
    await cdp.send("Network.setBlockedURLs", {"urls": ["https://*"]})  # loopback only
    await cdp.send("Network.emulateNetworkConditions", FAST_3G)
    sizes: dict[str, float] = {}
    urls: dict[str, str] = {}
    cdp.on(
        "Network.responseReceived", lambda e: urls.__setitem__(e["requestId"], e["response"]["url"])
    )
    cdp.on(
        "Network.loadingFinished",
        lambda e: sizes.__setitem__(e["requestId"], e["encodedDataLength"]),
    )
    await page.goto(url)
    await page.wait_for_selector("#balance:not(.skeleton)")
    first_data = await page.evaluate(
        "performance.getEntriesByName('cocoon:first-data')[0].startTime"
    )
    await page.wait_for_load_state("networkidle")
    if cached:
        sizes.clear()
        await page.reload()
        await page.wait_for_selector("#balance:not(.skeleton)")
        await page.wait_for_load_state("networkidle")
    await cdp.detach()
    await page.close()
    return float(first_data), sizes, urls


async def test_first_load_fits_the_budget_on_fast_3g(stack: Stack, context: Any) -> None:
    """Measured with Chromium's own network emulation (CDP Network.emulateNetworkConditions,
    the "Fast 3G" preset): the first data on screen within 1.5 s of the navigation, and every
    byte the first open of the wallet transfers (HTML, CSS, scripts, API, TON Connect and the
    QR code library it loads afterwards) within 200 KB. A second open transfers the page and
    its data only: the assets are versioned and cached.

    The bytes are exact. The time is the line's (about 1.25 s of it) plus this machine's: the
    best of three cold opens is taken, so that a busy machine (CI runs beside other work) does
    not fail a page that fits its budget."""
    await get_or_create_user(stack.db, 9961, "en")
    url = stack.origin + "/app" + launch_hash(9961)
    timings: list[float] = []
    for _attempt in range(3):
        first_data, sizes, urls = await first_open_on_fast_3g(context, url)
        timings.append(first_data)
        first = sum(sizes.values())
        print(f"Fast 3G: first data at {first_data:.0f} ms, {first / 1024:.1f} KB transferred")
        assert first <= FIRST_LOAD_BYTES
        assert any("tonconnect-ui" in url for url in urls.values())  # the wallet uses it
        if first_data <= FIRST_DATA_MS:
            break
    for request_id, size in sorted(sizes.items(), key=lambda item: -item[1])[:6]:
        print(f"  {size / 1024:7.1f} KB  {urls.get(request_id, request_id)}")
    assert min(timings) <= FIRST_DATA_MS, timings
    _first_data, again_sizes, _urls = await first_open_on_fast_3g(context, url, cached=True)
    again = sum(again_sizes.values())
    print(f"Fast 3G, opened again: {again / 1024:.1f} KB transferred")
    assert again <= 30 * 1024


async def test_the_chat_alone_loads_no_ton_connect(stack: Stack, context: Any) -> None:
    await get_or_create_user(stack.db, 9962, "en")
    page = await open_page(context, stack.origin)
    scripts: list[str] = []
    page.on("request", lambda r: scripts.append(r.url))
    await page.goto(stack.origin + "/app/chat" + launch_hash(9962))
    await page.wait_for_selector("#model option", state="attached")
    await page.wait_for_load_state("networkidle")
    assert not [url for url in scripts if "tonconnect" in url or "qrcode" in url]


async def test_offline_a_banner_shows_and_clears_itself(stack: Stack, context: Any) -> None:
    await get_or_create_user(stack.db, 9963, "en")
    page = await open_page(context, stack.origin)
    await page.goto(stack.origin + "/app/history" + launch_hash(9963))
    await page.wait_for_selector("#history-list[aria-busy='false']")
    await context.set_offline(True)
    await page.click("nav a[data-tab='wallet']")
    await page.click("nav a[data-tab='history']")  # its reload fails: no connection
    await page.wait_for_selector("#offline-banner:visible")
    assert "No connection" in await page.locator("#offline-banner").text_content()
    assert "chrome-error" not in page.url  # the page stays: no browser error page
    await screenshot(page, "offline")
    await context.set_offline(False)
    await page.wait_for_selector("#offline-banner", state="hidden")
    await page.wait_for_selector("#history-list[aria-busy='false']")


async def test_an_expired_session_is_one_clean_screen(stack: Stack, context: Any) -> None:
    page = await open_page(context, stack.origin)
    old = int(time.time()) - 2 * stack.settings.initdata_max_age_s
    await page.goto(stack.origin + "/app" + launch_hash(9964, auth_date=old))
    await page.wait_for_selector("#session-screen:visible")
    assert await page.locator("#main").is_hidden()
    assert await page.locator("nav.tabs").is_hidden()
    text = await page.locator("body").inner_text()
    assert text.count("too old") == 1, text  # said once, not over a half-working page
    assert await page.locator("#session-reopen").is_visible()
    await screenshot(page, "session-ended")
    async with page.expect_navigation():  # outside Telegram, reopening loads the page again
        await page.click("#session-reopen")


async def test_a_pending_top_up_shows_in_history_and_can_be_dismissed(
    stack: Stack, context: Any
) -> None:
    await get_or_create_user(stack.db, 9970, "en")
    page = await open_page(context, stack.origin)
    sent = [{"amount": "2500000000", "at": "2026-01-02T03:04:05Z"}]
    stored = json.dumps(json.dumps(sent))  # what the Wallet view keeps for a sent top-up
    await page.add_init_script(f"localStorage.setItem('cocoon.pending-topups', {stored})")
    await page.goto(stack.origin + "/app/history" + launch_hash(9970))
    row = page.locator("#history-list .item-pending")
    await row.wait_for()
    assert "+2.5 GRAM" in await row.text_content() and "pending" in await row.text_content()
    await row.locator("button.link-button").click()  # Dismiss
    await row.wait_for(state="detached")
    assert await page.evaluate("localStorage.getItem('cocoon.pending-topups')") == "[]"


async def test_a_refused_message_keeps_its_text_and_offers_the_fix(
    stack: Stack, context: Any
) -> None:
    await get_or_create_user(stack.db, 9965, "en")  # no balance
    page = await open_page(context, stack.origin)
    await page.goto(stack.origin + "/app/chat" + launch_hash(9965))
    await page.wait_for_selector("#model option", state="attached")
    await page.fill("#prompt", "Explain TON in one line")
    await page.click("#send")
    await page.wait_for_selector("#composer-error:visible")
    assert await page.input_value("#prompt") == "Explain TON in one line"
    assert await page.locator("#messages li").count() == 0
    error = page.locator("#composer-error")
    assert "balance is too low" in await error.text_content()
    assert "GRAM" in await error.text_content()
    await screenshot(page, "chat-refused")
    await error.locator("button").click()  # "Top up"
    await page.wait_for_selector("[data-view='wallet']:not([hidden])")
    assert page.url.startswith(stack.origin + "/app")
    # Offline, the message is kept as well, and the page says why.
    await page.click("nav a[data-tab='chat']")
    await context.set_offline(True)
    try:
        await page.fill("#prompt", "Still here?")
        await page.click("#send")
        await page.wait_for_selector("#composer-error:has-text('No connection')")
        assert await page.input_value("#prompt") == "Still here?"
    finally:
        await context.set_offline(False)


async def test_a_double_tap_on_stars_opens_one_invoice(stack: Stack, context: Any) -> None:
    await get_or_create_user(stack.db, 9966, "en")
    page = await open_page(context, stack.origin)
    await page.add_init_script(TELEGRAM_CLIENT)
    invoices: list[str] = []
    page.on("request", lambda r: r.url.endswith("/app/api/stars") and invoices.append(r.url))
    await page.goto(stack.origin + "/app" + launch_hash(9966, platform="ios"))
    chip = page.locator("#stars-presets .chip").first
    await chip.wait_for()
    await chip.dblclick()
    await page.wait_for_function("window.telegramEvents.some(e => e[0] === 'web_app_open_invoice')")
    opened = [
        e for e in await page.evaluate("window.telegramEvents") if e[0] == "web_app_open_invoice"
    ]
    assert len(invoices) == 1 and len(opened) == 1
    assert await chip.is_disabled()  # until Telegram closes the invoice
    closed = {"slug": "testinvoice", "status": "cancelled"}
    await page.evaluate("closed => Telegram.WebView.receiveEvent('invoice_closed', closed)", closed)
    await page.wait_for_function("!document.querySelector('#stars-presets .chip').disabled")


async def test_the_deposit_address_has_a_qr_code_and_copies(stack: Stack, context: Any) -> None:
    user = await get_or_create_user(stack.db, 9967, "en")
    await context.grant_permissions(["clipboard-read", "clipboard-write"], origin=stack.origin)
    page = await open_page(context, stack.origin)
    await page.goto(stack.origin + "/app" + launch_hash(9967))
    await page.wait_for_selector("#deposit-qr svg")
    address = friendly_address(DEPOSIT, bounceable=False)
    assert await page.locator("#deposit-address").text_content() == address
    await page.click("#deposit-address")
    assert await page.evaluate("navigator.clipboard.readText()") == address
    await page.wait_for_selector("#toast:text('Copied')")
    await page.click("#memo")
    assert await page.evaluate("navigator.clipboard.readText()") == user.deposit_memo


AMOUNTS = [
    "1",
    "1.5",
    "0.000000001",
    "1.0000000001",
    "1,5",
    "1,000",
    "1.000",
    "01.50",
    ".5",
    "5.",
    "1.5 GRAM",
    "2 TON",
    "3 ton",
    " 4 ",
    "",
    " ",
    "0",
    "0.0",
    "1e9",
    "1E3",
    "1_000",
    "+5",
    "-1",
    "\u0663",
    "\uff11",
    "1 000",
    "1.5.5",
    "1,5,5",
    "abc",
    "9223372036",
    "9223372036.854775807",
    "9223372036.854775808",
    "NaN",
    "Infinity",
    "0x10",
    "1.5 GRAMS",
    "GRAM",
    "TON",
    "1.5GRAM",
    "12345678901234567890123456789012345678901",
]


async def test_the_page_and_the_server_read_amounts_alike(stack: Stack, context: Any) -> None:
    """One grammar: the page's parseAmount and backend.money.parse_amount agree on every case,
    with a comma as a decimal separator and without."""
    await get_or_create_user(stack.db, 9968, "en")
    page = await open_page(context, stack.origin)
    await page.goto(stack.origin + "/app/chat" + launch_hash(9968))
    await page.wait_for_function("Boolean(window.Cocoon && window.Cocoon.parseAmount)")
    for comma in (False, True):
        browser = await page.evaluate(
            "([texts, comma]) => texts.map(t => Cocoon.parseAmount(t, comma))", [AMOUNTS, comma]
        )
        for text, seen in zip(AMOUNTS, browser, strict=True):
            try:
                expected = {"nano": str(parse_amount(text, comma=comma))}
            except AmountError as error:
                expected = {"problem": error.problem.value}
            assert seen == expected, (text, comma)


async def test_a_bad_amount_is_said_next_to_its_field(stack: Stack, context: Any) -> None:
    await get_or_create_user(stack.db, 9969, "fr")
    page = await open_page(context, stack.origin)
    await page.goto(stack.origin + "/app" + launch_hash(9969, language="fr"))
    await page.wait_for_selector("#balance:not(.skeleton)")
    for text, words in (("1e9", "chiffres"), ("1.0000000001", "9 chiffres"), ("0", "supérieur")):
        await page.fill("#topup-amount", text)
        error = page.locator("#topup-amount-error")
        await error.wait_for()
        assert words in await error.text_content()
        assert await page.get_attribute("#topup-amount", "aria-invalid") == "true"
        assert await page.locator("#topup-send").is_disabled()
    await page.fill("#topup-amount", "1,5")  # French writes a comma
    await page.wait_for_selector("#topup-amount-error", state="hidden")
    assert "1.5 GRAM" in await page.locator("#topup-send").text_content()
    await screenshot(page, "wallet-amount-fr")


async def test_replies_are_markdown_built_from_text_never_html(stack: Stack, context: Any) -> None:
    await get_or_create_user(stack.db, 9971, "en")
    page = await open_page(context, stack.origin)
    await page.goto(stack.origin + "/app/chat" + launch_hash(9971))
    await page.wait_for_function("Boolean(window.Cocoon && window.Cocoon.markdown)")
    reply = (
        "**Bold** and *soft* with `x < y`.\n\n"
        '<img src=x onerror="window.owned = 1"> <script>window.owned = 2</script>\n\n'
        "```python\nprint('<b>')\n```"
    )
    shape = await page.evaluate(
        """text => {
            const box = document.createElement("div");
            Cocoon.markdown(box, text);
            document.body.append(box);
            return {
                tags: Array.from(box.querySelectorAll("*"), (el) => el.tagName),
                code: box.querySelector("pre code").textContent,
                text: box.textContent,
            };
        }""",
        reply,
    )
    assert shape["tags"] == ["P", "STRONG", "EM", "CODE", "P", "PRE", "CODE"]
    assert shape["code"] == "print('<b>')"
    assert '<img src=x onerror="window.owned = 1">' in shape["text"]  # shown, as text
    assert await page.evaluate("window.owned") is None
