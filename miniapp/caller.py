"""Who calls the Mini App's service and how its values cross the JSON API: the verified
caller, the Mini App's refusal, typed amounts read in the caller's grammar, nanoTON and
moments written for the page."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from backend.errors import CocoonError, ErrorCode
from backend.i18n import pick_language
from backend.models import User
from backend.money import AmountError, decimal_comma, parse_amount
from miniapp.auth import TelegramCaller


class MiniAppError(CocoonError):
    """A refusal of the Mini App's own. Its HTTP status and words follow from the code
    (``miniapp.routes.STATUS``, ``miniapp.texts.ERRORS``); the message fills ``{detail}`` and
    the details the other placeholders."""


@dataclass(frozen=True)
class Caller:
    user: User
    telegram: TelegramCaller
    language: str


def read_amount(caller: Caller, text: str) -> int:
    """A typed amount in the grammar the page checks too (a comma where the language has one)."""
    try:
        return parse_amount(text, comma=decimal_comma(pick_language(caller.language)))
    except AmountError as error:
        raise MiniAppError(
            ErrorCode.INVALID_AMOUNT, str(error), problem=error.problem.value
        ) from None


def nano(value: int) -> str:
    return str(int(value))


def iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
