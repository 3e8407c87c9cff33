"""What peers offer beyond plain text: a system prompt per chat (``/system``), PDF and text
documents read into the prompt, a photo shown to a model that reads images (else its caption
read as the question), an edited question
answered again, Regenerate and Continue under an answer, and a question refused for balance
asked again. Registered before chat, whose last handlers answer other content and unknown
buttons."""

from __future__ import annotations

import io

from aiogram import Bot, F
from aiogram.enums import ChatType
from aiogram.filters import Command, CommandObject
from aiogram.types import CallbackQuery, Document, Message, PhotoSize
from redis.asyncio import Redis as AsyncRedis

from backend.models import User
from bot import images, pdf
from bot.common import AGAIN, CONTINUE, REGENERATE, Handlers, user_model
from bot.context import ContextStore
from bot.groups import Place, group_is_on, group_prompt, is_group_admin
from bot.i18n import _, ngettext
from bot.pdf import PdfText
from bot.turn_runner import TurnRunner
from workers.wire import MAX_IMAGE_BYTES

handlers = Handlers("persona")

MAX_SYSTEM_CHARS = 2000
OFF = {"off", "none", "clear", "reset"}


@handlers.message(Command("system"))
async def cmd_system(
    message: Message, command: CommandObject, bot: Bot, user: User, contexts: ContextStore
) -> None:
    """``/system`` shows this chat's system prompt; ``/system TEXT`` sets it; ``/system off``
    clears it. In a group it is the caller's own, like their context; where a topic's members
    share one context, the topic's, which only the group's admins change."""
    place = Place.of(message, user.telegram_id)
    scope = contexts.scope_of(place)
    conversation = await contexts.load(scope)
    text = (command.args or "").strip()
    if text and contexts.shared(place) and not await is_group_admin(bot, message):
        await message.reply(_("Here the system prompt is the topic's: only group admins set it."))
        return
    if not text:
        if conversation.system:
            await message.answer(
                _("System prompt here: {system}\n/system off clears it.").format(
                    system=conversation.system
                ),
                parse_mode=None,
            )
        else:
            await message.answer(
                _("No system prompt here. Set one: /system You are a concise tutor."),
                parse_mode=None,
            )
        return
    if text.lower() in OFF:
        conversation.system = ""
        await contexts.save(scope, conversation)
        await message.answer(_("System prompt cleared."))
        return
    if len(text) > MAX_SYSTEM_CHARS:
        await message.answer(
            _("A system prompt is at most {limit} characters.").format(limit=MAX_SYSTEM_CHARS)
        )
        return
    conversation.system = text
    await contexts.save(scope, conversation)
    await message.answer(_("System prompt set: my next answers here follow it."))


TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".csv", ".json", ".log", ".py", ".html", ".xml")
MAX_DOCUMENT_BYTES = 256 * 1024
DOCUMENT_QUESTION = "Summarize this document."
"""What a document without a caption asks (sent to the model, not shown)."""


def readable(name: str, mime: str | None) -> bool:
    return (mime or "").startswith("text/") or name.lower().endswith(TEXT_SUFFIXES)


def is_pdf(name: str, mime: str | None) -> bool:
    return mime == "application/pdf" or name.lower().endswith(".pdf")


def pdf_refusal(read: PdfText, max_chars: int) -> str:
    """What the user is told when a PDF gave no text to ask about."""
    if read.outcome == "encrypted":
        return _("This PDF is protected with a password, so I cannot read it. Send one without.")
    if read.outcome == "pages":
        return ngettext(
            "This PDF has {n} page; I read PDFs of up to {limit} pages.",
            "This PDF has {n} pages; I read PDFs of up to {limit} pages.",
            read.pages,
        ).format(n=read.pages, limit=pdf.MAX_PAGES)
    if read.outcome == "long":
        return _("This document is too long for one message: up to {limit} characters.").format(
            limit=max_chars
        )
    if read.outcome == "empty":
        return _("I found no text in this PDF (is it a scan?), so I cannot read it.")
    if read.outcome == "timeout":
        return _("This PDF took too long to read, so I stopped. Try a smaller or simpler one.")
    return _("This PDF is damaged or is not a PDF, so I cannot read it.")


