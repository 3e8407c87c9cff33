"""Telegram's Bot API rules, as both stand-in Bot APIs enforce them: the session-layer one
(tests/support/bot_fakes.py) and the HTTP server (tests/support/fake_telegram.py), through one
:class:`TelegramState` each.

A request the real Bot API would refuse is refused here with the status and description it
sends (so aiogram raises what it would):

* content: text over 4096 characters (after HTML parsing), a caption over 1024, HTML Telegram
  cannot parse (an unknown or unbalanced tag, a bad entity), an empty text, callback data over
  64 bytes, a URL button whose scheme is not http(s) or tg, an alert over 200 characters, drafts
  outside private chats or with a zero id;
* state: an edit that changes nothing ("message is not modified"), an edit or delete of a message
  that is not in that chat (or, for edits, not the bot's), a reply to a message that is not in
  the chat it names (unless ``allow_sending_without_reply``), a ``message_thread_id`` that is
  no topic seen in that chat, a callback query answered twice;
* flood control (429 with ``retry_after``): more than 20 new messages a minute in one group,
  more than 30 a second in all, and in one private chat more than one a second after a burst
  of five (Telegram documents "about one a second" without the burst's size: five is this
  stand-in's choice). Edits and drafts are not counted (Telegram does not document their limit);
* files: ``getFile`` of a file id Telegram does not have, or of a file over 20 MB (what a bot
  may download); a file it gives is downloaded from its ``file_path``.

Sources: core.telegram.org/bots/api (sendMessage, formatting options, InlineKeyboardButton,
answerCallbackQuery, sendMessageDraft, ReplyParameters, getFile), core.telegram.org/bots/faq
(limits).
"""

from __future__ import annotations

import html
import json
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from html.parser import HTMLParser
from typing import Any, NamedTuple

MAX_TEXT = 4096
MAX_CAPTION = 1024
MAX_CALLBACK_DATA = 64
MAX_ALERT = 200
TAGS = {
    "b",
    "strong",
    "i",
    "em",
    "u",
    "ins",
    "s",
    "strike",
    "del",
    "span",
    "tg-spoiler",
    "a",
    "tg-emoji",
    "code",
    "pre",
    "blockquote",
}

GROUP_PER_MINUTE = 20
ALL_PER_SECOND = 30
PRIVATE_BURST = 5
PRIVATE_PER_SECOND = 1.0
NEW_MESSAGES = {
    "sendMessage",
    "sendPhoto",
    "sendDocument",
    "sendInvoice",
    "sendAudio",
    "sendVoice",
    "sendVideo",
    "sendAnimation",
    "sendSticker",
    "sendMediaGroup",
    "copyMessage",
    "forwardMessage",
}


MAX_DOWNLOAD_BYTES = 20 * 2**20
"""The largest file a bot may download (getFile refuses larger ones)."""
FILE_FOLDER = "files"


class Refusal(NamedTuple):
    status: int
    description: str
    retry_after: int | None = None


class _TelegramHTML(HTMLParser):
    """Telegram's HTML subset: known tags, balanced, entities it knows; the visible text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.stack: list[str] = []
        self.text: list[str] = []
        self.error: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in TAGS:
            self.error = f'Unsupported start tag "{tag}"'
        elif tag == "a" and not dict(attrs).get("href"):
            self.error = "Can't find end of the URL"
        self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.error = f'Unmatched end tag "{tag}"'
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def handle_entityref(self, name: str) -> None:
        if name not in {"lt", "gt", "amp", "quot"}:
            self.error = f'Unsupported HTML entity "&{name};"'
        self.text.append(html.unescape(f"&{name};"))

    def handle_charref(self, name: str) -> None:
        self.text.append(html.unescape(f"&#{name};"))


def visible(text: str, parse_mode: str | None) -> tuple[str, str | None]:
    """The text a user sees, and why Telegram cannot parse it (None: it can)."""
    if parse_mode != "HTML":
        return text, None
    parser = _TelegramHTML()
    parser.feed(text)
    parser.close()
    if parser.error is None and parser.stack:
        parser.error = f'Can\'t find end tag corresponding to start tag "{parser.stack[-1]}"'
    return "".join(parser.text), parser.error


def _buttons(markup: Any) -> list[Any]:
    rows = getattr(markup, "inline_keyboard", None) or []
    return [button for row in rows for button in row]


def check(name: str, method: Any, shown: dict[tuple[int, int], str]) -> Refusal | None:
    """Telegram's answer to ``method`` when its content is refused; None when it is not."""
    bad = "Bad Request: "
    for button in _buttons(getattr(method, "reply_markup", None)):
        data = getattr(button, "callback_data", None)
        if data is not None and not 1 <= len(data.encode()) <= MAX_CALLBACK_DATA:
            return Refusal(400, bad + "BUTTON_DATA_INVALID")
        url = getattr(button, "url", None)
        if url is not None and not url.startswith(("http://", "https://", "tg://")):
            return Refusal(400, bad + "BUTTON_URL_INVALID")
    text = getattr(method, "text", None)
    if name == "answerCallbackQuery":
        if text is not None and len(text) > MAX_ALERT:
            return Refusal(400, bad + "MESSAGE_TOO_LONG")
        return None
    if name == "sendMessageDraft":
        if int(method.chat_id) < 0:
            return Refusal(400, bad + "TEXTDRAFT_PEER_INVALID")
        if not method.draft_id:
            return Refusal(400, bad + "draft_id must be non-zero")
    caption = getattr(method, "caption", None)
    if caption is not None:
        seen, error = visible(caption, getattr(method, "parse_mode", None))
        if error is not None:
            return Refusal(400, bad + "can't parse entities: " + error)
        if len(seen) > MAX_CAPTION:
            return Refusal(400, bad + "message caption is too long")
    if text is None:
        return None
    seen, error = visible(text, getattr(method, "parse_mode", None))
    if error is not None:
        return Refusal(400, bad + "can't parse entities: " + error)
    if name != "sendMessageDraft" and not seen.strip():
        return Refusal(400, bad + "message text is empty")
    if len(seen) > MAX_TEXT:
        return Refusal(400, bad + "message is too long")
    if name == "editMessageText":
        key = (int(method.chat_id or 0), int(method.message_id or 0))
        if shown.get(key) == _state(seen, method):
            return Refusal(
                400,
                bad + "message is not modified: specified new message content and reply markup "
                "are exactly the same as a current content and reply markup of the message",
            )
    return None


