"""The pieces of the bot with no Telegram in them: Markdown to safe HTML, splitting long
replies, and the sealed chat context."""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr

from backend.dispatch import WorkerProof
from backend.settings import Settings
from bot.context import ContextStore, Conversation, LastTurn, load_context_key, trim
from bot.render import markdown_to_html, split_markdown, text_length

TAG = re.compile(r"</?([a-z]+)[^>]*>")


def balanced(text: str) -> bool:
    stack: list[str] = []
    for match in TAG.finditer(text):
        name = match.group(1)
        if match.group(0).startswith("</"):
            if not stack or stack.pop() != name:
                return False
        else:
            stack.append(name)
    return not stack


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("**bold** and *it*", "<b>bold</b> and <i>it</i>"),
        ("2 * 3 * 4 = 24 and a lone * star", "2 * 3 * 4 = 24 and a lone * star"),
        ("**unclosed bold", "**unclosed bold"),
        ("snake_case_name stays", "snake_case_name stays"),
        ("`a < b` & c", "<code>a &lt; b</code> &amp; c"),
        (
            "[TON](https://ton.org) [bad](javascript:x)",
            '<a href="https://ton.org">TON</a> [bad](javascript:x)',
        ),
        ("# Title", "<b>Title</b>"),
        ("<script>alert(1)</script>", "&lt;script&gt;alert(1)&lt;/script&gt;"),
        ("> quoted **line**\n> and more", "<blockquote>quoted <b>line</b>\nand more</blockquote>"),
        ("a > b, not a quote", "a &gt; b, not a quote"),
        (
            "| name | n |\n|---|:-:|\n| <x> | 10 |",
            "<pre>name | n\n-----+---\n&lt;x&gt;  | 10</pre>",
        ),
        ("a | b | not a table", "a | b | not a table"),
        ("| one | row |", "| one | row |"),
    ],
)
def test_markdown_renders_to_safe_html(source: str, expected: str) -> None:
    assert markdown_to_html(source) == expected


def test_code_fences_closed_or_not_are_well_formed() -> None:
    out = markdown_to_html("look:\n```python\nif a < b:\n    print('*x*')\n```\nend **b**")
    assert "<pre><code class=\"language-python\">if a &lt; b:\n    print('*x*')</code></pre>" in out
    assert out.endswith("end <b>b</b>") and balanced(out)
    assert balanced(markdown_to_html("```\nnever closed *x*"))


def test_long_replies_split_into_valid_pieces_under_the_limit() -> None:
    paragraph = "Word " * 150
    code = "```\n" + "\n".join(f"line {i} * x" for i in range(400)) + "\n```"
    text = f"{paragraph}\n\n{code}\n\n**end** " + "é" * 5000
    pieces = split_markdown(text)
    assert len(pieces) > 3
    for piece in pieces:
        assert text_length(piece) <= 3800
        rendered = markdown_to_html(piece)
        assert balanced(rendered) and text_length(html.unescape(TAG.sub("", rendered))) <= 4096
        assert piece.count("```") % 2 == 0
    joined = "".join(pieces)
    assert joined.count("line 399 * x") == 1 and "é" * 100 in joined


def test_trim_keeps_the_newest_messages_within_the_budget() -> None:
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " * 20}
        for i in range(20)
    ]
    kept = trim(messages, budget_tokens=1000, max_messages=50)
    assert kept[-1] == messages[-1] and kept[0]["role"] == "user" and len(kept) < 20
    assert len(trim(messages, budget_tokens=10**6, max_messages=4)) <= 4
    huge = [{"role": "user", "content": "x" * 10_000}]
    assert trim(huge, budget_tokens=100, max_messages=10) == huge  # the new message stays