@handlers.message(F.document, F.chat.type == ChatType.PRIVATE)
async def on_document(message: Message, bot: Bot, user: User, runner: TurnRunner) -> None:
    """A PDF or a UTF-8 text document read into the prompt, with its caption as the question;
    within the message limit. Others are refused plainly. A PDF is read in a bounded child
    process (bot/pdf.py)."""
    settings = runner.settings
    document = message.document
    assert document is not None
    name = (document.file_name or "document")[:100]
    if document.mime_type in images.IMAGE_TYPES:  # a screenshot sent as a file
        small = (document.file_size or 0) <= MAX_IMAGE_BYTES
        caption = (message.caption or "").strip()
        await image_turn(message, bot, user, runner, document if small else None, caption)
        return
    pdf_file = is_pdf(name, document.mime_type)
    if not pdf_file and not readable(name, document.mime_type):
        await message.answer(
            _("I read PDF and text documents (.pdf, .txt, .md, .csv…), not this one.")
        )
        return
    limit = pdf.MAX_PDF_BYTES if pdf_file else MAX_DOCUMENT_BYTES
    if document.file_size is not None and document.file_size > limit:
        await message.answer(
            _("This document is too large: I read up to {limit} KB.").format(limit=limit // 1024)
        )
        return
    data = await bot.download(document, destination=io.BytesIO())
    raw = data.read(limit + 1) if data is not None else b""
    if len(raw) > limit:
        await message.answer(
            _("This document is too large: I read up to {limit} KB.").format(limit=limit // 1024)
        )
        return
    if pdf_file:
        await bot.send_chat_action(message.chat.id, "typing")
        read = await pdf.pdf_text(raw, max_chars=settings.max_prompt_chars)
        if read.outcome != "ok":
            await message.answer(pdf_refusal(read, settings.max_prompt_chars))
            return
        text = read.text
    else:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            await message.answer(_("This document is not UTF-8 text, so I cannot read it."))
            return
    question = (message.caption or "").strip() or DOCUMENT_QUESTION
    prompt = f"{question}\n\n--- {name} ---\n{text}"
    if len(prompt) > settings.max_prompt_chars:
        await message.answer(
            _("This document is too long for one message: up to {limit} characters.").format(
                limit=settings.max_prompt_chars
            )
        )
        return
    await runner.reply(message, bot, user, prompt)


@handlers.message(F.photo, F.chat.type == ChatType.PRIVATE)
async def on_photo(message: Message, bot: Bot, user: User, runner: TurnRunner) -> None:
    """A photo: Telegram's largest size within :data:`~workers.wire.MAX_IMAGE_BYTES` (see
    :func:`image_turn`)."""
    await image_turn(
        message, bot, user, runner, images.largest(message), (message.caption or "").strip()
    )


@handlers.message(F.photo, group_prompt)
async def on_group_photo(
    message: Message, prompt: str, bot: Bot, user: User, runner: TurnRunner, redis: AsyncRedis
) -> None:
    """A photo in a group whose caption mentions the bot, or that replies to it."""
    if await group_is_on(redis, message.chat.id):
        await image_turn(message, bot, user, runner, images.largest(message), prompt)


async def image_turn(
    message: Message,
    bot: Bot,
    user: User,
    runner: TurnRunner,
    file: PhotoSize | Document | None,
    caption: str,
) -> None:
    """An image (a photo, or an image sent as a file), for a model whose settings say it reads
    images (``vision``): fetched into memory (bot/images.py) and sent in the sealed request as
    an image content part, the caption as the question; the context keeps its file id for
    /retry. For a model without vision, the user is told, and a caption is still answered as
    text."""
    model = user_model(runner.settings, user)
    say = message.answer if message.chat.type == ChatType.PRIVATE else message.reply
    if not runner.settings.models[model].vision:
        if caption:
            await say(
                _("{model} does not see images, so I answer your caption alone.").format(
                    model=model
                )
            )
            await runner.reply(message, bot, user, caption)
        else:
            await say(
                _(
                    "{model} does not see images. /model lists the models; or write your "
                    "question as text."
                ).format(model=model)
            )
        return
    try:
        if file is None:
            raise images.too_large()
        url = await images.fetch(bot, file.file_id)
    except images.ImageRefused as refused:
        await say(str(refused))
        return
    await runner.reply(
        message, bot, user, caption or images.IMAGE_QUESTION, images=[url], image_ids=[file.file_id]
    )


@handlers.message(F.caption, F.chat.type == ChatType.PRIVATE)
async def on_caption(message: Message, bot: Bot, user: User, runner: TurnRunner) -> None:
    """A photo, document or other media with a caption: the caption is the question (the
    attachment itself is not sent to the model, and the user is told)."""
    await message.answer(_("I read your caption; the attachment itself is not sent to the model."))
    await runner.reply(message, bot, user, (message.caption or "").strip())


@handlers.edited_message(F.text, F.chat.type == ChatType.PRIVATE)
async def on_edited(message: Message, bot: Bot, user: User, runner: TurnRunner) -> None:
    """An edited question is answered again, as asked now."""
    prompt = (message.text or "").strip()
    if prompt and not prompt.startswith("/"):
        await runner.reply(message, bot, user, prompt)


CONTINUE_PROMPT = "Continue."
"""What Continue asks the model (not shown to the user)."""


@handlers.callback_query(F.data.in_({REGENERATE, CONTINUE}))
async def on_answer_button(query: CallbackQuery, bot: Bot, user: User, runner: TurnRunner) -> None:
    """Regenerate (as /retry) or Continue (a turn asking the model to go on); in a group only
    the asker's buttons pass (bot/groups.py)."""
    message = query.message
    if not isinstance(message, Message):
        await query.answer(_("This button is not valid any more."), show_alert=True)
        return
    await query.answer()
    if query.data == REGENERATE:
        await runner.retry(message, bot, user)
    else:
        await runner.reply(message, bot, user, CONTINUE_PROMPT)


@handlers.callback_query(F.data == AGAIN)
async def on_ask_again(query: CallbackQuery, bot: Bot, user: User, runner: TurnRunner) -> None:
    """The question a refusal kept, asked again (in the private chat it was asked in)."""
    contexts = runner.contexts
    message = query.message
    if not isinstance(message, Message) or message.chat.type != ChatType.PRIVATE:
        await query.answer(_("This button is not valid any more."), show_alert=True)
        return
    scope = Place.of(message, user.telegram_id).scope
    conversation = await contexts.load(scope)
    prompt, conversation.pending = conversation.pending, ""
    if not prompt:
        await query.answer(_("There is no question waiting: just write to me."), show_alert=True)
        return
    await query.answer()
    await contexts.save(scope, conversation)  # asked once; a new refusal keeps it again
    await runner.reply(message, bot, user, prompt)
