"""One chat turn, as every handler that starts one runs it (a message, /ask, /retry, a caption, a
document, an edit, Regenerate, Continue, a kept question): the prompt's checks, the reply
streamed into the chat, and the place's context kept. Handlers take it by name as ``runner``
(:class:`TurnRunner`, made once with the services in :func:`bot.app.build_dispatcher`)."""

from __future__ import annotations

import contextlib
import logging
import secrets
import uuid
from dataclasses import dataclass

from aiogram import Bot
from aiogram.exceptions import TelegramForbiddenError
from aiogram.types import Message
from redis.exceptions import RedisError

from backend.bounds import IMAGE_TOKEN_BOUND
from backend.dispatch import Dispatcher as TurnDispatcher
from backend.dispatch import Turn, TurnDone, TurnError, TurnRequest, TurnText, prompt_token_bound
from backend.errors import ErrorCode
from backend.models import User
from backend.pricing import affordable_completion_tokens, default_max_tokens
from backend.ratelimit import RateLimiter
from backend.settings import Settings
from bot import images as bot_images
from bot.admission import turn_started
from bot.common import answer_keyboard, refused_keyboard, ton, user_model
from bot.context import ContextStore, Conversation, LastTurn, trim
from bot.errors import error_text
from bot.groups import Place
from bot.i18n import _, ngettext
from bot.services import RunningTurns
from bot.streaming import ReplyStream
from bot.telegram import mark_told
from workers.logcontext import bind
from workers.wire import MAX_IMAGES, ChatMessage, ImagePart, ImageUrl

log = logging.getLogger("cocoon.bot.chat")

MIN_REPLY_TOKENS = 32
"""A balance that covers fewer tokens than this gets a refusal, not a stub of an answer."""


def footer(done: TurnDone) -> str:
    tee = _("development TEE") if done.worker.tee == "dev" else done.worker.tee.upper()
    text = _("{model} · {prompt} + {completion} tokens · {cost} · {tee}").format(
        model=done.model,
        prompt=done.prompt_tokens,
        completion=done.completion_tokens,
        cost=ton(done.cost),
        tee=tee,
    )
    if done.finish_reason == "cancelled":
        text += " · " + _("stopped")
    elif done.finish_reason == "length":
        text += " · " + _("cut at the length limit")
    return text


def turn_error_text(error: TurnError, model: str, images: list[str] | None) -> str:
    """Why a turn was refused or failed; with images, a refusal is the model's worker not
    reading them."""
    if images and error.code == ErrorCode.INVALID_REQUEST:
        return _(
            "The worker serving {model} could not read your image. You were not charged; "
            "/model lists the models."
        ).format(model=model)
    return error_text(error, model=model)


