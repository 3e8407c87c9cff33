"""Chat turns through the bot end to end: Telegram faked at the session layer, everything else
real (Redis, RQ, one worker process running SmolLM2 on llama.cpp, the ledger on SQLite). One
worker serves the whole module."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import itertools
import re
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from pydantic import SecretStr
from sqlalchemy import select

from backend.models import Hold, HoldState, TurnRecord
from backend.settings import AttestationSettings, Settings
from bot import streaming, turn_runner
from bot.context import ContextStore
from bot.streaming import ReplyStream
from tests.support.bot import Harness, running_harness
from tests.support.bot_fakes import (
    TOKEN,
    bot_message,
    callback_update,
    feed,
    message_update,
    stopped_update,
)
from tests.support.env import IN_CI, TEST_REDIS_URL, require_module
from tests.support.telegram_rules import visible
from tests.support.turns import TON, Node, funded_user

require_module("llama_cpp")

pytestmark = pytest.mark.engine

USER = 601
GROUP = -100777


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    """One worker node for the module (an unattested dev worker: dev mode is on)."""
    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        client.flushdb()
    except redis.RedisError as error:
        if IN_CI:
            pytest.fail(f"Redis is not reachable: {error}")
        pytest.skip(f"Redis is not reachable: {error}")
    node = Node(TEST_REDIS_URL)
    yield node
    node.stop()
    client.flushdb()
    client.close()


@pytest.fixture(scope="module")
def worker(node: Node) -> str:
    return node.worker_id


@pytest.fixture
async def chat(
    settings: Settings, worker: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Harness]:
    async with chat_harness(settings, monkeypatch) as harness:
        yield harness


@contextlib.asynccontextmanager
async def chat_harness(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, **values: Any
) -> AsyncIterator[Harness]:
    monkeypatch.setattr(streaming, "DRAFT_INTERVAL_S", 0.0)  # every chunk shows: easy to see
    s = settings.model_copy(
        update={
            "bot_token": SecretStr(TOKEN),
            "attestation": AttestationSettings(allow_dev=True),
            "max_tokens_default": 48,
            **values,
        }
    )
    async with running_harness(s) as harness:
        await funded_user(harness.ledger, USER)
        yield harness


def final(h: Harness) -> Any:
    """The message that carries the footer."""
    for method in reversed(h.tg.requests):
        if method.__api_method__ in {"sendMessage", "editMessageText"} and "tokens" in str(
            getattr(method, "text", "")
        ):
            return method
    raise AssertionError(f"no final message in {[r.__api_method__ for r in h.tg.requests]}")


async def turns_of(h: Harness) -> list[TurnRecord]:
    async with h.db.session() as session:
        return list(await session.scalars(select(TurnRecord).order_by(TurnRecord.id)))


async def test_a_turn_streams_as_drafts_and_ends_with_the_footer_and_the_charge(
    chat: Harness,
) -> None:
    await chat.send("Name three colors.", user=USER)

    drafts = chat.tg.calls("sendMessageDraft")
    assert drafts and drafts[0].text == "" and drafts[0].can_stop  # "Thinking…" with stop
    assert len({d.draft_id for d in drafts}) == 1
    # Each draft is the reply so far as HTML; what a person reads (markers aside) only grows.
    assert all(d.parse_mode == "HTML" for d in drafts if d.text)
    shown = [re.sub(r"[*_`~#>|-]", "", visible(d.text, "HTML")[0]) for d in drafts if d.text]
    assert shown and all(b.startswith(a[: len(a) // 2]) for a, b in itertools.pairwise(shown))
    last = final(chat)
    assert last.__api_method__ == "sendMessage" and last.parse_mode == "HTML"
    (turn,) = await turns_of(chat)
    footer = f"smollm2-135m · {turn.prompt_tokens} + {turn.completion_tokens} tokens"
    assert footer in last.text and "development TEE" in last.text
    assert turn.cost > 0 and turn.finish_reason in {"stop", "length"}
    balances = await chat.ledger.balances(turn.user_id)
    assert balances.available == TON - turn.cost and balances.held == 0

    # The context: kept for the next turn, sealed at rest (no plaintext in Redis).
    contexts: ContextStore = chat.app.services.contexts
    raw = await chat.app.services.redis.get(contexts.redis_key(USER))
    assert (
        raw
        and b"colors" not in raw
        and 0 < await chat.app.services.redis.ttl(contexts.redis_key(USER))
    )
    conversation = await contexts.load(USER)
    assert [m["role"] for m in conversation.messages] == ["user", "assistant"]
    assert conversation.messages[0]["content"] == "Name three colors."

    # /privacy tells who answered; /usage lists the turn.
    await chat.send("/privacy", user=USER)
    text = chat.last().text
    assert conversation.last is not None and conversation.last.worker.worker_id in text
    assert "development TEE" in text and conversation.last.worker.key_fingerprint in text
    await chat.send("/usage", user=USER)
    assert f"{turn.prompt_tokens} + {turn.completion_tokens} tokens" in chat.last().text

    # /retry answers the same question again, replacing the answer in the context.
    await chat.send("/retry", user=USER)
    assert len(await turns_of(chat)) == 2
    conversation = await contexts.load(USER)
    assert [m["role"] for m in conversation.messages] == ["user", "assistant"]
    # Under the answer: Regenerate and Continue.
    buttons = final(chat).reply_markup.inline_keyboard[0]
    assert [b.callback_data for b in buttons] == ["regen", "cont"]
    await feed(chat.app.dp, chat.app.bot, callback_update(USER, "cont"))
    assert len(await turns_of(chat)) == 3
    conversation = await contexts.load(USER)
    assert [m["content"] for m in conversation.messages if m["role"] == "user"][-1] == "Continue."
    await feed(chat.app.dp, chat.app.bot, callback_update(USER, "regen"))
    assert len(await turns_of(chat)) == 4
    # /new starts over.
    await chat.send("/new", user=USER)
    assert (await contexts.load(USER)).messages == []


async def test_stop_from_the_draft_cancels_and_bills_what_was_generated(chat: Harness) -> None:
    chat.settings.max_tokens_default = 400
    task = asyncio.create_task(
        chat.send("Write a very long story about a dragon and a knight.", user=USER)
    )
    deadline = time.monotonic() + 60
    while not [d for d in chat.tg.calls("sendMessageDraft") if d.text]:
        assert time.monotonic() < deadline and not task.done()
        await asyncio.sleep(0.02)
    draft_id = chat.tg.calls("sendMessageDraft")[0].draft_id
    # A second message while this one is written is refused politely.
    await chat.send("hello?", user=USER)
    assert "still writing" in chat.last().text
    await feed(chat.app.dp, chat.app.bot, stopped_update(USER, draft_id + 1))  # not this one
    await feed(chat.app.dp, chat.app.bot, stopped_update(USER, draft_id))
    await asyncio.wait_for(task, 60)
    assert "stopped" in final(chat).text
    (turn,) = await turns_of(chat)
    assert turn.finish_reason == "cancelled" and 0 < turn.completion_tokens < 400
    assert turn.cost > 0
    async with chat.db.session() as session:
        assert not list(await session.scalars(select(Hold).where(Hold.state == HoldState.OPEN)))


async def test_in_a_group_the_reply_is_edited_at_most_once_an_interval_and_has_a_stop_button(
    chat: Harness, node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pace is read on the bot's own clock, at each edit it sends (Telegram's arrival
    time adds the machine's delays). The worker is frozen at the second edit, a few tokens
    in, until the stop has been asked: the stop finds the reply running however fast the
    machine writes it, and however slow the bot is to read it."""
    monkeypatch.setattr(streaming, "EDIT_INTERVAL_S", 0.2)  # frozen within a few tokens
    clock = ReadClock()
    monkeypatch.setattr(turn_runner, "ReplyStream", functools.partial(ReplyStream, clock=clock))
    edited_at: list[float] = []
    send = chat.tg.make_request

    async def make_request(bot: Any, method: Any, timeout: int | None = None) -> Any:  # noqa: ASYNC109
        if method.__api_method__ == "editMessageText":
            edited_at.append(clock.last)
            if len(edited_at) == 2:
                node.signal(signal.SIGSTOP)
        return await send(bot, method, timeout)

    monkeypatch.setattr(chat.tg, "make_request", make_request)
    chat.settings.max_tokens_default = 300
    reply_to = bot_message(GROUP, "earlier answer", 5)
    update = message_update(
        USER,
        "Tell me a long story about the sea.",
        chat_id=GROUP,
        chat_type="supergroup",
        reply_to_message=reply_to,
    )
    task = asyncio.create_task(feed(chat.app.dp, chat.app.bot, update))
    try:
        while len(edited_at) < 2:  # until the worker is frozen (the test's timeout bounds it)
            assert not task.done()
            await asyncio.sleep(0.02)
        placeholder = chat.tg.calls("sendMessage")[0]
        assert placeholder.text == "…"
        assert placeholder.reply_markup.inline_keyboard[0][0].callback_data
        assert placeholder.reply_parameters.message_id == update["message"]["message_id"]
        shown = chat.tg.sent("sendMessage")[0].message_id
        stop = callback_update(USER + 1, "stop", chat_id=GROUP, message_id=shown)
        await feed(chat.app.dp, chat.app.bot, stop)  # not theirs to stop
        assert chat.last("answerCallbackQuery").text == "This button is for the person who asked."
        stop = callback_update(USER, "stop", chat_id=GROUP, message_id=shown)
        await feed(chat.app.dp, chat.app.bot, stop)
    finally:
        node.signal(signal.SIGCONT)
    await task
    assert not chat.tg.calls("sendMessageDraft")  # no drafts outside private chats
    resolution = time.get_clock_info("monotonic").resolution
    assert len(edited_at) >= 3
    assert all(
        b - a >= streaming.EDIT_INTERVAL_S - resolution for a, b in itertools.pairwise(edited_at)
    )
    last = final(chat)
    assert last.__api_method__ == "editMessageText"  # the stop button gives way to these:
    assert [b.callback_data for b in last.reply_markup.inline_keyboard[0]] == ["regen", "cont"]
    assert "stopped" in last.text


