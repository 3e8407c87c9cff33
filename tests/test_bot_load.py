"""The bot under load (issue 19): 200 chats at once through the webhook of the real stack (web
app, dispatcher, a worker node on the instant engine, Redis, the database), Telegram played by
the rule-enforcing stand-in Bot API server in its own process (bench/bot_load.py). Every chat
gets its full answer, nothing breaks Telegram's flood limits, and every balance is exact. The
handler times are the benchmark's to print, never asserted here."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.bot_load import load

pytestmark = pytest.mark.slow


async def test_two_hundred_chats_at_once_are_all_answered_within_telegrams_limits(
    redis_url: str, db_url: str, tmp_path: Path
) -> None:
    result = await load(redis_url, 200, db_url, tmp_path, timeout_s=120)
    assert set(result.statuses) == {200}
    assert result.finished, "some updates were still being handled"
    assert result.unanswered == 0
    assert result.floods == 0, "the bot sent faster than Telegram allows"
    assert result.refused == []
    assert result.inexact == 0
    assert result.audit_ok
