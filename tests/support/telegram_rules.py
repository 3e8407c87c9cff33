"""Telegram's Bot API rules, as the stand-in Bot API (tests/support/bot_fakes.py) enforces them.

A request the real Bot API would refuse is refused here with the status and description it
sends (so aiogram raises what it would): text over 4096 characters (after HTML parsing),
a caption over 1024, HTML Telegram cannot parse (an unknown or unbalanced tag, a bad entity),
callback data over 64 bytes, a URL button whose scheme is not http(s) or tg, an alert over 200
characters, drafts outside private chats or with a zero id, and an edit that changes nothing
("message is not modified"). Sources: core.telegram.org/bots/api (sendMessage, formatting
options, InlineKeyboardButton, answerCallbackQuery, sendMessageDraft).
"""

from __future__ import annotations

import html
import json
from html.parser import HTMLParser
from typing import Any

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

Refusal = tuple[int, str]


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
    """Telegram's answer to ``method`` when it refuses it; None when it accepts it."""
    bad = "Bad Request: "
    for button in _buttons(getattr(method, "reply_markup", None)):
        data = getattr(button, "callback_data", None)
        if data is not None and not 1 <= len(data.encode()) <= MAX_CALLBACK_DATA:
            return 400, bad + "BUTTON_DATA_INVALID"
        url = getattr(button, "url", None)
        if url is not None and not url.startswith(("http://", "https://", "tg://")):
            return 400, bad + "BUTTON_URL_INVALID"
    text = getattr(method, "text", None)
    if name == "answerCallbackQuery":
        if text is not None and len(text) > MAX_ALERT:
            return 400, bad + "MESSAGE_TOO_LONG"
        return None
    if name == "sendMessageDraft":
        if int(method.chat_id) < 0:
            return 400, bad + "TEXTDRAFT_PEER_INVALID"
        if not method.draft_id:
            return 400, bad + "draft_id must be non-zero"
    caption = getattr(method, "caption", None)
    if caption is not None:
        seen, error = visible(caption, getattr(method, "parse_mode", None))
        if error is not None:
            return 400, bad + "can't parse entities: " + error
        if len(seen) > MAX_CAPTION:
            return 400, bad + "message caption is too long"
    if text is None:
        return None
    seen, error = visible(text, getattr(method, "parse_mode", None))
    if error is not None:
        return 400, bad + "can't parse entities: " + error
    if name != "sendMessageDraft" and not seen.strip():
        return 400, bad + "message text is empty"
    if len(seen) > MAX_TEXT:
        return 400, bad + "message is too long"
    if name == "editMessageText":
        key = (int(method.chat_id or 0), int(method.message_id or 0))
        markup = getattr(method, "reply_markup", None)
        state = json.dumps([seen, markup.model_dump() if markup is not None else None])
        if shown.get(key) == state:
            return 400, bad + (
                "message is not modified: specified new message content and reply markup are "
                "exactly the same as a current content and reply markup of the message"
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
    markup = getattr(method, "reply_markup", None)
    state = json.dumps([seen, markup.model_dump() if markup is not None else None])
    shown[(int(chat), int(result["message_id"]))] = state
