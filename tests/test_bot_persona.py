"""What peers offer beyond plain text (Telegram faked at the session layer, the rest real): a
system prompt per place (/system), sealed with the context and sent first with every turn;
a caption read as the question; an edited question answered again."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from backend.dispatch import TurnRequest
from tests.support import pdfs
from tests.support.bot import ALICE, Harness, spy_on_turns
from tests.support.bot_fakes import feed, message_update


@pytest.fixture
def asked(bot: Harness, monkeypatch: pytest.MonkeyPatch) -> list[TurnRequest]:
    """Each turn the bot asks the backend for (the real dispatcher still runs it)."""
    return spy_on_turns(bot, monkeypatch)


async def test_a_system_prompt_is_kept_sealed_and_sent_first(
    bot: Harness, asked: list[TurnRequest]
) -> None:
    await bot.send("/system")
    assert "No system prompt here" in bot.last().text
    await bot.send("/system Answer like a pirate.")
    assert "System prompt set" in bot.last().text
    raw = await bot.app.services.redis.get(bot.app.services.contexts.redis_key(ALICE))
    assert raw and b"pirate" not in raw  # sealed at rest
    await bot.send("/system")
    assert "Answer like a pirate." in bot.last().text
    await bot.send("Where is the treasure?")
    (request,) = asked
    assert [(m.role, m.content) for m in request.messages] == [
        ("system", "Answer like a pirate."),
        ("user", "Where is the treasure?"),
    ]
    await bot.send("/system " + "x" * 2001)
    assert "at most 2000 characters" in bot.last().text
    await bot.send("/system off")
    await bot.send("And now?")
    assert [m.role for m in asked[-1].messages] == ["user"]


async def test_a_caption_is_the_question_and_an_edit_is_asked_again(
    bot: Harness, asked: list[TurnRequest]
) -> None:
    photo = [{"file_id": "p", "file_unique_id": "u", "width": 10, "height": 10}]
    await bot.send(None, photo=photo, caption="What is in this picture?")
    assert "does not see images, so I answer your caption alone" in bot.tg.texts()[-2]
    assert asked[-1].messages[-1].content == "What is in this picture?"
    video = {"file_id": "v", "file_unique_id": "uv", "width": 8, "height": 8, "duration": 1}
    await bot.send(None, video=video, caption="What happens here?")
    assert "the attachment itself is not sent" in bot.tg.texts()[-2]
    assert asked[-1].messages[-1].content == "What happens here?"
    edited = message_update(ALICE, "What is 3+3?")
    edited["edited_message"] = {**edited.pop("message"), "edit_date": 1}
    await feed(bot.app.dp, bot.app.bot, edited)
    assert asked[-1].messages[-1].content == "What is 3+3?"


async def test_addworker_asks_which_model_when_there_are_several(
    settings: Any, redis_url: str
) -> None:
    from backend.settings import ModelPrice
    from tests.support.bot import bot_settings, running_harness

    models = {
        "small": ModelPrice(prompt=1, completion=2, context_length=2048),
        "large": ModelPrice(prompt=3, completion=4, context_length=8192),
    }
    async with running_harness(bot_settings(settings, models=models)) as bot:
        await bot.send("/provider")
        await bot.send("/addworker")
        assert bot.last().text == "Which model will this worker serve?"
        choices = bot.last().reply_markup.inline_keyboard
        assert [row[0].text for row in choices] == ["small", "large"]
        await bot.press(choices[1][0].callback_data)
        assert "cocoon worker --model large --engine vllm" in bot.last().text
        await bot.press("aw:0000000000000000")
        assert bot.last("answerCallbackQuery").show_alert


def document(file_id: str, name: str, size: int, mime: str = "text/plain") -> dict[str, Any]:
    return {
        "file_id": file_id,
        "file_unique_id": "u" + file_id,
        "file_name": name,
        "mime_type": mime,
        "file_size": size,
    }


async def test_a_text_document_is_read_into_the_prompt(
    bot: Harness, asked: list[TurnRequest]
) -> None:
    notes = b"Meeting at 10.\nBring the GRAM report."
    bot.tg.files["doc1"] = notes
    await bot.send(None, document=document("doc1", "notes.md", len(notes)), caption="When?")
    prompt = asked[-1].messages[-1].content
    assert prompt.startswith("When?") and "--- notes.md ---" in prompt and "GRAM report" in prompt
    bot.tg.files["bin"] = b"\xff\xfe\x00binary"
    await bot.send(None, document=document("bin", "x.txt", 9))
    assert "not UTF-8 text" in bot.last().text
    await bot.send(None, document=document("doc", "paper.docx", 10, "application/msword"))
    assert "I read PDF and text documents" in bot.last().text
    await bot.send(None, document=document("big", "big.txt", 10**7))
    assert "too large" in bot.last().text
    bot.tg.files["long"] = b"x" * 9000
    await bot.send(None, document=document("long", "long.txt", 9000))
    assert "too long for one message" in bot.last().text
    assert len(asked) == 1  # only the readable one became a turn


async def test_a_pdf_is_read_into_the_prompt_and_a_bad_one_is_refused_plainly(
    bot: Harness, asked: list[TurnRequest]
) -> None:
    """A PDF's text (pypdf, in a bounded child process) with the caption as the question; a
    password-protected, damaged, scanned, many-paged or inflating one gets a clear message and
    no turn, and the bot goes on answering."""
    paper = pdfs.build([["Meeting at 10.", "Bring the GRAM report."], ["Room 4 (top floor)."]])
    bot.tg.files["pdf"] = paper
    await bot.send(
        None, document=document("pdf", "paper.pdf", len(paper), "application/pdf"), caption="Where?"
    )
    prompt = asked[-1].messages[-1].content
    assert prompt.startswith("Where?") and "--- paper.pdf ---" in prompt
    assert "Bring the GRAM report." in prompt and "Room 4 (top floor)." in prompt

    refused = {
        "locked": (pdfs.with_password(paper), "protected with a password"),
        "junk": (b"%PDF-1.4\n" + bytes(range(256)) * 40, "damaged or is not a PDF"),
        "scan": (pdfs.blank_pages(2), "no text in this PDF"),
        "many": (pdfs.blank_pages(201), "This PDF has 201 pages; I read PDFs of up to 200 pages."),
        "tree": (pdfs.page_tree_bomb(), "damaged or is not a PDF"),
        "bomb": (pdfs.inflating(100), "damaged or is not a PDF"),
        "long": (pdfs.build([["x" * 90] * 40] * 3), "too long for one message"),
    }
    for file_id, (data, told) in refused.items():
        bot.tg.files[file_id] = data
        # Named without .pdf: the MIME type alone makes it a PDF.
        await bot.send(None, document=document(file_id, file_id, len(data), "application/pdf"))
        assert told in bot.last().text, file_id
    await bot.send(None, document=document("huge", "huge.pdf", 9 * 2**20, "application/pdf"))
    assert "too large: I read up to 8192 KB" in bot.last().text
    assert len(asked) == 1

    locked = document("locked", "a.pdf", 1000, "application/pdf")
    await bot.send(None, document=locked, language="ru")  # the Telegram app's language
    assert "паролем" in bot.last().text


def photo(file_id: str, size: int) -> list[dict[str, Any]]:
    """A photo as Telegram sends it: its sizes, smallest first."""
    small = {"file_id": file_id + "-s", "file_unique_id": "us", "width": 90, "height": 60}
    big = {"file_id": file_id, "file_unique_id": "ub", "width": 1280, "height": 853}
    return [{**small, "file_size": 900}, {**big, "file_size": size}]


async def test_a_photo_to_a_model_without_vision_is_told_and_its_caption_answered(
    bot: Harness, asked: list[TurnRequest]
) -> None:
    await bot.send(None, photo=photo("p1", 50_000))
    assert bot.last().text == (
        "smollm2-135m does not see images. /model lists the models; or write your question as text."
    )
    assert not asked
    await bot.send(None, photo=photo("p1", 50_000), caption="What is 2+2?")
    told = [m.text for m in bot.tg.calls("sendMessage")]
    assert "smollm2-135m does not see images, so I answer your caption alone." in told
    (turn,) = asked
    assert turn.messages[-1].content == "What is 2+2?" and turn.messages[-1].images is None
    await bot.send(None, photo=photo("p1", 50_000), language="fr")
    assert bot.last().text.startswith("smollm2-135m ne voit pas les images.")


async def test_a_voice_message_is_told_to_be_typed(bot: Harness, asked: list[TurnRequest]) -> None:
    voice = {"file_id": "vo", "file_unique_id": "uvo", "duration": 3}
    await bot.send(None, voice=voice)
    assert bot.last().text == "I cannot listen to voice or audio yet: please type your question."
    await bot.send(None, voice=voice, language="ru")
    assert bot.last().text.startswith("Я пока не умею слушать")
    assert not asked


async def test_images_to_a_vision_model_go_in_the_turn_checked_by_their_bytes(
    settings: Any, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model declared ``vision``: a photo, or an image sent as a file, goes in the turn's last
    message as a data URL of the type its bytes show (not the type the sender claims); a file
    that is no image, or one too large, gets a message and no turn."""
    from tests.support.bot import bot_settings, running_harness

    models = {n: p.model_copy(update={"vision": True}) for n, p in settings.models.items()}
    jpeg = (Path(__file__).parent / "fixtures" / "images" / "python.jpg").read_bytes()
    url = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    async with running_harness(bot_settings(settings, models=models)) as h:
        seen = spy_on_turns(h, monkeypatch)
        h.tg.files["p1"] = jpeg
        await h.send(None, photo=photo("p1", len(jpeg)), caption="What is it?")
        last = seen[-1].messages[-1]
        assert last.content == "What is it?" and last.images is not None
        assert [i.image_url.url for i in last.images] == [url]
        # A screenshot sent as a file, its MIME type wrong: the bytes say JPEG.
        h.tg.files["f1"] = jpeg
        await h.send(None, document=document("f1", "shot.png", len(jpeg), "image/png"))
        last = seen[-1].messages[-1]
        assert last.content == "Describe this image." and last.images is not None
        assert last.images[0].image_url.url == url
        h.tg.files["fake"] = b"<svg onload=alert(1)>"
        await h.send(None, document=document("fake", "x.png", 21, "image/png"))
        assert h.last().text == "This is not a JPEG, PNG, WebP or GIF image, so I cannot send it."
        await h.send(None, document=document("big", "big.png", 6 * 2**20, "image/png"))
        assert h.last().text == "This image is too large: I send images of up to 5 MB."
        assert len(seen) == 2
