"""Images for models that read them, on the wire: an OpenAI-style ``image_url`` part of a user
message, a data URL inside the sealed request (never a link a worker would fetch), bounded in
size and number; counted in the prompt's token bound; handed to an OpenAI-compatible server as
content parts; refused by an engine that does not read images."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import nacl.public
import pytest
from pydantic import ValidationError

from backend.bounds import IMAGE_TOKEN_BOUND, prompt_token_bound
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