@dataclass(frozen=True)
class TurnRunner:
    """The services a chat turn runs on."""

    settings: Settings
    turns: TurnDispatcher
    contexts: ContextStore
    running: RunningTurns
    limiter: RateLimiter

    async def reply(
        self,
        message: Message,
        bot: Bot,
        user: User,
        prompt: str,
        images: list[str] | None = None,
        image_ids: list[str] | None = None,
    ) -> None:
        """A turn for ``prompt`` (none when it is empty) after the place's context, with
        ``images`` (data URLs, for a model that reads them) shown with it; ``image_ids`` are
        their Telegram file ids, kept for /retry."""
        if prompt:
            await self._reply(message, bot, user, prompt, None, images, image_ids)

    async def _reply(
        self,
        message: Message,
        bot: Bot,
        user: User,
        prompt: str,
        conversation: Conversation | None,
        images: list[str] | None = None,
        image_ids: list[str] | None = None,
    ) -> None:
        """Check the prompt and the rate, then answer it after ``conversation`` (default: the
        chat's context), telling the user plainly when Redis is down."""
        try:
            if not await self._checked(message, prompt, user):
                return
            place = Place.of(message, user.telegram_id)
            if conversation is None:
                conversation = await self.contexts.load(self.contexts.scope_of(place))
            await self.answer(bot, place, user, prompt, conversation, images, image_ids)
        except RedisError as error:
            log.warning("chat turn failed on Redis: %s", type(error).__name__)
            await message.answer(_("The service is busy right now. Please try again in a minute."))

    async def retry(self, message: Message, bot: Bot, user: User) -> None:
        """The caller's last question in this place, answered again (replacing the answer). In
        a topic's shared context, the caller's own last question, never another member's."""
        place = Place.of(message, user.telegram_id)
        conversation = await self.contexts.load(self.contexts.scope_of(place))
        messages = list(conversation.messages)
        shared = self.contexts.shared(place)
        asked = [
            i
            for i, m in enumerate(messages)
            if m["role"] == "user" and (not shared or m.get("by") == str(user.telegram_id))
        ]
        if not asked:
            await message.answer(_("There is no answer to regenerate yet. Just write to me."))
            return
        start = end = asked[-1]
        end += 1
        while end < len(messages) and messages[end]["role"] == "assistant":
            end += 1
        prompt, image_ids = messages[start]["content"], bot_images.kept_ids(messages[start])
        shown = await self._images_again(message, bot, user, image_ids)
        if shown is None:
            return
        conversation.messages = messages[:start] + messages[end:]
        if shared:  # the topic's context is read again before the new answer is kept
            await self.contexts.save(self.contexts.scope_of(place), conversation)
        await self._reply(message, bot, user, prompt, conversation, shown, image_ids)

    async def _images_again(
        self, message: Message, bot: Bot, user: User, image_ids: list[str]
    ) -> list[str] | None:
        """A retried question's images, fetched again from Telegram by their file ids (the
        bot keeps no image bytes); none for a model that does not see images (the user is
        told); None, with the reason told, when Telegram cannot give them any more."""
        if not image_ids:
            return []
        model = user_model(self.settings, user)
        if not self.settings.models[model].vision:
            await message.answer(
                _("{model} does not see images, so I answer your caption alone.").format(
                    model=model
                )
            )
            return []
        try:
            return [await bot_images.fetch(bot, file_id) for file_id in image_ids]
        except bot_images.ImageRefused as refused:
            await message.answer(str(refused))
            return None

    async def _checked(self, message: Message, prompt: str, user: User) -> bool:
        settings = self.settings
        if len(prompt) > settings.max_prompt_chars:
            await message.answer(
                _(
                    "Your message is too long: {length} characters, and the limit is {limit}. "
                    "Please shorten it."
                ).format(length=len(prompt), limit=settings.max_prompt_chars)
            )
            return False
        wait = await self.limiter.allow(user.id)
        if wait:
            await message.answer(
                _("Too many messages: up to {limit} a minute. Try again in {seconds} s.").format(
                    limit=settings.rate_limit_per_minute, seconds=wait
                )
            )
            return False
        return True

    async def answer(
        self,
        bot: Bot,
        place: Place,
        user: User,
        prompt: str,
        conversation: Conversation,
        images: list[str] | None = None,
        image_ids: list[str] | None = None,
    ) -> None:
        """Run one turn for ``prompt`` after ``conversation``, streaming the reply into the chat
        (the asker's topic, as a reply to them in a group), and remember both in the place's
        context. ``images`` go with the prompt in the sealed request only: the context keeps
        the prompt's text and the images' Telegram file ids (``image_ids``), for /retry."""
        settings, turns, contexts, running = self.settings, self.turns, self.contexts, self.running
        scope, options = place.scope, place.send_options()
        context_scope, shared = contexts.scope_of(place), contexts.shared(place)
        asker = {} if place.private else {"by": str(user.telegram_id)}
        model = user_model(settings, user)
        price = settings.models[model]
        max_tokens = default_max_tokens(settings, price)
        system = 0  # what the system prompt adds to the prompt's bound
        if conversation.system:
            with_system = Conversation(system=conversation.system).chat_messages()
            system = prompt_token_bound(with_system) - prompt_token_bound([])
        pictures = (
            [ImagePart(image_url=ImageUrl(url=url)) for url in images[:MAX_IMAGES]]
            if images
            else None
        )
        shown = IMAGE_TOKEN_BOUND * len(pictures or ())  # what the images add to the bound
        shown_ids = list(image_ids or ())[: len(pictures or ())]
        history = trim(
            [
                *conversation.messages,
                {"role": "user", "content": prompt, **asker, **bot_images.kept(shown_ids)},
            ],
            budget_tokens=price.context_length - max_tokens - system - shown,
            max_messages=settings.context_max_messages,
        )

        def sent(history: list[dict[str, str]]) -> list[ChatMessage]:
            """The turn's messages: the history, the last one with the images."""
            messages = Conversation(messages=history, system=conversation.system).chat_messages()
            if pictures:
                last = messages[-1]
                messages[-1] = ChatMessage(role=last.role, content=last.content, images=pictures)
            return messages

        # A balance that covers a shorter answer gets one (with a note), not a refusal.
        note = ""
        affordable = affordable_completion_tokens(
            price,
            (await turns.ledger.balances(user.id)).available,
            prompt_tokens=prompt_token_bound(sent(history)),
        )
        if MIN_REPLY_TOKENS <= affordable < max_tokens:
            max_tokens = affordable
            note = _("a shorter answer: your balance covers {tokens}; /topup").format(
                tokens=ngettext("{n} token", "{n} tokens", affordable).format(n=affordable)
            )
        if not conversation.conversation_id:
            conversation.conversation_id = uuid.uuid4().hex
        draft_id = secrets.randbelow(2**31 - 1) + 1
        if not await running.acquire(scope, draft_id, user.telegram_id):
            await bot.send_message(
                place.chat_id,
                _("I am still writing the previous answer. Wait for it, or press stop."),
                **options,
            )
            return
        try:
            conversation.messages = history
            request = TurnRequest(
                user_id=user.id,
                model=model,
                messages=sent(history),
                max_tokens=max_tokens,
                conversation_id=f"tg-{conversation.conversation_id}",
            )
            try:
                turn = await turns.start_turn(request)
            except TurnError as error:
                turn_started()  # refused: the next update may start
                keyboard = None
                if error.code == ErrorCode.INSUFFICIENT_BALANCE and place.private:
                    # Kept (sealed with the context) and offered again once there is money.
                    conversation.messages, conversation.pending = history[:-1], prompt
                    await contexts.save(context_scope, conversation)
                    keyboard = refused_keyboard()
                await bot.send_message(
                    place.chat_id,
                    turn_error_text(error, model, images),
                    parse_mode=None,
                    reply_markup=keyboard,
                    **options,
                )
                return
            turn_started()  # what follows waits for the worker and Telegram, not for us
            bind(turn_id=turn.turn_id)
            stream = ReplyStream(
                bot, place.chat_id, draft_id=draft_id, use_draft=place.private, options=options
            )
            text = ""
            done: TurnDone | None = None
            try:
                await running.attach(scope, turn)
                await stream.start()
            except BaseException:
                # Telegram refused even the placeholder (blocked, chat gone): stop the job, and
                # settle it in the background (billed for what was generated, if anything).
                await turn.cancel()
                turns.keep(_drain(turn))
                raise
            try:
                # aclosing: leaving early (Telegram failed, shutdown) stops the job at once and
                # settles it in the background, billed for what was generated.
                async with contextlib.aclosing(turn.events()) as events:
                    async for event in events:
                        if isinstance(event, TurnText):
                            text += event.text
                            await stream.update(text)
                        elif isinstance(event, TurnDone):
                            done = event
                assert done is not None
                reply = text.strip()
                shown_footer = footer(done) + (" · " + note if note else "")
                await stream.finish(
                    reply or _("(no answer)"), shown_footer, answer_keyboard() if reply else None
                )
            except TurnError as error:
                await stream.fail(turn_error_text(error, model, images))
                return
            except Exception as error:
                await _tell_undelivered(bot, place, done, error)
                raise
            exchange = [history[-1]]
            if reply:
                exchange.append({"role": "assistant", "content": reply, **asker})
            if shared:
                # Others may have asked in this topic meanwhile: theirs stay, this one follows.
                latest = await contexts.load(context_scope)
                latest.messages = [*latest.messages, *exchange]
                latest.conversation_id = latest.conversation_id or conversation.conversation_id
                conversation = latest
            else:
                conversation.messages = [*history[:-1], *exchange]
            conversation.last = LastTurn(turn_id=done.turn_id, model=done.model, worker=done.worker)
            await contexts.save(context_scope, conversation)
        finally:
            await running.release(scope)


async def _tell_undelivered(
    bot: Bot, place: Place, done: TurnDone | None, error: Exception
) -> None:
    """Telegram refused the answer (or a piece of it) after the turn began: tell the asker
    what it cost them, then the dispatcher's last resort logs ``error`` (and says no more)."""
    if isinstance(error, TelegramForbiddenError):
        return  # blocked: nobody to tell
    text = (
        _(
            "Telegram stopped taking this answer, so it was cut off. You pay only for what the "
            "worker wrote until then."
        )
        if done is None
        else _(
            "Your answer was written but Telegram would not take it, so you did not see "
            "it. It cost {cost}."
        ).format(cost=ton(done.cost))
    )
    with contextlib.suppress(Exception):  # Telegram still failing: the log keeps it
        await bot.send_message(place.chat_id, text, parse_mode=None, **place.send_options())
    mark_told(error)


async def _drain(turn: Turn) -> None:
    with contextlib.suppress(TurnError):
        async for _event in turn.events():
            pass
