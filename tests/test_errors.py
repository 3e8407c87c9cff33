"""One decision, one place: the error codes clients match on, each surface's answer to every
code it can meet, and the defaults every chat surface shares (reply budget, model, redaction)."""

from __future__ import annotations

import pytest

from backend.errors import CocoonError, ErrorCode
from backend.logs import redact_url
from backend.pricing import default_max_tokens
from backend.settings import DEFAULT_MODEL, ModelPrice, Settings
from bot.errors import TEXTS as BOT_TEXTS
from bot.errors import error_text
from bot.i18n import use_language
from miniapp.routes import STATUS as MINIAPP_STATUS
from miniapp.texts import ERRORS as MINIAPP_WORDS
from miniapp.texts import error_message

TURN_CODES = {
    "invalid_request",
    "unknown_model",
    "insufficient_balance",
    "no_worker",
    "timeout",
    "cancelled",
    "worker_error",
    "worker_misbehaved",
}
WITHDRAWAL_CODES = {"no_payout_wallet", "below_minimum", "insufficient_funds", "invalid_amount"}


def test_the_codes_on_the_wire_are_the_documented_strings() -> None:
    """Clients (the Mini App's page, OpenAI clients, scripts) match on these strings."""
    assert {code.value for code in ErrorCode} == TURN_CODES | WITHDRAWAL_CODES | {
        "not_provider",
        "invalid_page",
        "invalid_json",
        "body_too_large",
        "invalid_api_key",
        "not_found",
        "rate_limited",
        "message_too_long",
        "internal",
        "init_data_missing",
        "init_data_invalid",
        "init_data_expired",
        "proof_refused",
        "proof_unavailable",
        "topup_unavailable",
        "stars_unavailable",
        "stars_failed",
    }
    with pytest.raises(ValueError):
        CocoonError("no_such_code", "a typo is caught where it is raised")


def test_the_mini_app_has_a_status_and_words_for_every_code_but_the_api_key_ones() -> None:
    api_only = {ErrorCode.INVALID_API_KEY, ErrorCode.BODY_TOO_LARGE}
    assert set(MINIAPP_STATUS) == set(ErrorCode) - api_only
    assert set(MINIAPP_WORDS) == set(ErrorCode) - api_only
    assert "1.5 GRAM" in error_message("en", ErrorCode.BELOW_MINIMUM, minimum="1.5 GRAM")


def test_the_openai_api_answers_every_turn_code_with_its_own_status() -> None:
    from backend.openai_api.protocol import ERRORS, error_body, error_status

    assert {code.value for code in ERRORS} >= TURN_CODES
    refusal = CocoonError(ErrorCode.UNKNOWN_MODEL, "unknown model 'x'")
    assert error_status(refusal) == 404
    assert error_body(refusal) == {
        "error": {
            "message": "unknown model 'x'",
            "type": "invalid_request_error",
            "code": "model_not_found",  # OpenAI's own name for it
            "param": None,
        }
    }
    assert error_status(CocoonError(ErrorCode.INSUFFICIENT_BALANCE)) == 402


def test_the_bot_has_words_for_every_turn_and_withdrawal_code() -> None:
    assert {code.value for code in BOT_TEXTS} == TURN_CODES | WITHDRAWAL_CODES
    poor = CocoonError(ErrorCode.INSUFFICIENT_BALANCE, "", needed=2_500_000_000, available=10**9)
    with use_language("en"):
        text = error_text(poor, model="m")
        assert "up to 2.5 GRAM" in text and "you have 1 GRAM" in text
        # A detail the raiser left out shows as "?", never as an error in the handler.
        assert "smallest withdrawal is ?" in error_text(CocoonError(ErrorCode.BELOW_MINIMUM))


@pytest.mark.parametrize(
    ("context_length", "setting", "expected"),
    [(2048, 512, 512), (600, 512, 300), (2048, 48, 48), (1, 512, 1)],
)
def test_a_turn_without_max_tokens_gets_the_setting_within_half_the_context(
    context_length: int, setting: int, expected: int
) -> None:
    price = ModelPrice(prompt=1, completion=1, context_length=context_length)
    assert default_max_tokens(Settings(max_tokens_default=setting), price) == expected


def test_the_default_model_is_the_shipped_one_while_offered_else_the_first_configured() -> None:
    price = ModelPrice(prompt=1, completion=1)
    assert Settings(models={"b": price, DEFAULT_MODEL: price}).default_model() == DEFAULT_MODEL
    assert Settings(models={"zeta": price, "alpha": price}).default_model() == "zeta"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@10.0.0.5:6379/0", "redis://:***@10.0.0.5:6379/0"),
        (
            "postgresql+asyncpg://cocoon:p%40ss:w@db:5432/cocoon?ssl=require",
            "postgresql+asyncpg://cocoon:***@db:5432/cocoon?ssl=require",
        ),
        ("redis://worker-1:a@b@redis/0", "redis://worker-1:***@redis/0"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        (
            "sqlite+aiosqlite:////var/lib/cocoon/cocoon.db",
            "sqlite+aiosqlite:////var/lib/cocoon/cocoon.db",
        ),
    ],
)
def test_urls_are_shown_without_their_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown
