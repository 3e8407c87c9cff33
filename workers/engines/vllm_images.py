"""Images for the vllm engine: a user message's image parts (the wire's data URLs) decoded into
memory within bounds and handed to vLLM as the prompt's multimodal data, each in the prompt
text as the model's own placeholder (what vLLM's chat path writes for an ``image_url`` part),
which vLLM expands into the image's tokens.

Bounds, checked before anything reaches vLLM: at most ``max_images`` images, each a JPEG, PNG,
WebP or GIF (its first frame) of at most ``max_pixels`` pixels, read from its header before it is
decoded; anything else is refused (RequestRefused). The wire bounds the bytes already
(:data:`workers.wire.MAX_IMAGE_BYTES`). Pillow comes with vLLM.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from workers.engines.base import EngineError, RequestRefused

MAX_IMAGES = 4
"""The most images one prompt may show (the wire's bound)."""
MAX_PIXELS = 4096 * 4096
"""The largest image, in pixels (width × height), before it is decoded."""
_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")


def image_urls(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    """The data URLs of the messages' images, in order."""
    return [part["image_url"]["url"] for m in messages for part in m.get("images") or ()]


def decode(urls: Sequence[str], *, max_images: int, max_pixels: int) -> list[Any]:
    """The images as RGB Pillow images; RequestRefused for too many, too large or malformed."""
    if not urls:
        return []
    if len(urls) > max_images:
        raise RequestRefused(f"a prompt shows at most {max_images} images, got {len(urls)}")
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as error:  # vLLM depends on Pillow: a broken install
        raise EngineError(f"Pillow is not installed: {error}") from error
    images = []
    for n, url in enumerate(urls, 1):
        _, _, data = url.partition(";base64,")
        try:
            raw = base64.b64decode(data, validate=True)
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(raw), formats=_FORMATS)  # reads the header only
                width, height = image.size
                if width * height > max_pixels:
                    raise RequestRefused(
                        f"image {n} is {width}×{height} pixels; at most {max_pixels} are read"
                    )
                images.append(image.convert("RGB"))  # decodes (a GIF's first frame)
        except RequestRefused:
            raise
        except (
            binascii.Error,
            UnidentifiedImageError,
            Image.DecompressionBombError,
            Image.DecompressionBombWarning,
            OSError,
            ValueError,
            SyntaxError,  # some of Pillow's plugins raise it for a malformed file
        ) as error:
            raise RequestRefused(f"image {n} cannot be read: {type(error).__name__}") from error
    return images


def with_placeholders(
    messages: Sequence[Mapping[str, Any]], placeholder: Callable[[int], str]
) -> list[dict[str, Any]]:
    """The messages with each image written as ``placeholder(n)`` (n counts the prompt's images
    from 1) on its own line before its message's text, as vLLM's chat path writes a message of
    text and image parts for a chat template that takes text; without the image parts."""
    out: list[dict[str, Any]] = []
    n = 0
    for message in messages:
        item = {k: v for k, v in message.items() if k != "images"}
        shown = message.get("images") or ()
        if shown:
            marks = [placeholder(n + i) for i in range(1, len(shown) + 1)]
            n += len(shown)
            item["content"] = "\n".join([*marks, message["content"]])
        out.append(item)
    return out


def placeholder_of(model_config: Any) -> Callable[[int], str] | None:
    """The model's image placeholder (vLLM's ``get_placeholder_str`` of its model class), or
    None when the model reads no images."""
    if not getattr(model_config, "is_multimodal_model", False):
        return None
    from vllm.model_executor.model_loader import get_model_cls

    model_cls = get_model_cls(model_config)
    try:
        if model_cls.get_placeholder_str("image", 1) is None:
            return None
    except (AttributeError, ValueError):  # no placeholder, or not for images (audio only)
        return None

    def placeholder(n: int) -> str:
        return str(model_cls.get_placeholder_str("image", n))

    return placeholder
