"""Small helpers shared by the handlers: the user's model, prices and amounts as text."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, TypeVar

from aiogram import Router
from aiogram.dispatcher.event.bases import NextMiddlewareType
from aiogram.types import InlineKeyboardButton, InlineKeyboardMarkup, Message, TelegramObject

from backend.models import User
from backend.money import format_gram
from backend.settings import ModelPrice, Settings
from bot.i18n import N_, _

F = TypeVar("F", bound=Callable[..., Any])

NextHandler = NextMiddlewareType[TelegramObject]
"""What an update middleware's ``__call__`` hands the update on to."""


def user_model(settings: Settings, user: User) -> str:
    """The user's chosen model while it is still offered, else the default one."""
    if user.model and user.model in settings.models:
        return user.model
    return settings.default_model()


def model_token(model: str) -> str:
    """A short stable id for a model in callback data (64 bytes at most)."""
    return hashlib.sha256(model.encode()).hexdigest()[:16]


def model_by_token(settings: Settings, token: str) -> str | None:
    return next((m for m in settings.models if model_token(m) == token), None)


def ton(nano: int) -> str:
    return format_gram(nano)


def price_pair(price: ModelPrice) -> tuple[str, str]:
    return format_gram(price.prompt), format_gram(price.completion)


class Handlers:
    """One feature's handlers, put on a fresh aiogram ``Router`` by :meth:`router` (a router
    can belong to one dispatcher only, and tests build many). Decorate like a router:
    ``@handlers.message(Command("new"))``; the order of registration is kept, then ``parts``
    (features of their own module served on this one's router), each in its order."""

    def __init__(self, name: str, *parts: Handlers) -> None:
        self.name = name
        self._items: list[tuple[str, Callable[..., Any], tuple[Any, ...]]] = []
        self._parts = parts  # their handlers go on this router after its own

    def _on(self, event: str, filters: tuple[Any, ...]) -> Callable[[F], F]:
        def register(handler: F) -> F:
            self._items.append((event, handler, filters))
            return handler

        return register

    def message(self, *filters: Any) -> Callable[[F], F]:
        return self._on("message", filters)

    def edited_message(self, *filters: Any) -> Callable[[F], F]:
        return self._on("edited_message", filters)

    def callback_query(self, *filters: Any) -> Callable[[F], F]:
        return self._on("callback_query", filters)

    def pre_checkout_query(self, *filters: Any) -> Callable[[F], F]:
        return self._on("pre_checkout_query", filters)

    def stopped_message_generation(self, *filters: Any) -> Callable[[F], F]:
        return self._on("stopped_message_generation", filters)

    def router(self, *filters: Any) -> Router:
        """A new router with every handler; ``filters`` apply to all of its messages and
        callback queries."""
        router = Router(name=self.name)
        for event in ("message", "callback_query"):
            for flt in filters:
                router.observers[event].filter(flt)
        for part in (self, *self._parts):
            for event, handler, flts in part._items:
                router.observers[event].register(handler, *flts)
        return router


STATE_NAMES = {
    "requested": N_("requested"),
    "signed": N_("signed"),
    "sent": N_("sent"),
    "confirmed": N_("confirmed"),
    "failed": N_("failed"),
    "attested": N_("attested"),
    "offline": N_("offline"),
    "revoked": N_("revoked"),
}


async def require_provider(message: Message, user: User) -> bool:
    """True for a provider; anyone else is told how to become one."""
    if not user.is_provider:
        await message.answer(_("This is for providers. Become one with /provider."))
        return False
    return True


def state_name(state: str) -> str:
    """A payout's or worker's state, in the current language."""
    return _(STATE_NAMES[state]) if state in STATE_NAMES else state


AGAIN = "again"
"""Callback data: ask the question a refusal for balance kept (bot/handlers/persona.py)."""


def again_button() -> InlineKeyboardButton:
    return InlineKeyboardButton(text=_("Ask my question again"), callback_data=AGAIN)


REGENERATE, CONTINUE = "regen", "cont"
"""Callback data of the buttons under a finished answer (bot/handlers/persona.py)."""


def answer_keyboard() -> InlineKeyboardMarkup:
    """Under a finished answer: answer again, or go on from where it stopped."""
    return InlineKeyboardMarkup(
        inline_keyboard=[
            [
                InlineKeyboardButton(text=_("↻ Regenerate"), callback_data=REGENERATE),
                InlineKeyboardButton(text=_("→ Continue"), callback_data=CONTINUE),
            ]
        ]
    )


def refused_keyboard() -> InlineKeyboardMarkup:
    """Under a refusal for balance: top up, then ask the kept question again."""
    return InlineKeyboardMarkup(
        inline_keyboard=[
            [InlineKeyboardButton(text=_("Top up"), callback_data="topup:open")],
            [again_button()],
        ]
    )
