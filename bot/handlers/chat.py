"""Chat: a plain message starts a turn on the user's model; the reply streams; /new, /retry and
the stop button. Registered last: it takes every text that no command took."""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import uuid

from aiogram import Bot, F
from aiogram.enums import ChatType
from aiogram.filters import Command, CommandObject
from aiogram.types import (
    CallbackQuery,
    Message,
    MessageGenerationStopped,
)
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import RedisError

from backend.dispatch import Dispatcher as TurnDispatcher
from backend.dispatch import Turn, TurnDone, TurnError, TurnRequest, TurnText, prompt_token_bound
from backend.errors import ErrorCode
from backend.models import User
from backend.pricing import affordable_completion_tokens, default_max_tokens
from backend.ratelimit import RateLimiter
from backend.settings import Settings
from bot.common import Handlers, answer_keyboard, refused_keyboard, ton, user_model
from bot.context import ContextStore, Conversation, LastTurn, trim
from bot.errors import error_text
from bot.groups import Place, group_is_on, group_prompt
from bot.i18n import _, ngettext
from bot.services import RunningTurns
from bot.streaming import STOP, ReplyStream
from workers.logcontext import bind

log = logging.getLogger("cocoon.bot.chat")

handlers = Handlers("chat")

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


async def answer(
    bot: Bot,
    place: Place,
    user: User,
    prompt: str,
    conversation: Conversation,
    *,
    settings: Settings,
    turns: TurnDispatcher,
    contexts: ContextStore,
    running: RunningTurns,
) -> None:
    """Run one turn for ``prompt`` after ``conversation``, streaming the reply into the chat
    (the asker's topic, as a reply to them in a group), and remember both in the place's
    context."""
    scope, options = place.scope, place.send_options()
    model = user_model(settings, user)
    price = settings.models[model]
    max_tokens = default_max_tokens(settings, price)
    system = 0  # what the system prompt adds to the prompt's bound
    if conversation.system:
        with_system = Conversation(system=conversation.system).chat_messages()
        system = prompt_token_bound(with_system) - prompt_token_bound([])
    history = trim(
        [*conversation.messages, {"role": "user", "content": prompt}],
        budget_tokens=price.context_length - max_tokens - system,
        max_messages=settings.context_max_messages,
    )
    # A balance that covers a shorter answer gets one (with a note), not a refusal.
    note = ""
    affordable = affordable_completion_tokens(
        price,
        (await turns.ledger.balances(user.id)).available,
        prompt_tokens=prompt_token_bound(
            Conversation(messages=history, system=conversation.system).chat_messages()
        ),
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
            messages=Conversation(messages=history, system=conversation.system).chat_messages(),
            max_tokens=max_tokens,
            conversation_id=f"tg-{conversation.conversation_id}",
        )
        try:
            turn = await turns.start_turn(request)
        except TurnError as error:
            keyboard = None
            if error.code == ErrorCode.INSUFFICIENT_BALANCE and place.private:
                # Kept (sealed with the context) and offered again once there is money.
                conversation.messages, conversation.pending = history[:-1], prompt
                await contexts.save(scope, conversation)
                keyboard = refused_keyboard()
            await bot.send_message(
                place.chat_id,
                error_text(error, model=model),
                parse_mode=None,
                reply_markup=keyboard,
                **options,
            )
            return
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
        except TurnError as error:
            await stream.fail(error_text(error, model=model))
            return
        assert done is not None
        reply = text.strip()
        shown_footer = footer(done) + (" · " + note if note else "")
        await stream.finish(
            reply or _("(no answer)"), shown_footer, answer_keyboard() if reply else None
        )
        if reply:
            conversation.messages = [*history, {"role": "assistant", "content": reply}]
        conversation.last = LastTurn(turn_id=done.turn_id, model=done.model, worker=done.worker)
        await contexts.save(scope, conversation)
    finally:
        await running.release(scope)


async def _drain(turn: Turn) -> None:
    with contextlib.suppress(TurnError):
        async for _event in turn.events():
            pass


async def _checked(
    message: Message, prompt: str, settings: Settings, limiter: RateLimiter, user: User
) -> bool:
    if len(prompt) > settings.max_prompt_chars:
        await message.answer(
            _(
                "Your message is too long: {length} characters, and the limit is {limit}. "
                "Please shorten it."
            ).format(length=len(prompt), limit=settings.max_prompt_chars)
        )
        return False
    wait = await limiter.allow(user.id)
    if wait:
        await message.answer(
            _("Too many messages: up to {limit} a minute. Try again in {seconds} s.").format(
                limit=settings.rate_limit_per_minute, seconds=wait
            )
        )
        return False
    return True


@handlers.message(Command("new"))
async def cmd_new(message: Message, user: User, contexts: ContextStore) -> None:
    place = Place.of(message, user.telegram_id)
    await contexts.clear(place.scope)
    if place.private:
        await message.answer(_("Started over: I forgot this chat's earlier messages."))
    else:
        await message.reply(_("Started over: I forgot our earlier messages here."))


@handlers.message(Command("retry"))
async def cmd_retry(
    message: Message,
    bot: Bot,
    user: User,
    settings: Settings,
    turns: TurnDispatcher,
    contexts: ContextStore,
    running: RunningTurns,
    limiter: RateLimiter,
) -> None:
    await retry(message, bot, user, settings, turns, contexts, running, limiter)


