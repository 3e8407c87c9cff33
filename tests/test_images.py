"""Images for models that read them, on the wire: an OpenAI-style ``image_url`` part of a user
message, a data URL inside the sealed request (never a link a worker would fetch), bounded in
size and number; counted in the prompt's token bound; handed to an OpenAI-compatible server as
content parts; refused by an engine that does not read images. The bot fetches an image from
Telegram by its file id, and again for /retry (the context keeps only the file id, sealed)."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path

import nacl.public
import pytest
from aiogram import Bot
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from pydantic import ValidationError

from backend.bounds import IMAGE_TOKEN_BOUND, prompt_token_bound
from backend.settings import Settings
from bot import images
from bot.context import Conversation
from tests.support import bot_fakes, fake_telegram
from tests.support.bot import ALICE, bot_settings, running_harness, spy_on_turns
from tests.support.telegram_rules import MAX_DOWNLOAD_BYTES
from tests.support.turns import funded_user
from workers.engines import vllm_images
from workers.engines.base import GenerationRequest, has_images, openai_messages
from workers.engines.openai_compat import OpenAICompatEngine
from workers.wire import (
    MAX_IMAGE_BYTES,
    MAX_IMAGES,
    ChatMessage,
    ImagePart,
    ImageUrl,
    JobRequest,
    WorkerKeys,
    new_reply_keypair,
    open_request,
    public_b64,
    seal_request,
)

JPEG = (Path(__file__).parent / "fixtures" / "images" / "python.jpg").read_bytes()
URL = "data:image/jpeg;base64," + base64.b64encode(JPEG).decode()


def image(url: str = URL) -> ImagePart:
    return ImagePart(image_url=ImageUrl(url=url))


def request(*messages: ChatMessage) -> JobRequest:
    reply: nacl.public.PrivateKey = new_reply_keypair()
    return JobRequest(
        job_id="job-img",
        model="vision-model",
        messages=list(messages),
        max_tokens=16,
        reply_key=public_b64(reply),
    )


def test_an_image_travels_sealed_and_arrives_whole() -> None:
    keys = WorkerKeys.generate()
    sent = request(ChatMessage(role="user", content="What is this?", images=[image()]))
    blob = seal_request(sent, keys.box_public_b64)
    assert base64.b64encode(JPEG)[:64] not in blob and b"What is this?" not in blob
    opened = open_request(blob, keys)
    assert opened.messages[0].images == [image()]
    assert opened.messages[0].model_dump()["images"][0]["image_url"]["url"] == URL


def test_a_message_without_images_is_written_as_before() -> None:
    dumped = ChatMessage(role="user", content="hi").model_dump()
    assert dumped == {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/cat.jpg",  # a link the worker would fetch
        "file:///etc/passwd",
        "data:image/svg+xml;base64,PHN2Zz4=",  # not a raster image
        "data:image/jpeg;base64,not base64!",
        "data:image/jpeg;base64," + "A" * (4 * MAX_IMAGE_BYTES // 3 + 8),
    ],
)
def test_only_a_bounded_raster_data_url_is_an_image(url: str) -> None:
    with pytest.raises(ValidationError):
        ImageUrl(url=url)


def test_images_are_a_users_and_bounded_in_number() -> None:
    with pytest.raises(ValidationError):
        ChatMessage(role="assistant", content="x", images=[image()])
    with pytest.raises(ValidationError):
        ChatMessage(role="user", content="x", images=[image()] * (MAX_IMAGES + 1))
    two = ChatMessage(role="user", content="x", images=[image()] * 2)
    with pytest.raises(ValidationError, match="at most"):
        request(two, ChatMessage(role="assistant", content="y"), two, two)


def test_each_image_counts_in_the_prompt_bound() -> None:
    text = ChatMessage(role="user", content="What is this?")
    shown = ChatMessage(role="user", content="What is this?", images=[image(), image()])
    assert prompt_token_bound([shown]) == prompt_token_bound([text]) + 2 * IMAGE_TOKEN_BOUND


def test_an_openai_compatible_server_gets_content_parts() -> None:
    message = ChatMessage(role="user", content="What is this?", images=[image()])
    messages = [{"role": "system", "content": "Be brief."}, message.model_dump()]
    assert has_images(messages)
    engine = OpenAICompatEngine("vision-model", base_url="http://127.0.0.1:9")
    payload = engine._payload(GenerationRequest(messages=messages, max_tokens=8))
    assert payload["messages"] == openai_messages(messages)
    assert json.loads(json.dumps(payload["messages"])) == [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": URL}},
            ],
        },
    ]


# -- the bot: images fetched from Telegram by file id, again on /retry --------------------------


@pytest.fixture(params=["session", "http"])
async def telegram(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Bot, dict[str, bytes]]]:
    """A bot and the files its Telegram has: the session-layer stand-in, or the HTTP one on
    loopback (getFile, then a download from ``/file/bot<token>/<file_path>``, as Telegram)."""
    if request.param == "session":
        session = bot_fakes.FakeTelegram()
        yield Bot(bot_fakes.TOKEN, session=session), session.files
        return
    server = fake_telegram.FakeTelegram()
    url = await server.start()
    bot = Bot(bot_fakes.TOKEN, session=AiohttpSession(api=TelegramAPIServer.from_base(url)))
    try:
        yield bot, server.files
    finally:
        await bot.session.close()
        await server.stop()


async def test_an_image_is_fetched_by_file_id_and_checked_by_its_bytes(
    telegram: tuple[Bot, dict[str, bytes]],
) -> None:
    bot, files = telegram
    files["photo"] = JPEG
    assert await images.fetch(bot, "photo") == URL
    files["svg"] = b"<svg onload=alert(1)>"
    files["big"] = b"\xff\xd8\xff" + bytes(MAX_IMAGE_BYTES)  # JPEG's first bytes, 5 MB + 3
    files["huge"] = bytes(MAX_DOWNLOAD_BYTES + 1)  # Telegram lets no bot download it
    expected = {
        "svg": "This is not a JPEG, PNG, WebP or GIF image, so I cannot send it.",
        "big": "This image is too large: I send images of up to 5 MB.",
        "huge": "Telegram no longer has this image: please send it again.",
        "gone": "Telegram no longer has this image: please send it again.",
    }
    for file_id, told in expected.items():
        with pytest.raises(images.ImageRefused) as refused:
            await images.fetch(bot, file_id)
        assert str(refused.value) == told


async def test_retry_of_an_image_turn_shows_the_model_the_image_again(
    settings: Settings, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kept context names an image turn's images by Telegram file id only (sealed, no image
    bytes); /retry fetches them again and sends them with the question. An image Telegram no
    longer has is said so, and nothing is asked; /new forgets it with the rest."""
    models = {n: p.model_copy(update={"vision": True}) for n, p in settings.models.items()}
    async with running_harness(bot_settings(settings, models=models)) as h:
        seen = spy_on_turns(h, monkeypatch)
        await funded_user(h.app.services.ledger, ALICE)  # no worker runs: the turn fails after
        contexts = h.app.services.contexts
        asked = {"role": "user", "content": "What is it?", **images.kept(["ph-1"])}
        await contexts.save(
            ALICE,
            Conversation(messages=[asked, {"role": "assistant", "content": "A snake."}]),
        )
        h.tg.files["ph-1"] = JPEG
        await h.send("/retry")
        last = seen[-1].messages[-1]
        assert last.content == "What is it?" and last.images == [image()]
        assert [r.file_id for r in h.tg.calls("getFile")] == ["ph-1"]
        raw = await h.app.services.redis.get(contexts.redis_key(ALICE))
        assert raw is not None and b"ph-1" not in raw and base64.b64encode(JPEG)[:40] not in raw
        assert images.kept_ids((await contexts.load(ALICE)).messages[0]) == ["ph-1"]

        del h.tg.files["ph-1"]
        await h.send("/retry")
        assert h.last().text == "Telegram no longer has this image: please send it again."
        assert len(seen) == 1

        await h.send("/new")
        await h.send("/retry")
        assert h.last().text == "There is no answer to regenerate yet. Just write to me."


def test_vllm_writes_each_image_as_the_models_placeholder_before_its_text() -> None:
    """The vllm engine's prompt: each image as the model's placeholder (numbered across the
    prompt, for models whose placeholders are), on its own line before its message's text."""
    shown = ChatMessage(role="user", content="Compare them.", images=[image(), image()])
    messages = [
        ChatMessage(role="user", content="Look.", images=[image()]).model_dump(),
        {"role": "assistant", "content": "A snake."},
        shown.model_dump(),
    ]
    assert vllm_images.image_urls(messages) == [URL, URL, URL]
    assert vllm_images.with_placeholders(messages, lambda n: f"<|image_{n}|>") == [
        {"role": "user", "content": "<|image_1|>\nLook."},
        {"role": "assistant", "content": "A snake."},
        {"role": "user", "content": "<|image_2|>\n<|image_3|>\nCompare them."},
    ]