def remember(name: str, method: Any, result: Any, shown: dict[tuple[int, int], str]) -> None:
    """What a sent or edited message now shows (for "not modified")."""
    if name not in {"sendMessage", "editMessageText"} or not isinstance(result, dict):
        return
    chat = result.get("chat", {}).get("id")
    text = getattr(method, "text", None)
    if chat is None or text is None:
        return
    seen, _error = visible(text, getattr(method, "parse_mode", None))
    shown[(int(chat), int(result["message_id"]))] = _state(seen, method)


def _state(seen: str, method: Any) -> str:
    markup = getattr(method, "reply_markup", None)
    if markup is not None and not isinstance(markup, dict):
        markup = markup.model_dump(exclude_none=True)
    return json.dumps([seen, markup], sort_keys=True)


def _set(value: Any) -> bool:
    """A flag given as true (aiogram's unresolved ``Default`` sentinels are not)."""
    return value is True or value == "true"


class TelegramState:
    """What one bot's Telegram knows that its rules depend on: the messages of each chat
    (incoming ones as :meth:`saw` them, the bot's as sent), the topics seen, the callback
    queries answered, what each message shows, and recent sends for flood control. Time comes
    from ``clock`` (inject one to test flood control without waiting)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.shown: dict[tuple[int, int], str] = {}
        self.messages: dict[tuple[int, int], bool] = {}  # (chat, id) → sent by the bot
        self.topics: dict[int, set[int]] = {}
        self.answered: set[str] = set()
        self.sends: dict[int, deque[float]] = {}
        self.all_sends: deque[float] = deque()
        self.tokens: dict[int, tuple[float, float]] = {}  # private chat → (tokens, at)
        self.files: dict[str, bytes] = {}  # file_id → content, for getFile and downloads

    # -- what Telegram delivered ------------------------------------------------------

    def saw(self, update: Mapping[str, Any]) -> None:
        """An update delivered to the bot: its messages now exist in their chats."""
        for kind in ("message", "edited_message", "channel_post"):
            if isinstance(update.get(kind), Mapping):
                self._saw_message(update[kind])
        query = update.get("callback_query")
        if isinstance(query, Mapping):
            # A query delivered is one not answered yet (Telegram never sends an id twice).
            self.answered.discard(str(query.get("id")))
        if isinstance(query, Mapping) and isinstance(query.get("message"), Mapping):
            # A button is pressed on a message the bot sent (its inline keyboard): the bot's.
            message = query["message"]
            self._saw_message(message)
            if isinstance(message.get("chat"), Mapping) and "message_id" in message:
                self.messages[(int(message["chat"]["id"]), int(message["message_id"]))] = True

    def _saw_message(self, message: Mapping[str, Any]) -> None:
        chat = int(message["chat"]["id"])
        sender = message.get("from") or {}
        # A test's made-up id may repeat one the bot's message has: the bot's stays its own.
        self.messages.setdefault((chat, int(message["message_id"])), bool(sender.get("is_bot")))
        if message.get("is_topic_message") and message.get("message_thread_id") is not None:
            self.topics.setdefault(chat, set()).add(int(message["message_thread_id"]))
        if message.get("forum_topic_created") is not None:
            self.topics.setdefault(chat, set()).add(int(message["message_id"]))
        replied = message.get("reply_to_message")
        if isinstance(replied, Mapping):
            self._saw_message(replied)

    def next_message_id(self, chat: int) -> int:
        """The id of the bot's next message in ``chat``: after every message seen there, as
        Telegram numbers a chat's messages in one sequence (at least 1000)."""
        seen = [message for (where, message) in self.messages if where == chat]
        return max([999, *seen]) + 1

    def file(self, file_id: str) -> dict[str, Any]:
        """``getFile``'s File for a file Telegram has (check() refused the others)."""
        return {
            "file_id": file_id,
            "file_unique_id": "u-" + file_id,
            "file_size": len(self.files[file_id]),
            "file_path": f"{FILE_FOLDER}/{file_id}",
        }

    def download(self, file_path: str) -> bytes | None:
        """The content at a ``file_path`` getFile gave; None for any other path."""
        folder, _, file_id = file_path.partition("/")
        return self.files.get(file_id) if folder == FILE_FOLDER else None

    # -- the rules ----------------------------------------------------------------------

    def check(self, name: str, method: Any) -> Refusal | None:
        """Telegram's answer to ``method`` when it refuses it; None when it accepts it."""
        refused = check(name, method, self.shown) or self._check_state(name, method)
        chat = _chat(method)
        if refused is None and name in NEW_MESSAGES and chat is not None:
            refused = self._flood(chat)
        return refused

    def _check_state(self, name: str, method: Any) -> Refusal | None:
        bad = "Bad Request: "
        if name == "getFile":
            content = self.files.get(method.file_id)
            if content is None:
                return Refusal(400, bad + "invalid file_id")
            if len(content) > MAX_DOWNLOAD_BYTES:
                return Refusal(400, bad + "file is too big")
        if name == "answerCallbackQuery":
            if method.callback_query_id in self.answered:
                return Refusal(
                    400,
                    bad + "query is too old and response timeout expired or query ID is invalid",
                )
            return None
        chat = _chat(method)
        if chat is None:
            return None  # an @channel name or an inline message: not tracked
        if name in {"editMessageText", "editMessageReplyMarkup", "editMessageCaption"}:
            mine = self.messages.get((chat, int(method.message_id or 0)))
            if mine is None:
                return Refusal(400, bad + "message to edit not found")
            if not mine:
                return Refusal(400, bad + "message can't be edited")
        if name == "deleteMessage" and (chat, int(method.message_id)) not in self.messages:
            return Refusal(400, bad + "message to delete not found")
        thread = getattr(method, "message_thread_id", None)
        if thread is not None and int(thread) not in self.topics.get(chat, set()):
            return Refusal(400, bad + "message thread not found")
        reply = getattr(method, "reply_parameters", None)
        if isinstance(reply, Mapping):
            target, in_chat, anyway = (
                reply.get("message_id"),
                reply.get("chat_id"),
                reply.get("allow_sending_without_reply"),
            )
        elif reply is not None:
            target, in_chat = reply.message_id, reply.chat_id
            anyway = reply.allow_sending_without_reply
        else:
            target, in_chat = getattr(method, "reply_to_message_id", None), None
            anyway = getattr(method, "allow_sending_without_reply", None)
        if target is not None and not _set(anyway):
            where = int(in_chat) if in_chat is not None else chat
            if (where, int(target)) not in self.messages:
                return Refusal(400, bad + "message to be replied not found")
        return None

    def _flood(self, chat: int) -> Refusal | None:
        now = self.clock()
        while self.all_sends and self.all_sends[0] <= now - 1:
            self.all_sends.popleft()
        if len(self.all_sends) >= ALL_PER_SECOND:
            return _too_many(self.all_sends[0] + 1 - now)
        if chat < 0:
            sent = self.sends.setdefault(chat, deque())
            while sent and sent[0] <= now - 60:
                sent.popleft()
            if len(sent) >= GROUP_PER_MINUTE:
                return _too_many(sent[0] + 60 - now)
        else:
            tokens, at = self.tokens.get(chat, (float(PRIVATE_BURST), now))
            tokens = min(float(PRIVATE_BURST), tokens + (now - at) * PRIVATE_PER_SECOND)
            if tokens < 1:
                self.tokens[chat] = (tokens, now)
                return _too_many((1 - tokens) / PRIVATE_PER_SECOND)
            self.tokens[chat] = (tokens - 1, now)
        return None

    def remember(self, name: str, method: Any, result: Any) -> None:
        """What an accepted request changed: a sent message exists (and shows its text), an
        edit shows its text, a callback query is answered, a send counts for flood control."""
        if name == "answerCallbackQuery":
            self.answered.add(str(method.callback_query_id))
        if name == "deleteMessage":
            self.messages.pop((int(method.chat_id), int(method.message_id)), None)
        if isinstance(result, Mapping) and "message_id" in result and "chat" in result:
            chat = int(result["chat"]["id"])
            self.messages.setdefault((chat, int(result["message_id"])), True)
            if name in NEW_MESSAGES:
                self.all_sends.append(self.clock())
                if chat < 0:
                    self.sends.setdefault(chat, deque()).append(self.clock())
        remember(name, method, result, self.shown)


def _chat(method: Any) -> int | None:
    """The numeric chat a request names (None: none, or an @username)."""
    chat_id = getattr(method, "chat_id", None)
    if isinstance(chat_id, int):
        return chat_id
    if isinstance(chat_id, str) and chat_id.lstrip("-").isdigit():
        return int(chat_id)
    return None


def _too_many(seconds: float) -> Refusal:
    wait = max(1, math.ceil(seconds))
    return Refusal(429, f"Too Many Requests: retry after {wait}", wait)
