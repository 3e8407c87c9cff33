"""The Mini App in a real browser: headless Chromium against ``cocoon web`` on loopback, a
TON Connect wallet injected through the JS bridge, a local TON Center with the deposit watcher,
and a real worker running the small model for the chat. One browser for the module."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web

from backend import accounts, appkeys
from backend.ton.comment import decode_comment, friendly_address
from backend.users import get_or_create_user
from backend.web import create_app
from tests.support.env import TEST_REDIS_URL
from tests.support.miniapp_browser import (
    TELEGRAM_CLIENT,
    InjectedWallet,
    launch_hash,
    open_page,
    screenshot,
)
from tests.support.miniapp_helpers import DEPOSIT, TON
from tests.support.miniapp_stack import (
    VIEWPORT,
    Stack,
    browser_module,
    no_console_errors,
    seeded_provider,
)
from tests.support.ops import free_port

pytestmark, stack_fixture, context_fixture = browser_module()


# --------------------------------------------------------------------------- pages


@pytest.mark.parametrize(
    ("path", "name", "ready"),
    [
        ("/app", "wallet", "#balance:not(:text('…'))"),
        ("/app/history", "history", "#history-list[aria-busy='false']"),
        ("/app/chat", "chat", "#model option"),
        ("/app/provider", "provider", "#workers li"),
    ],
)
async def test_each_page_loads_without_console_errors(
    stack: Stack, context: Any, path: str, name: str, ready: str
) -> None:
    await seeded_provider(stack, 9100)
    page = await open_page(context, stack.origin, InjectedWallet())
    await page.goto(stack.origin + path + launch_hash(9100))
    await page.wait_for_selector(ready, state="attached")
    await page.wait_for_load_state("networkidle")
    assert await page.locator("#auth-banner").is_hidden()
    assert await page.locator("#tab-provider").is_visible()
    # Telegram's theme parameters reach the CSS.
    color = await page.evaluate(
        "getComputedStyle(document.documentElement).getPropertyValue('--tg-theme-button-color')"
    )
    assert color.strip() == "#007aff"
    # Nothing wider than a 360 px phone.
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= VIEWPORT["width"]
    await screenshot(page, name)
    no_console_errors(page)


async def test_outside_telegram_the_page_says_so(stack: Stack, context: Any) -> None:
    page = await open_page(context, stack.origin)
    await page.goto(stack.origin + "/app")
    banner = page.locator("#auth-banner")
    await banner.wait_for(state="visible")
    assert "Telegram" in await banner.text_content()
    await screenshot(page, "outside-telegram")


async def test_development_mode_works_outside_telegram_and_says_so(
    stack: Stack, context: Any
) -> None:
    dev = stack.settings.model_copy(update={"miniapp_dev": True, "local_telegram_id": 9800})
    runner = web.AppRunner(create_app(dev), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        origin = f"http://127.0.0.1:{port}"
        page = await open_page(context, origin)
        await page.goto(origin + "/app")  # no Telegram launch data at all
        await page.wait_for_selector("#balance:text('0 GRAM')")
        banner = await page.locator("#dev-banner").text_content()
        assert "Development mode" in banner and "9800" in banner
        assert await page.locator("#auth-banner").is_hidden()
        assert await get_or_create_user(stack.db, 9800) is not None
        await screenshot(page, "wallet-dev-mode")
        no_console_errors(page)
    finally:
        await runner.cleanup()


async def test_pages_follow_the_users_telegram_language(stack: Stack, context: Any) -> None:
    page = await open_page(context, stack.origin)
    await page.goto(stack.origin + "/app" + launch_hash(9101, language="ru"))
    await page.wait_for_url("**/app?lang=ru#*")
    await page.wait_for_selector("#balance:not(:text('…'))")
    assert "Баланс" in await page.locator("#balance-title").text_content()
    assert "Подключить кошелёк" in await page.locator("#connect").text_content()
    await screenshot(page, "wallet-ru")
    no_console_errors(page)


# ------------------------------------------------------------------ wallet and top-up


async def test_connect_a_wallet_top_up_and_see_the_balance(stack: Stack, context: Any) -> None:
    injected = InjectedWallet()
    user = await get_or_create_user(stack.db, 9200, "en")
    page = await open_page(context, stack.origin, injected)
    await page.goto(stack.origin + "/app" + launch_hash(9200))
    await page.wait_for_selector("#balance:text('0 GRAM')")

    # Connect: the wallet is asked for a ton_proof of the server's payload; the server checks
    # it and the page shows the linked address in its user-friendly form.
    await page.click("#connect")
    friendly = friendly_address(injected.wallet.raw, bounceable=False)
    await page.wait_for_selector(f"#wallet-address:text('{friendly}')")
    [(domain, payload)] = injected.connects
    assert domain == stack.origin.removeprefix("http://") and payload and len(payload) == 64
    assert await page.locator("#disconnect").is_visible()

    # Top up 1.5 TON: the wallet is asked to pay the deposit wallet with the user's memo.
    await page.click("#topup-presets [data-amount='1']")
    await page.fill("#topup-amount", "1.5")
    await page.click("#topup-send")
    await page.wait_for_selector("#topup-status[data-kind='pending']")
    [request] = injected.transactions
    [message] = request["messages"]
    assert message["address"] == friendly_address(DEPOSIT, bounceable=False)
    assert message["amount"] == "1500000000"
    assert decode_comment(message["payload"]).memo == user.deposit_memo
    await screenshot(page, "wallet-pending")

    # The deposit lands on the local chain; the watcher credits it; the page shows it.
    stack.net.add_incoming(
        DEPOSIT, 1_500_000_000, body=InjectedWallet.body(message), source=injected.wallet.raw
    )
    await page.wait_for_selector("#balance:text('1.5 GRAM')", timeout=20_000)
    await page.wait_for_selector("#topup-status[data-kind='ok']")
    assert "1.5 GRAM" in await page.locator("#topup-status").text_content()
    assert (await stack.ledger.balances(user.id)).available == 1_500_000_000
    await screenshot(page, "wallet-credited")

    # History shows the deposit.
    await page.click("nav a[data-tab='history']")
    await page.wait_for_selector("#history-list .item-deposit")
    assert "+1.5 GRAM" in await page.locator("#history-list .item-deposit").text_content()
    await screenshot(page, "history-after-top-up")

    # Disconnect unlinks the wallet on the server.
    await page.click("nav a[data-tab='wallet']")
    await page.wait_for_selector("#disconnect:visible")
    await page.click("#disconnect")
    await page.wait_for_selector("#connect:visible")
    assert await account_wallet(stack, user.id) is None
    no_console_errors(page)


async def account_wallet(stack: Stack, user_id: int) -> object:
    from backend.ton.proof import linked_wallet

    return await linked_wallet(stack.db, user_id, "user")


async def test_telegrams_main_button_sends_the_top_up(stack: Stack, context: Any) -> None:
    """Inside Telegram the main action is the MainButton. The client is played the way
    Telegram's apps do it: ``window.TelegramWebviewProxy`` receives the page's events, and
    ``Telegram.WebView.receiveEvent`` delivers the button press."""
    injected = InjectedWallet()
    await get_or_create_user(stack.db, 9300, "en")
    page = await open_page(context, stack.origin, injected)
    await page.add_init_script(TELEGRAM_CLIENT)
    await page.goto(stack.origin + "/app/history" + launch_hash(9300, platform="android"))
    await page.wait_for_selector("#history-list[aria-busy='false']", state="attached")
    events = await page.evaluate("window.telegramEvents")
    assert ["web_app_setup_back_button", {"is_visible": True}] in events
    await page.evaluate("Telegram.WebView.receiveEvent('back_button_pressed')")
    await page.wait_for_url(stack.origin + "/app")
    await page.wait_for_selector("#balance:text('0 GRAM')")
    assert await page.locator("#topup-send").is_hidden()  # the MainButton stands in for it
    await page.click("#connect")
    await page.wait_for_selector("#disconnect:visible")
    await page.fill("#topup-amount", "2")
    buttons = [
        data
        for name, data in await page.evaluate("window.telegramEvents")
        if name == "web_app_setup_main_button"
    ]
    assert buttons[-1]["text"] == "Top up 2 GRAM" and buttons[-1]["is_visible"]
    assert buttons[-1]["is_active"]
    await page.evaluate("Telegram.WebView.receiveEvent('main_button_pressed')")
    await page.wait_for_selector("#topup-status[data-kind='pending']")
    [request] = injected.transactions
    assert request["messages"][0]["amount"] == "2000000000"
    await screenshot(page, "wallet-in-telegram")
    no_console_errors(page)


async def test_stars_open_telegrams_invoice_and_the_credit_shows(
    stack: Stack, context: Any
) -> None:
    user = await get_or_create_user(stack.db, 9700, "en")
    page = await open_page(context, stack.origin)
    await page.add_init_script(TELEGRAM_CLIENT)
    await page.goto(stack.origin + "/app" + launch_hash(9700, platform="ios"))
    await page.wait_for_selector("#balance:text('0 GRAM')")
    chip = page.locator("#stars-presets [data-stars='100']")
    assert await chip.text_content() == "100 Stars · 0.4 GRAM"
    await chip.click()
    # Telegram is asked to open the invoice that the Bot API made.
    await page.wait_for_function(
        "window.telegramEvents.some(([name]) => name === 'web_app_open_invoice')"
    )
    opened = [d for n, d in await page.evaluate("window.telegramEvents") if n.endswith("invoice")]
    assert opened == [{"slug": "testinvoice"}]
    # The user pays: the bot credits the payment; Telegram closes the invoice as paid.
    await accounts.credit_stars(stack.ledger, stack.settings, user.id, 100, "charge-9700")
    await page.evaluate(
        "Telegram.WebView.receiveEvent('invoice_closed', {slug: 'testinvoice', status: 'paid'})"
    )
    await page.wait_for_selector("#balance:text('0.4 GRAM')")
    await page.wait_for_selector("#stars-status[data-kind='ok']")
    await screenshot(page, "wallet-stars-paid")
    no_console_errors(page)


async def test_a_declined_transfer_is_not_pending(stack: Stack, context: Any) -> None:
    injected = InjectedWallet(decline=True)
    await get_or_create_user(stack.db, 9400, "en")
    page = await open_page(context, stack.origin, injected)
    await page.goto(stack.origin + "/app" + launch_hash(9400))
    await page.click("#connect")
    await page.wait_for_selector("#disconnect:visible")
    await page.fill("#topup-amount", "1")
    await page.click("#topup-send")
    await page.wait_for_selector("#topup-status[data-kind='error']")
    assert len(injected.transactions) == 1


# ------------------------------------------------------------------------- provider


async def test_a_provider_links_a_payout_wallet_and_withdraws(stack: Stack, context: Any) -> None:
    injected = InjectedWallet()
    provider = await seeded_provider(stack, 9600)
    page = await open_page(context, stack.origin, injected)
    await page.goto(stack.origin + "/app/provider" + launch_hash(9600))
    await page.wait_for_selector("#earn-available:text('3 GRAM')")
    worker = await page.locator("#workers li").text_content()
    assert "w-9600" in worker and "development TEE" in worker and "Replies: 1" in worker
    assert "attested until" in worker
    assert await page.locator("#withdraw").is_disabled()  # no payout wallet yet

    await page.click("#link-payout")
    friendly = friendly_address(injected.wallet.raw, bounceable=False)
    await page.wait_for_selector(f"#payout-wallet:has-text('{friendly}')")
    await page.fill("#withdraw-amount", "0.5")
    await page.click("#withdraw")
    await page.wait_for_selector("#withdraw-status[data-kind='error']")
    assert "1 GRAM" in await page.locator("#withdraw-status").text_content()
    await page.click("#withdraw-all")
    await page.click("#withdraw")
    await page.wait_for_selector("#withdraw-status[data-kind='ok']")
    assert "3 GRAM" in await page.locator("#withdraw-status").text_content()
    await page.wait_for_selector("#earn-pending:text('3 GRAM')")
    assert (await stack.ledger.balances(provider)).earned == 0
    await screenshot(page, "provider-withdrawn")
    no_console_errors(page, expected=("status of 400 (Bad Request)",))


# ---------------------------------------------------------------------------- chat


@pytest.mark.engine
async def test_the_chat_streams_a_reply_from_the_small_model(stack: Stack, context: Any) -> None:
    from tests.support.env import require_module

    require_module("llama_cpp")
    from tests.support.turns import Node

    user = await get_or_create_user(stack.db, 9500, "en")
    await stack.ledger.credit_deposit(user.id, TON, "dep:9500")
    node = await asyncio.to_thread(Node, TEST_REDIS_URL)
    try:
        page = await open_page(context, stack.origin)
        await page.goto(stack.origin + "/app/chat" + launch_hash(9500))
        await page.wait_for_selector("#model option[value='smollm2-135m']", state="attached")
        await page.fill("#prompt", "Say hello in one short sentence.")
        # Record every state the reply's text goes through while it streams.
        await page.evaluate(
            """() => {
              window.replyStates = [];
              new MutationObserver(() => {
                const texts = document.querySelectorAll(".message-assistant .text");
                if (texts.length) window.replyStates.push(texts[texts.length - 1].textContent);
              }).observe(document.getElementById("messages"), {subtree: true, childList: true});
            }"""
        )
        await page.click("#send")
        reply = page.locator(".message-assistant .text").last
        # The model runs as fast as the machine lets it: only the test's own timeout bounds
        # the waits for its words (timeout=0), never a margin a loaded machine can miss.
        await page.wait_for_selector(".message-assistant .cost", timeout=0)
        text = await reply.text_content()
        assert text.strip()
        states = [s for s in await page.evaluate("window.replyStates") if s]
        assert len(set(states)) >= 2 and states[-1] == text  # it grew, then stayed
        report = page.locator(".message-assistant .privacy")
        await report.locator("summary").click()  # open the privacy report
        privacy = await report.inner_text()
        assert "development TEE" in privacy and "NOT hardware-attested" in privacy
        assert "signed by the worker's attested key, verified" in privacy  # from its receipt
        assert "Engine: llama-cpp" in privacy
        cost_line = await page.locator(".message-assistant .cost").text_content()
        balance = (await stack.ledger.balances(user.id)).available
        assert 0 < TON - balance and f"balance {format_gram(balance)}" in cost_line
        # The composer never covers a message: the newest ends above it.
        last = await page.locator(".message-assistant").last.bounding_box()
        composer = await page.locator(".composer").bounding_box()
        assert last["y"] + last["height"] <= composer["y"] + 0.5
        # Screen readers hear finished replies only: the list itself is not a live region.
        assert await page.get_attribute("#messages", "aria-live") is None
        assert await page.get_attribute("#reply-announcer", "aria-live") == "polite"
        assert (await page.text_content("#reply-announcer")).strip() == text.strip()
        await screenshot(page, "chat-reply")

        # Stop a long reply: the worker stops, the turn is billed for what it wrote, and
        # nothing stays held.
        await page.fill("#prompt", "Write a very long story about a cocoon, in many chapters.")
        await page.click("#send")
        await page.wait_for_function(
            "document.querySelector('.message-assistant.streaming .text')?.textContent.length > 20",
            timeout=0,
        )
        await page.click("#stop")
        # Stopped through the server: the reply is marked, with what it cost.
        stopped = page.locator(".message-assistant .mark-stopped")
        await stopped.wait_for(timeout=0)
        assert (await stopped.text_content()).startswith("Stopped · ")
        await page.wait_for_selector("#send:enabled")
        balances = await stack.ledger.balances(user.id)
        assert balances.held == 0 and balances.available < balance
        mark = await stopped.text_content()
        assert format_gram(balance - balances.available) in mark

        # A reply cut by its length limit is marked too (a budget of 4 tokens, for this turn).
        # In a new chat: with the stopped story in its context, whose length depends on how fast
        # the machine was, the model may end its reply within 4 tokens.
        await page.click("#new-chat")
        dispatcher = stack.app[appkeys.DISPATCHER]
        kept = dispatcher.settings
        dispatcher.settings = kept.model_copy(update={"max_tokens_default": 4})
        try:
            # Not "count to a hundred in words": the small model may answer "One hundred." and
            # end there, at exactly 4 tokens (seen in two full runs); a story does not end so.
            await page.fill("#prompt", "Write a very long story about a cocoon, in many chapters.")
            await page.click("#send")
            cut = page.locator(".message-assistant .mark-cut")
            await cut.wait_for(timeout=0)
            assert "length limit" in await cut.text_content()
        finally:
            dispatcher.settings = kept
        await screenshot(page, "chat-stopped-and-cut")
        no_console_errors(page)
    finally:
        await asyncio.to_thread(node.stop)


def format_gram(nano: int) -> str:
    from backend.money import format_gram as fmt

    return fmt(nano)
