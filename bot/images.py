"""Images a user shows a model that reads them: fetched from Telegram by ``file_id`` into memory,
checked by their bytes and size, and made the data URL the sealed request carries.

The bot keeps no image bytes: the kept context (sealed, bot/context.py) remembers an image turn's
Telegram ``file_id``\\ s under :data:`KEPT_IMAGES`, and ``/retry`` fetches them again from
Telegram (which keeps a bot's files for it to download again).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping

import aiohttp
from aiogram import Bot
from aiogram.exceptions import TelegramAPIError
from aiogram.types import Message, PhotoSize

from bot.i18n import _
from workers.wire import MAX_IMAGE_BYTES

IMAGE_QUESTION = "Describe this image."
"""What a photo without a caption asks (sent to the model, not shown)."""

IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif")

KEPT_IMAGES = "images"
"""The key of a kept user message that names its images: their Telegram file ids, spaces
between (a file id has no space)."""


class ImageRefused(Exception):
    """The image cannot be sent; the message says why, in the user's language."""


def largest(message: Message) -> PhotoSize | None:
    """The photo's largest size within :data:`~workers.wire.MAX_IMAGE_BYTES`."""
    sizes = [p for p in message.photo or [] if (p.file_size or 0) <= MAX_IMAGE_BYTES]
    return max(sizes, key=lambda p: p.width * p.height) if sizes else None


def image_type(raw: bytes) -> str | None:
    """The image's media type from its first bytes (never from what the sender claims)."""
    if raw.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if raw.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if raw.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if raw.startswith(b"RIFF") and raw[8:12] == b"WEBP":
        return "image/webp"
    return None


def too_large() -> ImageRefused:
    return ImageRefused(
        _("This image is too large: I send images of up to {limit} MB.").format(
            limit=MAX_IMAGE_BYTES // 2**20
        )
    )


async def fetch(bot: Bot, file_id: str) -> str:
    """The image Telegram keeps as ``file_id``, as a data URL: its size checked before and
    while it is downloaded (into memory only), its type read from its bytes. ImageRefused
    when it is too large, no image, or Telegram no longer has it."""
    try:
        file = await bot.get_file(file_id)
        if file.file_size is not None and file.file_size > MAX_IMAGE_BYTES:
            raise too_large()
        if not file.file_path:
            raise ImageRefused(_("Telegram no longer has this image: please send it again."))
        data = await bot.download_file(file.file_path, destination=io.BytesIO())
    except (TelegramAPIError, aiohttp.ClientError) as error:  # gone, or refused
        raise ImageRefused(_("Telegram no longer has this image: please send it again.")) from error
    raw = data.read(MAX_IMAGE_BYTES + 1) if data is not None else b""
    if len(raw) > MAX_IMAGE_BYTES:
        raise too_large()
    kind = image_type(raw)
    if kind is None:
        raise ImageRefused(_("This is not a JPEG, PNG, WebP or GIF image, so I cannot send it."))
    return f"data:{kind};base64," + base64.b64encode(raw).decode("ascii")


def kept(file_ids: list[str]) -> dict[str, str]:
    """What a kept user message adds to name its images (nothing without images)."""
    return {KEPT_IMAGES: " ".join(file_ids)} if file_ids else {}


def kept_ids(message: Mapping[str, str]) -> list[str]:
    """The file ids of a kept user message's images."""
    return message.get(KEPT_IMAGES, "").split()