class ReadClock:
    """``time.monotonic``, remembering its last reading: the bot's time of the edit it sends."""

    def __init__(self) -> None:
        self.last = float("-inf")

    def __call__(self) -> float:
        self.last = time.monotonic()
        return self.last


async def test_refused_drafts_fall_back_to_edits_and_flood_waits_skip_a_beat(
    chat: Harness,
) -> None:
    chat.tg.fail("sendMessageDraft", 400, "Bad Request: TEXTDRAFT_PEER_INVALID")
    await chat.send("Say hello.", user=USER)
    assert chat.tg.calls("sendMessage")[0].text == "…"
    assert "tokens" in final(chat).text
    chat.tg.clear()
    chat.tg.fail("sendMessageDraft", 429, "Too Many Requests: retry after 3600", retry_after=3600)
    async with asyncio.timeout(240):  # a draft never waits out a flood (an hour here)
        await chat.send("Say hello again.", user=USER)
    assert len(chat.tg.calls("sendMessageDraft")) == 1  # paused for the rest of the turn
    assert "tokens" in final(chat).text


async def test_a_user_who_blocked_the_bot_leaves_no_hold_behind(chat: Harness) -> None:
    chat.tg.fail("sendMessageDraft", 403, "Forbidden: bot was blocked by the user")
    await chat.send("Are you there?", user=USER)  # no exception escapes
    deadline = time.monotonic() + 60
    while True:
        async with chat.db.session() as session:
            holds = list(await session.scalars(select(Hold).where(Hold.state == HoldState.OPEN)))
        if not holds:
            break
        assert time.monotonic() < deadline, "the hold was never settled or released"
        await asyncio.sleep(0.2)
    assert await chat.app.services.redis.get(chat.app.services.running.key(USER)) is None


