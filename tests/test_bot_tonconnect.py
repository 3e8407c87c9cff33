"""The wallets the chat offers (``bot/wallets.json``) with pytonconnect's real connector: each
opens its session at its HTTP bridge and gives its universal link; no list is fetched."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp import web

from bot.tonconnect import CocoonTonConnect, wallet_list
from tests.support.wallets import MemoryStorage

MANIFEST = "https://cocoon.example/tonconnect-manifest.json"


class Bridge:
    """A TON Connect HTTP bridge on loopback: it takes SSE subscriptions and records them."""

    def __init__(self) -> None:
        self.clients: list[str] = []
        self.subscribed = asyncio.Event()
        self.url = ""

    async def events(self, request: web.Request) -> web.StreamResponse:
        self.clients.append(request.query.get("client_id", ""))
        self.subscribed.set()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"event: heartbeat\ndata: \n\n")
        await asyncio.Event().wait()  # held open until the client leaves
        return response


@pytest.fixture
async def bridge() -> AsyncIterator[Bridge]:
    found = Bridge()
    app = web.Application()
    app.router.add_get("/bridge/events", found.events)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    found.url = f"http://127.0.0.1:{port}/bridge"
    yield found
    await runner.cleanup()


def test_every_wallet_offered_has_an_http_bridge_and_a_universal_link() -> None:
    wallets = wallet_list()
    assert [w["name"] for w in wallets] == ["Wallet", "Tonkeeper", "Tonhub"]
    for wallet in wallets:
        assert wallet["bridge_url"].startswith("https://"), wallet
        assert wallet["universal_url"].startswith("https://"), wallet
    wallets[0]["name"] = "changed"  # a copy: the list offered stays as it is
    assert wallet_list()[0]["name"] == "Wallet"


@pytest.mark.parametrize("index", range(len(wallet_list())), ids=[w["name"] for w in wallet_list()])
async def test_the_real_connector_opens_a_session_at_the_wallets_bridge(
    bridge: Bridge, index: int
) -> None:
    wallet: dict[str, Any] = {**wallet_list()[index], "bridge_url": bridge.url}
    connector = CocoonTonConnect(MANIFEST, MemoryStorage())
    link = await asyncio.wait_for(connector.connect(wallet, {"ton_proof": "p" * 64}), 60)
    try:
        await asyncio.wait_for(bridge.subscribed.wait(), 60)  # an upper bound on the event
        assert len(bridge.clients) == 1 and len(bridge.clients[0]) == 64
        universal = wallet["universal_url"]
        if "t.me/" in universal:  # a Telegram wallet: the request rides in startattach
            assert link.startswith(universal + "&startattach=tonconnect-")
        else:
            assert link.startswith(universal + "?v=2&id=" + bridge.clients[0])
            asked = json.loads(parse_qs(urlsplit(link).query)["r"][0])
            assert asked["manifestUrl"] == MANIFEST
            assert {"name": "ton_proof", "payload": "p" * 64} in asked["items"]
    finally:
        connector.pause_connection()