async def test_context_is_sealed_bound_to_its_chat_and_expires(
    settings: Settings, redis_url: str
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    key = load_context_key(settings)
    assert load_context_key(settings) == key  # generated once, kept
    assert (Path(str(settings.secrets_dir)) / "context.key").stat().st_mode & 0o777 == 0o600
    assert not (Path(settings.data_dir) / "context.key").exists()  # not beside the data
    store = ContextStore(client, key, ttl_s=60, max_messages=4)
    secret = "my card PIN is 1234"
    await store.save(7, Conversation(messages=[{"role": "user", "content": secret}] * 6))
    blob = await client.get(store.redis_key(7))
    assert secret.encode() not in blob and b"1234" not in blob
    assert 0 < await client.ttl(store.redis_key(7)) <= 60
    assert len((await store.load(7)).messages) == 4
    await client.set(store.redis_key(8), blob)  # moved to another chat: does not open
    assert (await store.load(8)).messages == []
    other = ContextStore(client, bytes(32), ttl_s=60, max_messages=4)
    assert (await other.load(7)).messages == []  # another key: starts over, no crash
    await store.clear(7)
    assert await client.get(store.redis_key(7)) is None
    await client.aclose()


def test_a_context_saved_with_the_old_worker_proof_still_opens(settings: Settings) -> None:
    """Contexts saved before ``usage_signature_verified`` left the worker proof (it was always
    true) keep their messages and their last turn for /privacy."""
    store = ContextStore(None, load_context_key(settings), ttl_s=60, max_messages=4)
    saved = {
        "worker_id": "w-abc", "tee": "dev", "engine": "llama-cpp", "engine_version": "0.3",
        "key_fingerprint": "ab12cd", "usage_signature_verified": True,
    }  # fmt: skip
    old = Conversation(
        messages=[{"role": "user", "content": "hi"}],
        last=LastTurn("t1", "smollm2-135m", saved),  # type: ignore[arg-type]
    )
    opened = store.open(7, store.seal(7, old))
    assert opened.messages == [{"role": "user", "content": "hi"}]
    assert opened.last is not None
    assert opened.last.worker == WorkerProof("w-abc", "dev", "llama-cpp", "0.3", "ab12cd")


def test_a_configured_context_key_must_be_32_bytes(settings: Settings) -> None:
    good = settings.model_copy(update={"context_key": SecretStr("ab" * 32)})
    assert load_context_key(good) == bytes.fromhex("ab" * 32)
    bad = settings.model_copy(update={"context_key": SecretStr("abcd")})
    with pytest.raises(ValueError, match="32 bytes"):
        load_context_key(bad)


async def test_one_turn_per_chat_and_stop_reaches_another_replica(redis_url: str) -> None:
    from types import SimpleNamespace

    from bot.services import RunningTurns
    from workers import streams

    client = aioredis.Redis.from_url(redis_url)
    here, there = RunningTurns(client), RunningTurns(client)
    assert await here.acquire(5, draft_id=1, owner=77)
    assert not await there.acquire(5, draft_id=2, owner=77)  # the other replica sees it
    assert not await there.stop(5, by=77)  # not started yet: nothing to stop
    await here.attach(5, SimpleNamespace(job_id="job-5"))  # type: ignore[arg-type]
    assert not await there.stop(5, by=78)  # someone else's answer
    assert await there.stop(5, by=77)
    assert await client.exists(streams.cancel_key("job-5"))
    await here.release(5)
    assert await there.acquire(5, draft_id=3, owner=78)
    await client.aclose()


async def test_drafts_show_the_markdown_so_far_as_safe_html() -> None:
    from aiogram import Bot

    from bot.streaming import ReplyStream
    from tests.support.bot_fakes import TOKEN, FakeTelegram

    tg = FakeTelegram()
    bot = Bot(TOKEN, session=tg)
    stream = ReplyStream(bot, 7, draft_id=3, use_draft=True, draft_interval_s=0.0)
    for text in ("**Paris** is", "**Paris** is the capital.\n> a quote\n| a | b |\n|--|--|"):
        await stream.update(text)
    first, second = tg.calls("sendMessageDraft")
    assert first.parse_mode == "HTML" and first.text == "<b>Paris</b> is"
    assert "<blockquote>a quote</blockquote>" in second.text and "<pre>a | b" in second.text
    await stream.update("**unclosed so far")  # an unbalanced marker stays a character
    assert tg.calls("sendMessageDraft")[-1].text == "**unclosed so far"
    await bot.session.close()