async def ask_in_topic(chat: Harness, user: int, text: str, topic: int) -> None:
    """``user`` writes ``text`` in forum topic ``topic`` of the group."""
    update = message_update(
        user,
        text,
        chat_id=GROUP,
        chat_type="supergroup",
        message_thread_id=topic,
        is_topic_message=True,
    )
    await feed(chat.app.dp, chat.app.bot, update)


async def test_in_forum_topics_each_asker_has_a_context_and_new_and_retry_are_theirs(
    chat: Harness,
) -> None:
    """Alice and Bob ask in one topic, Alice in another too: each has their own context per
    topic; Bob's /new and /retry touch only his, and only he pays for his."""
    bob = USER + 1
    await funded_user(chat.ledger, bob)
    contexts: ContextStore = chat.app.services.contexts

    ask = functools.partial(ask_in_topic, chat)

    await ask(USER, "/ask Name a color.", 1)
    await ask(USER, "/ask Name a fruit.", 2)
    await ask(bob, "/ask Name a bird.", 1)
    replies = [m for m in chat.tg.calls("sendMessage") if m.chat_id == GROUP]
    assert {m.message_thread_id for m in replies} == {1, 2}  # never the General topic

    def asked(scope: str) -> list[str]:
        return [m["content"] for m in loaded[scope].messages if m["role"] == "user"]

    scopes = (f"{GROUP}:1:{USER}", f"{GROUP}:2:{USER}", f"{GROUP}:1:{bob}")
    loaded = {scope: await contexts.load(scope) for scope in scopes}
    assert asked(scopes[0]) == ["Name a color."] and asked(scopes[1]) == ["Name a fruit."]
    assert asked(scopes[2]) == ["Name a bird."]

    bob_user = (await turns_of(chat))[-1].user_id
    await ask(bob, "/retry", 1)
    turns = await turns_of(chat)
    assert len(turns) == 4 and turns[-1].user_id == bob_user  # Bob's question, Bob's bill
    await ask(bob, "/new", 1)
    loaded = {scope: await contexts.load(scope) for scope in scopes}
    assert asked(scopes[2]) == [] and asked(scopes[0]) == ["Name a color."]
    await ask(bob, "/retry", 1)
    assert chat.tg.texts()[-1] == "There is no answer to regenerate yet. Just write to me."
    assert len(await turns_of(chat)) == 4


