"""Telegram ``initData``: verified on every Mini App API call, as Telegram specifies.

The Mini App sends the raw ``initData`` string of ``Telegram.WebApp`` in the header
``Authorization: tma <initData>``. It is accepted when its HMAC (key: HMAC-SHA256 of the bot
token under ``"WebAppData"``) is right and its ``auth_date`` is no older than
``initdata_max_age_s``. In development mode (``COCOON_MINIAPP_DEV``) the server also signs an
``initData`` of its own for the dev user (``local_telegram_id``), with a key made at start and
known to nobody else: only that user can be had that way.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlencode

from aiogram.utils.web_app import WebAppInitData, safe_parse_webapp_init_data

from backend.errors import CocoonError, ErrorCode
from backend.users import MAX_TELEGRAM_ID

SCHEME = "tma"
FUTURE_SKEW_S = 60


class InitDataError(CocoonError):
    """Why an ``initData`` is refused. ``code`` is stable (``init_data_missing``,
    ``init_data_invalid``, ``init_data_expired``)."""


@dataclass(frozen=True)
class TelegramCaller:
    """Who is calling, as the verified ``initData`` says."""

    telegram_id: int
    language_code: str | None
    first_name: str
    dev: bool  # signed by this server's development key, not by Telegram


def sign_init_data(fields: dict[str, str], token: str) -> str:
    """An ``initData`` string for ``fields`` with its ``hash``, as Telegram would sign it."""
    check = "\n".join(f"{key}={value}" for key, value in sorted(fields.items()))
    secret = hmac.new(b"WebAppData", token.encode(), hashlib.sha256).digest()
    digest = hmac.new(secret, check.encode(), hashlib.sha256).hexdigest()
    return urlencode({**fields, "hash": digest})


def init_data_for(
    telegram_id: int,
    token: str,
    *,
    first_name: str = "Dev",
    language_code: str = "en",
    auth_date: int | None = None,
) -> str:
    """A signed ``initData`` for one user (development mode and tests)."""
    user = {"id": telegram_id, "first_name": first_name, "language_code": language_code}
    fields = {
        "query_id": "AA" + secrets.token_hex(8),
        "user": json.dumps(user, separators=(",", ":")),
        "auth_date": str(int(time.time()) if auth_date is None else auth_date),
    }
    return sign_init_data(fields, token)


def _parse(init_data: str, token: str) -> WebAppInitData | None:
    try:
        return safe_parse_webapp_init_data(token, init_data)
    except ValueError:  # a bad signature, or fields that do not parse
        return None


class InitDataVerifier:
    """Checks ``initData`` against the bot token (and, in development mode, the dev key)."""

    def __init__(
        self,
        bot_token: str | None,
        *,
        max_age_s: int,
        dev_telegram_id: int | None = None,
    ) -> None:
        self.bot_token = bot_token
        self.max_age_s = max_age_s
        self.dev_telegram_id = dev_telegram_id
        self._dev_key = secrets.token_hex(32) if dev_telegram_id is not None else None

    @property
    def dev(self) -> bool:
        return self._dev_key is not None

    def dev_init_data(self, language_code: str = "en") -> str:
        """A fresh ``initData`` for the dev user (development mode only)."""
        if self._dev_key is None or self.dev_telegram_id is None:
            raise RuntimeError("development mode is off")
        return init_data_for(self.dev_telegram_id, self._dev_key, language_code=language_code)

    def verify(self, init_data: str | None, *, now: float | None = None) -> TelegramCaller:
        if not init_data or not init_data.strip():
            raise InitDataError(ErrorCode.INIT_DATA_MISSING)
        init_data = init_data.strip()
        dev = False
        parsed = _parse(init_data, self.bot_token) if self.bot_token else None
        if parsed is None and self._dev_key is not None:
            parsed = _parse(init_data, self._dev_key)
            dev = parsed is not None
        if parsed is None or parsed.user is None or not 0 < parsed.user.id < MAX_TELEGRAM_ID:
            raise InitDataError(ErrorCode.INIT_DATA_INVALID)
        if dev and parsed.user.id != self.dev_telegram_id:
            raise InitDataError(ErrorCode.INIT_DATA_INVALID)
        now = time.time() if now is None else now
        signed_at = parsed.auth_date.timestamp()
        if signed_at < now - self.max_age_s or signed_at > now + FUTURE_SKEW_S:
            raise InitDataError(ErrorCode.INIT_DATA_EXPIRED)
        return TelegramCaller(
            telegram_id=parsed.user.id,
            language_code=parsed.user.language_code,
            first_name=parsed.user.first_name,
            dev=dev,
        )


def init_data_from_header(value: str | None) -> str | None:
    """The ``initData`` of an ``Authorization: tma <initData>`` header."""
    if not value:
        return None
    scheme, _, rest = value.partition(" ")
    if scheme.lower() != SCHEME:
        return None
    return rest.strip() or None
