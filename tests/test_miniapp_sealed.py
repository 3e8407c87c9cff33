"""The Mini App's sealed chat in headless Chromium (issue 13): the page fetches the public report
with its own nonce, checks the worker in JavaScript (libsodium from npm), seals the turn to the
worker's attested key, opens the reply and checks the worker's receipt, and keeps the
conversation sealed in its own storage. Through ``cocoon web`` as its own process with a worker
node (``tests/support/canary.py``); afterwards the canary is in no Redis key, database file or
log, and not in the web server's memory."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from tests.support.miniapp_browser import require_browser

require_browser()

from playwright.async_api import async_playwright  # noqa: E402

from tests.support.canary import (  # noqa: E402
    CANARY_USER,
    canary_stack,
    files_count,
    memory_count,
    redis_count,
    worker_ready,
)
from tests.support.miniapp_browser import CHROMIUM, CHROMIUM_ARGS, open_page  # noqa: E402
from tests.support.miniapp_stack import VIEWPORT, no_console_errors  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.browser]


async def test_a_sealed_mini_app_turn_leaves_its_canary_only_in_the_page(
    redis_url: str, tmp_path: Path
) -> None:
    dev = {"COCOON_MINIAPP_DEV": "true", "COCOON_LOCAL_TELEGRAM_ID": str(CANARY_USER)}
    canary = f"minicanary{uuid.uuid4().hex}"
    async with canary_stack(redis_url, tmp_path, dev) as stack:
        await worker_ready(stack)
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
            )
            try:
                context = await browser.new_context(viewport=VIEWPORT, locale="en-US")
                context.set_default_timeout(30_000)
                page = await open_page(context, stack.url)
                await page.goto(f"{stack.url}/app/chat")
                await page.locator("#model option").first.wait_for(state="attached")
                await page.check("#sealed-mode")
                await page.fill("#prompt", f"{canary} stays sealed")
                await page.click("#send")
                proof = page.locator(".sealed-proof")
                await page.wait_for_function(
                    "document.querySelector('.sealed-proof, .message.failed') !== null"
                )
                assert await proof.count() == 1, (
                    await page.locator("#messages").inner_text(),
                    page.console_errors,
                )
                shown = await proof.inner_text()
                assert "Verified in this page" in shown, shown
                assert "development TEE" in shown and "Served by worker w-" in shown
                reply = await page.locator(".message-assistant .text").last.inner_text()
                assert canary in reply
                # The conversation is kept in the page, sealed: back after a reload, opened here.
                stored = await page.evaluate("localStorage.getItem('cocoon_sealed_context')")
                assert stored and canary not in stored
                await page.reload()
                await page.check("#sealed-mode")
                await page.locator(".message-assistant").wait_for()
                assert canary in await page.locator("#messages").inner_text()
                no_console_errors(page)
            finally:
                await browser.close()
        await asyncio.sleep(0.5)  # the web server's logs and database writes settle
        needle = canary.encode()
        assert memory_count(stack.web.pid, needle) == 0
        assert await redis_count(redis_url, needle) == 0
        assert files_count(stack.files, needle) == 0
