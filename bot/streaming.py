"""A reply as it grows: Telegram drafts in private chats, throttled edits elsewhere.

Drafts (``sendMessageDraft``) animate in place and carry Telegram's own stop button
(``can_stop``); they are ephemeral, so the reply always ends with real messages. Where drafts
are not possible (groups, or a Bot API server that refuses them) the reply is a message edited
at most once per ``edit_interval_s`` with an inline stop button. The final text is rendered
from Markdown to HTML, split past Telegram's limit, and sent as plain text if Telegram still
refuses the HTML.
"""

from __future__ import annotations

import asyncio
import html
import logging
import time
from collections.abc import Callable
from typing import Any

from aiogram import Bot
from aiogram.enums import ParseMode
from aiogram.exceptions import TelegramBadRequest, TelegramRetryAfter
from aiogram.types import InlineKeyboardButton, InlineKeyboardMarkup, Message

from bot.i18n import _
from bot.render import markdown_to_html, plain_preview, split_markdown
from bot.telegram import cannot_parse, not_modified

log = logging.getLogger("cocoon.bot.stream")

STOP = "stop"
DRAFT_INTERVAL_S = 0.5
EDIT_INTERVAL_S = 1.0
"""At most one edit per second per chat (Telegram's limit for a chat is about that)."""


def stop_keyboard() -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(
        inline_keyboard=[[InlineKeyboardButton(text=_("■ Stop"), callback_data=STOP)]]
    )


class ReplyStream:
    def __init__(
        self,
        bot: Bot,
        chat_id: int,
        *,
        draft_id: int,
        use_draft: bool,
        draft_interval_s: float | None = None,
        edit_interval_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.bot = bot
        self.chat_id = chat_id
        self.options = options or {}  # send_message's: the forum topic, the reply to the asker
        self.draft_id = draft_id
        self.use_draft = use_draft
        self.draft_interval_s = DRAFT_INTERVAL_S if draft_interval_s is None else draft_interval_s
        self.edit_interval_s = EDIT_INTERVAL_S if edit_interval_s is None else edit_interval_s
        self.clock = clock
        self.message_id: int | None = None
        self._last_sent = float("-inf")
        self._paused_until = float("-inf")
        self._shown = ""

    async def start(self) -> None:
        """Show that an answer is coming: the "Thinking…" draft, or a placeholder message."""
        if self.use_draft:
            try:
                await self._draft("")
                return
            except TelegramRetryAfter as error:
                self._paused_until = self.clock() + error.retry_after
                return
            except TelegramBadRequest as error:
                log.info("drafts refused (%s): editing a message instead", error.message)
                self.use_draft = False
        message = await self.bot.send_message(
            self.chat_id, "…", parse_mode=None, reply_markup=stop_keyboard(), **self.options
        )
        self.message_id = message.message_id
        self._last_sent = self.clock()

    async def _draft(self, text: str, mode: str | None = None) -> None:
        await self.bot.send_message_draft(
            chat_id=self.chat_id,
            draft_id=self.draft_id,
            text=text,
            parse_mode=mode,
            can_stop=True,
        )

    async def _show(self, preview: str, mode: str | None) -> None:
        if self.use_draft:
            await self._draft(preview, mode)
        else:
            await self.bot.edit_message_text(
                text=preview,
                chat_id=self.chat_id,
                message_id=self.message_id,
                parse_mode=mode,
                reply_markup=stop_keyboard(),
            )

    async def update(self, text: str) -> None:
        """Show the reply so far, unless the last update was too recent."""
        now = self.clock()
        interval = self.draft_interval_s if self.use_draft else self.edit_interval_s
        if now < self._paused_until or now - self._last_sent < interval:
            return
        preview = plain_preview(text)
        if not preview.strip() or preview == self._shown:
            return
        self._last_sent = now
        try:
            try:  # as it will look: safe HTML of the Markdown so far
                await self._show(markdown_to_html(preview), ParseMode.HTML)
            except TelegramBadRequest as error:
                if not cannot_parse(error):
                    raise
                await self._show(preview, None)
            self._shown = preview
        except TelegramRetryAfter as error:
            self._paused_until = self.clock() + error.retry_after
        except TelegramBadRequest as error:
            if not_modified(error):
                return
            if self.use_draft:
                log.info("a draft was refused (%s): editing a message instead", error.message)
                self.use_draft = False
                await self.start()
            else:
                raise

    async def finish(
        self, text: str, footer: str = "", markup: InlineKeyboardMarkup | None = None
    ) -> list[Message]:
        """The final reply as real messages, the footer (plain text, shown in italics) and
        ``markup`` on the last one; the placeholder (if any) becomes the first of them."""
        pieces = split_markdown(text)
        sent: list[Message] = []
        for index, piece in enumerate(pieces):
            body, plain = markdown_to_html(piece), piece
            last = index == len(pieces) - 1
            if footer and last:
                body = f"{body}\n\n<i>{html.escape(footer, quote=False)}</i>"
                plain = f"{plain}\n\n{footer}"
            reuse = self.message_id if index == 0 else None
            sent.append(await self._put(body, plain, reuse, markup if last else None))
        return sent

    async def fail(self, text: str) -> None:
        """End the reply with an explanation (the placeholder, if any, shows it)."""
        if self.message_id is not None:
            try:
                await self.bot.edit_message_text(
                    text=text, chat_id=self.chat_id, message_id=self.message_id, parse_mode=None
                )
                return
            except TelegramBadRequest as error:
                if not_modified(error):
                    return
        await self.bot.send_message(self.chat_id, text, parse_mode=None, **self.options)

    async def _put(
        self,
        html_text: str,
        plain: str,
        message_id: int | None,
        markup: InlineKeyboardMarkup | None = None,
    ) -> Message:
        try:
            return await self._send(html_text, ParseMode.HTML, message_id, markup)
        except TelegramBadRequest as error:
            if not cannot_parse(error):
                raise
            log.warning("Telegram refused the reply's HTML; sending it as plain text")
        return await self._send(plain, None, message_id, markup)

    async def _send(
        self,
        text: str,
        mode: str | None,
        message_id: int | None,
        markup: InlineKeyboardMarkup | None = None,
    ) -> Message:
        if message_id is None:
            return await self.bot.send_message(
                self.chat_id, text, parse_mode=mode, reply_markup=markup, **self.options
            )
        # Even the last edit keeps to one edit per interval.
        wait = self._last_sent + self.edit_interval_s - self.clock()
        if wait > 0:
            await asyncio.sleep(wait)
        self._last_sent = self.clock()
        try:
            result = await self.bot.edit_message_text(
                text=text,
                chat_id=self.chat_id,
                message_id=message_id,
                parse_mode=mode,
                reply_markup=markup,
            )
        except TelegramBadRequest as error:
            if not not_modified(error):
                raise
            result = True
        if isinstance(result, Message):
            return result
        return Message.model_validate(
            {"message_id": message_id, "date": 0, "chat": {"id": self.chat_id, "type": "private"}}
        )
