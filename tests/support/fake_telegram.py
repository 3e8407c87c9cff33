"""A Telegram Bot API server on loopback, for tests that run the bot in another process.

It speaks the Bot API's HTTP shape (``POST /bot<token>/<method>`` → ``{"ok": true, "result":
...}`` or ``{"ok": false, "error_code": ..., "description": ..., "parameters": ...}``), records
every call, reads each request into aiogram's own method type (a request Telegram could not read
is a 400), refuses what Telegram's rules refuse (tests/support/telegram_rules.py, the same
:class:`~tests.support.telegram_rules.TelegramState` as the session-layer stand-in: message
length, HTML, "not modified", callback answered once, replies and edits of messages that are
not there, unknown topics, flood control with ``retry_after``, getFile of an unknown file or
one over 20 MB), and answers the rest with what Telegram would, files downloaded from
``/file/bot<token>/<file_path>``. Updates it delivers by long polling, or that a test hands the
bot's webhook, are told to it with :meth:`FakeTelegram.saw`. In-process bot tests fake Telegram
at aiogram's session layer instead (tests/support/bot_fakes.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from aiogram import methods
from aiogram.methods import TelegramMethod
from aiohttp import web
from pydantic import ValidationError

from tests.support.telegram_rules import TelegramState

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


METHODS: dict[str, type[TelegramMethod[Any]]] = {
    cls.__api_method__.lower(): cls
    for cls in (getattr(methods, name) for name in methods.__all__)
    if isinstance(cls, type) and issubclass(cls, TelegramMethod) and cls is not TelegramMethod
}
"""The Bot API's methods by lowercase name (Telegram's method names are case-insensitive)."""

JSON_FIELDS = {
    "reply_markup",
    "reply_parameters",
    "entities",
    "caption_entities",
    "link_preview_options",
    "prices",
    "media",
    "allowed_updates",
    "commands",
    "scope",
    "menu_button",
}
"""Form fields that carry JSON (aiogram sends the rest as plain strings)."""


class FakeTelegram:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.rules = TelegramState(clock)
        self.refused: list[tuple[str, str]] = []  # (method, description) of each refusal
        self.app = web.Application()
        self.app.router.add_route("*", "/bot{token}/{method}", self._handle)
        self.app.router.add_get("/file/bot{token}/{path:.+}", self._download)
        self.files = self.rules.files  # file_id → content: getFile, then a download
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

    def saw(self, update: Mapping[str, Any]) -> None:
        """An update the bot got (by its webhook, say): its messages now exist for the rules."""
        self.rules.saw(update)

    async def _params(self, request: web.Request) -> dict[str, Any]:
        if request.content_type == "application/json":
            return dict(await request.json())
        data = await request.post()
        params: dict[str, Any] = {}
        for key, value in data.items():
            text = value if isinstance(value, str) else "<file>"
            if key in JSON_FIELDS:
                try:
                    params[key] = json.loads(text)
                except ValueError:
                    params[key] = text  # refused below, as Telegram would
            else:
                params[key] = text
        return params

    async def _handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        params = await self._params(request)
        self.calls.append((method, params))
        name = method.lower()
        kind = METHODS.get(name)
        if kind is None:
            return self._refuse(method, 404, "Not Found")
        try:
            call = kind.model_validate(params)
        except ValidationError as error:
            field = ".".join(str(part) for part in error.errors()[0]["loc"])
            return self._refuse(method, 400, f"Bad Request: invalid parameter {field}")
        refused = self.rules.check(kind.__api_method__, call)
        if refused is not None:
            return self._refuse(method, *refused)
        result = await self._result(name, params)
        self.rules.remember(kind.__api_method__, call, result)
        return web.json_response({"ok": True, "result": result})

    async def _download(self, request: web.Request) -> web.StreamResponse:
        """A file getFile gave, at ``/file/bot<token>/<file_path>``; 404 for any other path."""
        content = self.rules.download(request.match_info["path"])
        self.calls.append(("download", {"file_path": request.match_info["path"]}))
        if content is None:
            raise web.HTTPNotFound()
        return web.Response(body=content, content_type="application/octet-stream")

    def _refuse(
        self, method: str, status: int, description: str, retry_after: int | None = None
    ) -> web.Response:
        self.refused.append((method, description))
        body: dict[str, Any] = {"ok": False, "error_code": status, "description": description}
        if retry_after is not None:
            body["parameters"] = {"retry_after": retry_after}
        return web.json_response(body, status=status)

    async def _result(self, name: str, params: dict[str, Any]) -> Any:
        if name == "getme":
            return BOT_USER
        if name == "getupdates":
            await asyncio.sleep(min(float(params.get("timeout") or 0), 0.5))
            return []
        if name in TRUE_METHODS:
            return True
        if name == "getfile":  # the rules refused an unknown file id and one over 20 MB
            return self.rules.file(str(params.get("file_id") or ""))
        if name == "createinvoicelink":
            return "https://t.me/$fake-invoice"
        if name in {"sendmessage", "editmessagetext", "sendinvoice", "sendphoto"}:
            chat = int(params.get("chat_id") or 0)
            result: dict[str, Any] = {
                "message_id": int(params.get("message_id") or self.rules.next_message_id(chat)),
                "date": int(time.time()),
                "chat": {"id": chat, "type": "private" if chat > 0 else "supergroup"},
                "from": {k: BOT_USER[k] for k in ("id", "is_bot", "first_name", "username")},
                "text": str(params.get("text") or ""),
            }
            if params.get("message_thread_id") is not None:
                result["message_thread_id"] = int(params["message_thread_id"])
                result["is_topic_message"] = True
            return result
        return True


def private_message(
    user_id: int, text: str, first_name: str, *, update_id: int = 1, message_id: int = 1
) -> dict[str, object]:
    """The update Telegram delivers for ``text`` sent to the bot in a private chat."""
    return {
        "update_id": update_id,
        "message": {
            "message_id": message_id,
            "date": int(time.time()),
            "chat": {"id": user_id, "type": "private", "first_name": first_name},
            "from": {"id": user_id, "is_bot": False, "first_name": first_name},
            "text": text,
        },
    }


class TelegramWithOneMessage(FakeTelegram):
    """The fake Bot API server, whose long polling delivers one message from a user once."""

    def __init__(self, user_id: int, text: str) -> None:
        super().__init__()
        self.update: dict[str, object] | None = private_message(user_id, text, "Ann")

    async def _handle(self, request: web.Request) -> web.Response:
        if request.match_info["method"].lower() == "getupdates" and self.update is not None:
            update, self.update = self.update, None
            self.calls.append(("getUpdates", {}))
            self.saw(update)
            return web.json_response({"ok": True, "result": [update]})
        return await super()._handle(request)
