"""A fake Telegram for the bot tests, at aiogram's session layer only.

:class:`FakeTelegram` is a ``BaseSession``: it records every request the bot makes and answers
with queued results, or, when none is queued, with what the Bot API would: a refusal where
Telegram's rules refuse the request (tests/support/telegram_rules.py: content, state and flood
control, the same rules as the HTTP stand-in's), else a sent or edited message with a fresh id,
``True``, ``getMe``'s user. Queued errors travel through aiogram's
own ``check_response``, so they raise exactly what a real Bot API error would. Updates are
built as Bot API JSON and fed with :func:`feed` (which tells the rules what Telegram delivered:
a reply to a message the bot never saw is refused, as Telegram would).
"""

from __future__ import annotations

import itertools
import json
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from typing import Any

from aiogram import Bot, Dispatcher
from aiogram.client.session.base import BaseSession
from aiogram.methods import TelegramMethod
from aiogram.types import Update
from aiohttp import ClientResponseError, RequestInfo
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from tests.support import telegram_rules

BOT_ID = 42
TOKEN = f"{BOT_ID}:TEST-TOKEN"


class FakeTelegram(BaseSession):
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.requests: list[TelegramMethod[Any]] = []
        self.results: list[Any] = []  # what each request returned (None when it failed)
        self.rules = telegram_rules.TelegramState(clock)
        self.files = self.rules.files  # file_id → content, for getFile and downloads
        self.times: list[float] = []  # time.monotonic() of each request
        self.queued: dict[str, deque[tuple[int, dict[str, Any]]]] = {}

    # -- scripting -----------------------------------------------------------------

    def reply(self, method: str, result: Any) -> None:
        """The next ``method`` call returns ``result`` (Bot API JSON)."""
        self.queued.setdefault(method, deque()).append((200, {"ok": True, "result": result}))

    def fail(
        self, method: str, status: int, description: str, retry_after: int | None = None
    ) -> None:
        """The next ``method`` call fails like the Bot API would."""
        body: dict[str, Any] = {"ok": False, "error_code": status, "description": description}
        if retry_after is not None:
            body["parameters"] = {"retry_after": retry_after}
        self.queued.setdefault(method, deque()).append((status, body))

    # -- reading -------------------------------------------------------------------

    def calls(self, method: str) -> list[TelegramMethod[Any]]:
        return [r for r in self.requests if r.__api_method__ == method]

    def texts(self, method: str = "sendMessage") -> list[str]:
        return [str(getattr(r, "text", "")) for r in self.calls(method)]

    def all_text(self) -> str:
        return "\n".join(
            str(getattr(r, "text", None) or getattr(r, "description", None) or "")
            for r in self.requests
        )

    def timed(self, method: str) -> list[tuple[float, TelegramMethod[Any]]]:
        return [
            (t, r)
            for t, r in zip(self.times, self.requests, strict=False)
            if r.__api_method__ == method
        ]

    def sent(self, method: str) -> list[Any]:
        """What each ``method`` call returned (a sent message, with its id)."""
        return [
            result
            for request, result in zip(self.requests, self.results, strict=True)
            if request.__api_method__ == method
        ]

    def clear(self) -> None:
        self.results.clear()
        self.requests.clear()
        self.times.clear()

    # -- BaseSession -----------------------------------------------------------------

    async def make_request(
        self,
        bot: Bot,
        method: TelegramMethod[Any],
        timeout: int | None = None,  # noqa: ASYNC109 (BaseSession's signature)
    ) -> Any:
        self.requests.append(method)
        self.times.append(time.monotonic())
        name = method.__api_method__
        queue = self.queued.get(name)
        refused = None if queue else self.rules.check(name, method)
        if queue:
            status, body = queue.popleft()
        elif refused is not None:
            status, body = refused.status, {"ok": False, "error_code": refused.status}
            body["description"] = refused.description
            if refused.retry_after is not None:
                body["parameters"] = {"retry_after": refused.retry_after}
        else:
            status, body = 200, {"ok": True, "result": self._default(bot, method)}
            self.rules.remember(name, method, body["result"])
        self.results.append(None)
        response = self.check_response(bot, method, status, json.dumps(body))
        self.results[-1] = response.result
        return response.result

    def _default(self, bot: Bot, method: TelegramMethod[Any]) -> Any:
        name = method.__api_method__
        if name == "getMe":
            return {"id": BOT_ID, "is_bot": True, "first_name": "Cocoon", "username": "cocoon_bot"}
        returning = str(method.__returning__)
        if "Message" in returning:
            chat_id = getattr(method, "chat_id", None) or 1
            message_id = getattr(method, "message_id", None) or self.rules.next_message_id(
                int(chat_id)
            )
            result: dict[str, Any] = {
                "message_id": message_id,
                "date": int(time.time()),
                "chat": {"id": chat_id, "type": "private" if chat_id > 0 else "group"},
                "from": {"id": BOT_ID, "is_bot": True, "first_name": "Cocoon"},
            }
            text = getattr(method, "text", None)
            if isinstance(text, str):
                result["text"] = text
            thread = getattr(method, "message_thread_id", None)
            if thread is not None:
                result["message_thread_id"], result["is_topic_message"] = thread, True
            return result
        if name == "getFile":
            return self.rules.file(str(getattr(method, "file_id", "")))
        if "str" in returning:
            return "https://t.me/$invoice"
        return True

    async def close(self) -> None:
        pass

    async def stream_content(self, *args: Any, **kwargs: Any) -> AsyncGenerator[bytes, None]:
        """A download: the bytes of the file its URL names (``.../files/<file_id>``); a path
        getFile never gave fails as Telegram's 404 would."""
        url = str(kwargs.get("url") or (args[0] if args else ""))
        content = self.rules.download("/".join(url.rsplit("/", 2)[-2:]))
        if content is None:
            info = RequestInfo(URL(url), "GET", CIMultiDictProxy(CIMultiDict()), URL(url))
            raise ClientResponseError(info, (), status=404, message="Not Found")
        yield content