async def retry(
    message: Message,
    bot: Bot,
    user: User,
    settings: Settings,
    turns: TurnDispatcher,
    contexts: ContextStore,
    running: RunningTurns,
    limiter: RateLimiter,
) -> None:
    """The caller's last question in this place, answered again (replacing the answer)."""
    conversation = await contexts.load(Place.of(message, user.telegram_id).scope)
    messages = list(conversation.messages)
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    if not messages:
        await message.answer(_("There is no answer to regenerate yet. Just write to me."))
        return
    prompt = messages.pop()["content"]
    conversation.messages = messages
    await _reply(
        message, bot, user, prompt, conversation, settings, turns, contexts, running, limiter
    )


async def reply_to(
    message: Message,
    bot: Bot,
    user: User,
    prompt: str,
    settings: Settings,
    turns: TurnDispatcher,
    contexts: ContextStore,
    running: RunningTurns,
    limiter: RateLimiter,
) -> None:
    """A turn for ``prompt`` after the place's context (for other handlers: captions, edits)."""
    if prompt:
        await _reply(message, bot, user, prompt, None, settings, turns, contexts, running, limiter)


async def _reply(
    message: Message,
    bot: Bot,
    user: User,
    prompt: str,
    conversation: Conversation | None,
    settings: Settings,
    turns: TurnDispatcher,
    contexts: ContextStore,
    running: RunningTurns,
    limiter: RateLimiter,
) -> None:
    """Check the prompt and the rate, then answer it after ``conversation`` (default: the
    chat's context), telling the user plainly when Redis is down."""
    try:
        if not await _checked(message, prompt, settings, limiter, user):
            return
        place = Place.of(message, user.telegram_id)
        if conversation is None:
            conversation = await contexts.load(place.scope)
        await answer(
            bot,
            place,
            user,
            prompt,
            conversation,
            settings=settings,
            turns=turns,
            contexts=contexts,
            running=running,
        )
    except RedisError as error:
        log.warning("chat turn failed on Redis: %s", type(error).__name__)
        await message.answer(_("The service is busy right now. Please try again in a minute."))


@handlers.callback_query(F.data == STOP)
async def on_stop_button(query: CallbackQuery, running: RunningTurns) -> None:
    message = query.message
    if isinstance(message, Message):
        scope = Place.of(message, query.from_user.id).scope
    else:
        scope = message.chat.id if message is not None else query.from_user.id
    stopped = await running.stop(scope, by=query.from_user.id)
    await query.answer(_("Stopping…") if stopped else _("Nothing is running."))


@handlers.callback_query()
async def stale_button(query: CallbackQuery) -> None:
    """A button no handler knows (an old message's, a forged one): answered, so the user's
    app stops its spinner."""
    await query.answer(_("This button is not valid any more."), show_alert=True)


@handlers.stopped_message_generation()
async def on_draft_stopped(event: MessageGenerationStopped, running: RunningTurns) -> None:
    await running.stop(event.chat.id, draft_id=event.draft_id)


COMMAND = re.compile(r"^/[A-Za-z0-9_]{1,32}(@[A-Za-z0-9_]{3,64})?$")


def looks_like_command(text: str | None) -> bool:
    """ "/help" or "/help@bot", not "/etc/hosts — what is this?"."""
    words = (text or "").split(maxsplit=1)
    return bool(words) and COMMAND.match(words[0]) is not None


@handlers.message(F.text.func(looks_like_command), F.chat.type == ChatType.PRIVATE)
async def unknown_command(message: Message) -> None:
    await message.answer(_("I do not know that command. /help lists what I can do."))


@handlers.message(Command("ask"))
async def cmd_ask(
    message: Message,
    command: CommandObject,
    bot: Bot,
    user: User,
    settings: Settings,
    turns: TurnDispatcher,
    contexts: ContextStore,
    running: RunningTurns,
    limiter: RateLimiter,
    redis: AsyncRedis,
) -> None:
    """``/ask QUESTION``: a turn in any chat (in a group, the way to ask without a mention)."""
    if message.chat.type != ChatType.PRIVATE and not await group_is_on(redis, message.chat.id):
        return
    prompt = (command.args or "").strip()
    if not prompt:
        await message.reply(_("Ask like this: /ask what is 2+2?"))
        return
    await _reply(message, bot, user, prompt, None, settings, turns, contexts, running, limiter)


@handlers.message(F.text, F.chat.type == ChatType.PRIVATE)
async def on_text(
    message: Message,
    bot: Bot,
    user: User,
    settings: Settings,
    turns: TurnDispatcher,
    contexts: ContextStore,
    running: RunningTurns,
    limiter: RateLimiter,
) -> None:
    prompt = (message.text or "").strip()
    if prompt:
        await _reply(message, bot, user, prompt, None, settings, turns, contexts, running, limiter)


@handlers.message(F.text, group_prompt)
async def on_group_text(
    message: Message,
    prompt: str,
    bot: Bot,
    user: User,
    settings: Settings,
    turns: TurnDispatcher,
    contexts: ContextStore,
    running: RunningTurns,
    limiter: RateLimiter,
    redis: AsyncRedis,
) -> None:
    """A group message meant for the bot (a mention of it, a reply to it), while it is on."""
    if not await group_is_on(redis, message.chat.id):
        return
    if not prompt:
        await message.reply(_("Yes? Ask me something: /ask what is 2+2?"))
        return
    await _reply(message, bot, user, prompt, None, settings, turns, contexts, running, limiter)


@handlers.message(F.chat.type == ChatType.PRIVATE)
async def other_content(message: Message) -> None:
    await message.answer(_("I can read text only: send your question as a message."))
