"""A TON Connect HTTP bridge on loopback and a wallet app that answers through it.

:class:`Bridge` speaks the bridge protocol (ton-blockchain/ton-connect ``bridge.md``):
``GET /bridge/events?client_id=A[,B][&last_event_id=N]`` is a Server-Sent Events stream of the
messages queued for those clients (``id: N``, ``data: {"from", "message"}``) with heartbeats;
``POST /bridge/message?client_id=A&to=B&ttl=T[&topic=...]`` queues a base64 body for B for at
most T seconds (400 when T is over 300, a parameter is missing or the body is not base64).
It also serves a wallets list (``/wallets-v2.json``, the shape of TON's wallets-list) whose
wallets use this bridge, and can refuse subscriptions (``refuse``: a bridge that is down).

:class:`BridgeWallet` is a user's wallet app: it opens the universal link the bot gave, then
connects (``ton_addr`` and a signed ``ton_proof`` when asked) or declines, and answers
``sendTransaction`` requests (sign or reject), all end-to-end encrypted with its own session
key as a real wallet does (libsodium ``crypto_box``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
from aiohttp import web
from nacl.public import Box, PrivateKey, PublicKey

from tests.support.wallets import DEVICE, DOMAIN, UserWallet

MAX_TTL_S = 300
HEARTBEAT_S = 0.5


@dataclass
class Queued:
    id: int
    to: str
    data: str
    expires: float


@dataclass
class Bridge:
    """The bridge; ``url`` is its base (``.../bridge``), ``wallets_url`` its wallets list."""

    url: str = ""
    wallets_url: str = ""
    refuse: bool = False  # answer every subscription 503
    subscriptions: list[str] = field(default_factory=list)  # client ids, in order
    posts: list[dict[str, str]] = field(default_factory=list)  # each POST's query
    queue: list[Queued] = field(default_factory=list)
    open_streams: int = 0
    streams: list[web.Request] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def wallets(self) -> list[dict[str, Any]]:
        """TON's wallets-list entries (its v2 shape), all on this bridge."""
        base = {"image": "https://wallet.example/icon.png", "platforms": ["ios", "android"]}
        return [
            {
                **base,
                "app_name": "tonkeeper",
                "name": "Tonkeeper",
                "about_url": "https://tonkeeper.com",
                "universal_url": "https://app.tonkeeper.com/ton-connect",
                "bridge": [{"type": "sse", "url": self.url}, {"type": "js", "key": "tonkeeper"}],
            },
            {
                **base,
                "app_name": "mytonwallet",
                "name": "MyTonWallet",
                "about_url": "https://mytonwallet.io",
                "universal_url": "https://connect.mytonwallet.org",
                "bridge": [{"type": "js", "key": "mytonwallet"}, {"type": "sse", "url": self.url}],
            },
            {  # no HTTP bridge: a bot cannot reach it
                **base,
                "app_name": "extension-only",
                "name": "Extension only",
                "about_url": "https://extension.example",
                "bridge": [{"type": "js", "key": "ext"}],
            },
        ]

    async def wallets_list(self, request: web.Request) -> web.Response:
        return web.json_response(self.wallets())

    async def events(self, request: web.Request) -> web.StreamResponse:
        clients = [c for c in request.query.get("client_id", "").split(",") if c]
        if not clients:
            return web.json_response({"error": "client_id is required"}, status=400)
        self.subscriptions.extend(clients)
        if self.refuse:
            return web.json_response({"error": "bridge is down"}, status=503)
        last = int(request.query.get("last_event_id") or 0)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        self.open_streams += 1
        self.streams.append(request)
        await self._notify()
        try:
            while True:
                loop = asyncio.get_running_loop()
                due = [
                    q
                    for q in self.queue
                    if q.to in clients and q.id > last and q.expires > loop.time()
                ]
                for item in due:
                    await response.write(f"id: {item.id}\ndata: {item.data}\n\n".encode())
                    self.queue.remove(item)  # delivered: gone from the bridge
                    last = item.id
                if not due:
                    await response.write(b"event: heartbeat\ndata: heartbeat\n\n")
                async with self._changed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), HEARTBEAT_S)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.open_streams -= 1
            self.streams.remove(request)
            await self._notify()
        return response

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def until(self, predicate: Callable[[], bool], timeout_s: float = 30) -> None:
        """Wait until ``predicate()`` holds (checked whenever a stream opens or closes or a
        message arrives); ``timeout_s`` bounds the wait, it measures nothing."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(predicate)

    def drop(self) -> None:
        """Cut every open stream mid-response, as a bridge that goes away does."""
        for request in list(self.streams):
            if request.transport is not None:
                request.transport.close()

    async def message(self, request: web.Request) -> web.Response:
        query = {k: v for k, v in request.query.items()}
        self.posts.append(query)
        sender, to, ttl = query.get("client_id"), query.get("to"), query.get("ttl", "")
        if not sender or not to or not ttl.isdecimal():
            return web.json_response({"error": "client_id, to and ttl are required"}, status=400)
        if int(ttl) > MAX_TTL_S:
            return web.json_response({"error": "ttl is too high"}, status=400)
        body = (await request.read()).decode("ascii", "replace")
        try:
            base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return web.json_response({"error": "the body is not base64"}, status=400)
        loop = asyncio.get_running_loop()
        data = json.dumps({"from": sender, "message": body})
        self.queue.append(Queued(next(self._ids), to, data, loop.time() + int(ttl)))
        await self._notify()
        return web.json_response({"message": "OK", "statusCode": 200})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/bridge/events", self.events)
        app.router.add_post("/bridge/message", self.message)
        app.router.add_get("/wallets-v2.json", self.wallets_list)
        return app


@contextlib.asynccontextmanager
async def running_bridge() -> AsyncIterator[Bridge]:
    bridge = Bridge()
    runner = web.AppRunner(bridge.app(), shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    bridge.url = f"http://127.0.0.1:{port}/bridge"
    bridge.wallets_url = f"http://127.0.0.1:{port}/wallets-v2.json"
    try:
        yield bridge
    finally:
        await runner.cleanup()


class BridgeWallet:
    """A wallet app on the bridge: its own session key, a :class:`UserWallet` account."""

    def __init__(
        self, bridge: Bridge, account: UserWallet | None = None, *, state_init: bool = True
    ) -> None:
        self.bridge = bridge
        self.account = account or UserWallet()
        self.state_init = state_init  # False: a wallet that sends no walletStateInit
        self.session = PrivateKey.generate()
        self.client_id = bytes(self.session.public_key).hex()
        self.app_id = ""
        self.request: dict[str, Any] = {}
        self.requests: list[dict[str, Any]] = []  # RPC requests the app sent, decrypted
        self._events = itertools.count(1)

    def open_link(self, link: str) -> dict[str, Any]:
        """Read the universal link as the wallet app does: the app's id and its request."""
        query = parse_qs(urlsplit(link).query)
        assert query["v"] == ["2"], link
        self.app_id = query["id"][0]
        self.request = json.loads(query["r"][0])
        return self.request

    def _box(self) -> Box:
        return Box(self.session, PublicKey(bytes.fromhex(self.app_id)))

    async def post(self, message: dict[str, Any]) -> None:
        sealed = self._box().encrypt(json.dumps(message).encode())
        body = base64.b64encode(bytes(sealed)).decode()
        url = f"{self.bridge.url}/message"
        params = {"client_id": self.client_id, "to": self.app_id, "ttl": "300"}
        async with aiohttp.ClientSession() as http:
            async with http.post(url, params=params, data=body) as response:
                assert response.status == 200, await response.text()

    async def connect(self, link: str, *, domain: str = DOMAIN, timestamp: int) -> None:
        """Approve the connection: the address, and the proof when the app asked for one."""
        request = self.open_link(link)
        address = self.account.account()
        if not self.state_init:
            del address["walletStateInit"]
        items: list[dict[str, Any]] = [{"name": "ton_addr", **address}]
        for item in request["items"]:
            if item["name"] == "ton_proof":
                proof = self.account.proof(item["payload"], domain=domain, timestamp=timestamp)
                items.append({"name": "ton_proof", "proof": proof})
        payload = {"items": items, "device": DEVICE}
        await self.post({"event": "connect", "id": next(self._events), "payload": payload})

    async def decline(self, link: str) -> None:
        self.open_link(link)
        error = {"code": 300, "message": "User declined the connection"}
        await self.post({"event": "connect_error", "id": next(self._events), "payload": error})

    async def next_request(self, timeout_s: float = 30) -> dict[str, Any]:
        """The next RPC request the app sends through the bridge (the wallet's own stream)."""
        url = f"{self.bridge.url}/events"
        async with aiohttp.ClientSession() as http:
            async with http.get(url, params={"client_id": self.client_id}) as response:
                async with asyncio.timeout(timeout_s):
                    async for raw in response.content:
                        line = raw.decode().strip()
                        if not line.startswith("data:") or "heartbeat" in line:
                            continue
                        envelope = json.loads(line[5:])
                        assert envelope["from"] == self.app_id
                        blob = base64.b64decode(envelope["message"])
                        request = json.loads(self._box().decrypt(blob[24:], blob[:24]))
                        self.requests.append(request)
                        return dict(request)
        raise AssertionError("the bridge stream ended")

    async def sign(self, request: dict[str, Any]) -> str:
        """Approve a ``sendTransaction``: answer with a BOC (the request's digest, for tests)."""
        boc = base64.b64encode(json.dumps(request["params"]).encode()).decode()
        await self.post({"id": request["id"], "result": boc})
        return boc

    async def reject(self, request: dict[str, Any]) -> None:
        error = {"code": 300, "message": "User rejected the transaction"}
        await self.post({"id": request["id"], "error": error})