# -------------------------------------------------------------------------- updates

_update_ids = itertools.count(1)
_message_ids = itertools.count(1)


def person(user_id: int, language: str = "en", first_name: str = "Ada") -> dict[str, Any]:
    return {"id": user_id, "is_bot": False, "first_name": first_name, "language_code": language}


def message_update(
    user_id: int,
    text: str | None = None,
    *,
    language: str = "en",
    chat_id: int | None = None,
    chat_type: str = "private",
    **extra: Any,
) -> dict[str, Any]:
    chat = chat_id if chat_id is not None else user_id
    message: dict[str, Any] = {
        "message_id": next(_message_ids),
        "date": int(time.time()),
        "chat": {"id": chat, "type": chat_type},
        "from": person(user_id, language),
        **extra,
    }
    if text is not None:
        message["text"] = text
        if text.startswith("/"):
            command = text.split()[0]
            message["entities"] = [{"type": "bot_command", "offset": 0, "length": len(command)}]
    return {"update_id": next(_update_ids), "message": message}


def bot_message(
    chat_id: int, text: str, message_id: int, *, sender: int = BOT_ID, name: str = "Cocoon"
) -> dict[str, Any]:
    """A message a bot (this one unless ``sender`` says another) sent to a supergroup, as a
    reply to it carries it in ``reply_to_message``."""
    return {
        "message_id": message_id,
        "date": 0,
        "chat": {"id": chat_id, "type": "supergroup"},
        "from": {"id": sender, "is_bot": True, "first_name": name},
        "text": text,
    }


def callback_update(
    user_id: int,
    data: str,
    *,
    message_id: int = 1,
    language: str = "en",
    chat_id: int | None = None,
) -> dict[str, Any]:
    chat = chat_id if chat_id is not None else user_id
    return {
        "update_id": next(_update_ids),
        "callback_query": {
            "id": str(next(_update_ids)),
            "from": person(user_id, language),
            "chat_instance": "ci",
            "data": data,
            "message": {
                "message_id": message_id,
                "date": int(time.time()),
                "chat": {"id": chat, "type": "private" if chat > 0 else "group"},
                "from": {"id": BOT_ID, "is_bot": True, "first_name": "Cocoon"},
                "text": "…",
            },
        },
    }


def pre_checkout_update(user_id: int, payload: str, stars: int) -> dict[str, Any]:
    return {
        "update_id": next(_update_ids),
        "pre_checkout_query": {
            "id": f"pcq-{next(_update_ids)}",
            "from": person(user_id),
            "currency": "XTR",
            "total_amount": stars,
            "invoice_payload": payload,
        },
    }


def payment_update(user_id: int, payload: str, stars: int, charge_id: str) -> dict[str, Any]:
    return message_update(
        user_id,
        successful_payment={
            "currency": "XTR",
            "total_amount": stars,
            "invoice_payload": payload,
            "telegram_payment_charge_id": charge_id,
            "provider_payment_charge_id": "",
        },
    )


def stopped_update(chat_id: int, draft_id: int) -> dict[str, Any]:
    return {
        "update_id": next(_update_ids),
        "stopped_message_generation": {
            "chat": {"id": chat_id, "type": "private"},
            "draft_id": draft_id,
        },
    }


async def feed(dp: Dispatcher, bot: Bot, update: dict[str, Any]) -> Any:
    if isinstance(bot.session, FakeTelegram):
        bot.session.rules.saw(update)
    return await dp.feed_update(bot, Update.model_validate(update, context={"bot": bot}))