async def test_where_a_topic_shares_one_context_new_and_retry_stay_the_callers(
    settings: Settings, worker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """COCOON_GROUP_CONTEXT=topic: Alice and Bob share their topic's context (each answer
    follows both questions), another topic has its own; Bob's /retry asks his question again
    (billed to him), his /new drops only his questions, his /system is refused (not an admin),
    and his /forget takes his questions out of the topic's context."""
    async with chat_harness(settings, monkeypatch, group_context="topic") as chat:
        bob = USER + 1
        await funded_user(chat.ledger, bob)
        contexts: ContextStore = chat.app.services.contexts

        ask = functools.partial(ask_in_topic, chat)

        async def asked(topic: int) -> list[tuple[str, str]]:
            loaded = await contexts.load(f"{GROUP}:{topic}")
            return [(m["by"], m["content"]) for m in loaded.messages if m["role"] == "user"]

        await ask(USER, "/ask Name a color.", 1)
        await ask(bob, "/ask Name a bird.", 1)
        await ask(USER, "/ask Name a fruit.", 2)
        alice, bobs = str(USER), str(bob)
        assert await asked(1) == [(alice, "Name a color."), (bobs, "Name a bird.")], [
            (r.__api_method__, str(getattr(r, "text", None))[:30], x is None)
            for r, x in zip(chat.tg.requests, chat.tg.results, strict=True)
        ][-8:]
        assert await asked(2) == [(alice, "Name a fruit.")]
        # Bob's turn was sent Alice's exchange first: the topic's context is shared.
        turns = await turns_of(chat)
        assert turns[1].prompt_tokens > turns[0].prompt_tokens
        raw = await chat.app.services.redis.get(contexts.redis_key(f"{GROUP}:1"))
        assert raw and b"bird" not in raw and b"color" not in raw  # sealed at rest

        await ask(USER, "/ask Name a tree.", 1)
        await ask(bob, "/retry", 1)  # Bob's own last question, not Alice's later one
        turns = await turns_of(chat)
        assert len(turns) == 5, chat.tg.texts()[-3:]
        assert turns[-1].user_id == turns[1].user_id
        assert await asked(1) == [
            (alice, "Name a color."),
            (alice, "Name a tree."),
            (bobs, "Name a bird."),
        ]
        person = {"id": bob, "is_bot": False, "first_name": "Bob"}
        chat.tg.reply("getChatMember", {"status": "member", "user": person})
        await ask(bob, "/system You are a pirate.", 1)
        assert chat.tg.texts()[-1] == (
            "Here the system prompt is the topic's: only group admins set it."
        )
        assert (await contexts.load(f"{GROUP}:1")).system == ""
        await ask(bob, "/new", 1)
        assert await asked(1) == [(alice, "Name a color."), (alice, "Name a tree.")]
        await ask(bob, "/retry", 1)
        assert chat.tg.texts()[-1] == "There is no answer to regenerate yet. Just write to me."

        await ask(bob, "/ask Name a fish.", 1)
        assert (bobs, "Name a fish.") in await asked(1)
        assert await contexts.clear_user(bob) == 1
        assert await asked(1) == [(alice, "Name a color."), (alice, "Name a tree.")]
        assert await asked(2) == [(alice, "Name a fruit.")]


async def test_a_photo_reaches_the_worker_sealed_and_a_worker_without_vision_says_so(
    settings: Settings, worker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model declared ``vision``: the photo (a real JPEG, from Telegram's largest size) goes
    in the sealed request as an image content part; the worker here (llama.cpp with SmolLM2,
    which reads no images) opens the request, finds the image and refuses it; the user is told,
    nothing is charged, and neither the image nor the caption is in Redis."""
    jpeg = (Path(__file__).parent / "fixtures" / "images" / "python.jpg").read_bytes()
    models = {
        name: price.model_copy(update={"vision": True}) for name, price in settings.models.items()
    }
    async with chat_harness(settings, monkeypatch, models=models) as chat:
        chat.tg.files["ph-big"] = jpeg
        sizes = [
            {"file_id": "ph-s", "file_unique_id": "s", "width": 90, "height": 60, "file_size": 9},
            {
                "file_id": "ph-big",
                "file_unique_id": "b",
                "width": 320,
                "height": 200,
                "file_size": len(jpeg),
            },
        ]
        before = await chat.ledger.balances((await chat.user(USER)).id)
        caption = "CAPTIONCANARY what is on it?"
        await chat.send(None, user=USER, photo=sizes, caption=caption)
        assert chat.tg.texts()[-1] == (
            "The worker serving smollm2-135m could not read your image. You were not charged; "
            "/model lists the models."
        )
        assert [r.file_id for r in chat.tg.calls("getFile")] == ["ph-big"]
        after = await chat.ledger.balances((await chat.user(USER)).id)
        assert after.available == before.available and after.held == 0
        redis = chat.app.services.redis
        dump = b"".join([(await redis.dump(key)) or b"" for key in await redis.keys("*")])
        assert b"CAPTIONCANARY" not in dump
        assert base64.b64encode(jpeg)[:40] not in dump
