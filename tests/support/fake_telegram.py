"""A Telegram Bot API server on loopback, for tests that run the bot in another process.

It speaks the Bot API's HTTP shape (``POST /bot<token>/<method>`` → ``{"ok": true, "result":
...}``), records every call, and answers each method with a plausible result. In-process bot
tests fake Telegram at aiogram's session layer instead.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Any

from aiohttp import web

BOT_USER = {
    "id": 424242,
    "is_bot": True,
    "first_name": "Cocoon",
    "username": "cocoon_test_bot",
    "can_join_groups": False,
    "can_read_all_group_messages": False,
    "supports_inline_queries": False,
}
TRUE_METHODS = {
    "setmycommands",
    "setwebhook",
    "deletewebhook",
    "answercallbackquery",
    "answerprecheckoutquery",
    "sendchataction",
    "sendmessagedraft",
    "deletemessage",
    "setchatmenubutton",
    "deletemycommands",
}


class FakeTelegram:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._ids = itertools.count(1000)
        self.app = web.Application()
        self.app.router.add_route("*", "/bot{token}/{method}", self._handle)
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        self._runner = web.AppRunner(self.app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def methods(self) -> list[str]:
        return [method for method, _ in self.calls]

    async def _params(self, request: web.Request) -> dict[str, Any]:
        if request.content_type == "application/json":
            return dict(await request.json())
        data = await request.post()
        params: dict[str, Any] = {}
        for key, value in data.items():
            text = value if isinstance(value, str) else "<file>"
            try:
                params[key] = json.loads(text)
            except ValueError:
                params[key] = text
        return params

    async def _handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        params = await self._params(request)
        self.calls.append((method, params))
        name = method.lower()
        if name == "getme":
            result: Any = BOT_USER
        elif name == "getupdates":
            await asyncio.sleep(min(float(params.get("timeout") or 0), 0.5))
            result = []
        elif name in TRUE_METHODS:
            result = True
        elif name == "createinvoicelink":
            result = "https://t.me/$fake-invoice"
        elif name in {"sendmessage", "editmessagetext", "sendinvoice", "sendphoto"}:
            result = {
                "message_id": int(params.get("message_id") or next(self._ids)),
                "date": int(time.time()),
                "chat": {"id": int(params.get("chat_id") or 0), "type": "private"},
                "text": str(params.get("text") or ""),
            }
        else:
            result = True
        return web.json_response({"ok": True, "result": result})


class TelegramWithOneMessage(FakeTelegram):
    """The fake Bot API server, whose long polling delivers one message from a user once."""

    def __init__(self, user_id: int, text: str) -> None:
        super().__init__()
        self.update: dict[str, object] | None = {
            "update_id": 1,
            "message": {
                "message_id": 1,
                "date": int(time.time()),
                "chat": {"id": user_id, "type": "private", "first_name": "Ann"},
                "from": {"id": user_id, "is_bot": False, "first_name": "Ann"},
                "text": text,
            },
        }

    async def _handle(self, request: web.Request) -> web.Response:
        if request.match_info["method"].lower() == "getupdates" and self.update is not None:
            update, self.update = self.update, None
            self.calls.append(("getUpdates", {}))
            return web.json_response({"ok": True, "result": [update]})
        return await super()._handle(request)
