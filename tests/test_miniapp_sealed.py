"""The Mini App's sealed chat in headless Chromium (issue 13): the page fetches the public report
with its own nonce, checks the worker in JavaScript (libsodium from npm), seals the turn to the
worker's attested key, opens the reply and checks the worker's receipt, and keeps the
conversation sealed in its own storage. Through ``cocoon web`` as its own process with a worker
node (``tests/support/canary.py``); afterwards the canary is in no Redis key, database file or
log, and not in the web server's memory."""

from __future__ import annotations

import asyncio
import base64
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.miniapp_browser import require_browser

require_browser()

from playwright.async_api import async_playwright  # noqa: E402

from tests.support.canary import (  # noqa: E402
    CANARY_USER,
    Stack,
    canary_stack,
    files_count,
    memory_count,
    redis_count,
    worker_ready,
)
from tests.support.miniapp_browser import CHROMIUM, CHROMIUM_ARGS, open_page  # noqa: E402
from tests.support.miniapp_stack import VIEWPORT, no_console_errors  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.browser]


@asynccontextmanager
async def sealed_chat_page(redis_url: str, tmp_path: Path) -> AsyncIterator[tuple[Stack, Any]]:
    """``cocoon web`` in Mini App development mode (as the canary's user) with a worker node,
    and a Chromium page on its chat, the sealed mode not yet on."""
    dev = {"COCOON_MINIAPP_DEV": "true", "COCOON_LOCAL_TELEGRAM_ID": str(CANARY_USER)}
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
                yield stack, page
            finally:
                await browser.close()


async def test_a_sealed_mini_app_turn_leaves_its_canary_only_in_the_page(
    redis_url: str, tmp_path: Path
) -> None:
    canary = f"minicanary{uuid.uuid4().hex}"
    async with sealed_chat_page(redis_url, tmp_path) as (stack, page):
        await page.goto(f"{stack.url}/app/chat")
        await page.locator("#model option").first.wait_for(state="attached")
        await page.check("#sealed-mode")
        await page.fill("#prompt", f"{canary} stays sealed")
        await page.click("#send")
        proof = page.locator(".sealed-proof")
        await page.wait_for_function(
            "document.querySelector('.sealed-proof, .message.failed') !== null"
        )
        messages = await page.locator("#messages").inner_text()
        assert await proof.count() == 1, (messages, page.console_errors)
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
        await asyncio.sleep(0.5)  # the web server's logs and database writes settle
        needle = canary.encode()
        assert memory_count(stack.web.pid, needle) == 0
        assert await redis_count(redis_url, needle) == 0
        assert files_count(stack.files, needle) == 0


async def test_the_page_refuses_a_forged_report_and_a_forged_receipt(
    redis_url: str, tmp_path: Path
) -> None:
    """An operator that swaps a worker's answer to the page's nonce gets no request sent; one
    that changes the reply's digest in the receipt gets the reply marked as failing the checks."""
    async with sealed_chat_page(redis_url, tmp_path) as (stack, page):
        posted: list[str] = []
        page.on("request", lambda r: "/app/api/sealed/chat" in r.url and posted.append(r.url))

        async def stale_report(route: Any) -> None:
            answer = await route.fetch()
            report = await answer.json()
            for worker in report["workers"]:
                worker["signature"] = base64.b64encode(bytes(64)).decode()
            await route.fulfill(response=answer, json=report)

        await page.route("**/v1/attestation/report*", stale_report)
        await page.goto(f"{stack.url}/app/chat")
        await page.locator("#model option").first.wait_for(state="attached")
        await page.check("#sealed-mode")
        await page.fill("#prompt", "first")
        await page.click("#send")
        failed = page.locator(".message.failed .error")
        await failed.wait_for()
        assert "No worker passed this page's checks" in await failed.inner_text()
        assert "nonce" in await failed.inner_text() and posted == []
        await page.unroute("**/v1/attestation/report*")

        async def forged_receipt(route: Any) -> None:
            answer = await route.fetch()
            text = await answer.text()
            zeros = "0" * 64
            forged = re.sub(r'"reply_sha256": ?"[0-9a-f]{64}"', f'"reply_sha256":"{zeros}"', text)
            assert forged != text
            await route.fulfill(response=answer, body=forged)

        await page.route("**/app/api/sealed/chat", forged_receipt)
        await page.fill("#prompt", "second")
        await page.click("#send")
        await page.locator(".message.failed .error").nth(1).wait_for()
        second = await page.locator(".message.failed .error").nth(1).inner_text()
        assert "failed this page's checks" in second and "signature" in second
        assert await page.locator(".sealed-proof").count() == 0
        assert posted  # this one was sent, and refused here
