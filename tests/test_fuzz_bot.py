"""Bad input to the bot, generated (hypothesis): Telegram updates of every shape the bot
handles (messages and edits with any text, commands with any arguments, callback queries with
any data, pre-checkout queries, successful payments) with garbage in their fields, fed through
the real dispatcher (Telegram faked at the session layer, tests/support/bot_fakes.py).

Every update ends in an answer or a refusal: one that does not validate as a Telegram update
is refused by aiogram's models; one that does is handled without an error reaching the bot's
error handler (it logs ``update ... failed``), within a time limit, and without moving money:
no account's balance changes and the ledger audit holds. A successful payment (trusted input:
only Telegram can send it) credits its Stars once per charge id, and nothing else.

Shared settings (``FUZZ``: ``COCOON_FUZZ_EXAMPLES``) and ``json_values``: tests/support/fuzz.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiogram.types import Update
from hypothesis import event, example, given
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from pydantic import ValidationError
from sqlalchemy import select

from backend.apikeys import create_key
from backend.models import Account, TonWallet
from backend.settings import DEFAULT_MODEL
from bot.common import model_token
from bot.handlers.wallet import MAX_STARS
from bot.streaming import STOP
from tests.support.bot import ADMIN, ALICE, TON, Harness, record_turn
from tests.support.bot_fakes import BOT_ID, callback_update, message_update, person
from tests.support.fuzz import FUZZ, json_values
from tests.support.payouts import Clock

PROVIDER = 601  # a provider with a payout wallet and earnings below the smallest withdrawal
POOR = 602  # a user with no balance
KNOWN = (ALICE, ADMIN, PROVIDER, POOR)
TIMEOUT_S = 15  # one update; a hang fails the example instead of the whole run
CRASH = "update %s (%s) failed"  # what bot.telegram.on_error logs for an unexpected error


class Errors(logging.Handler):
    """Every ERROR record, from any logger, while an update is handled."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class World:
    h: Harness
    errors: Errors
    users: dict[int, int] = field(default_factory=dict)  # Telegram id -> user id
    charges: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    """Each Stars charge id's sender and payment, as Telegram sent it first."""
    clock: Clock = field(default_factory=Clock)
    """The stand-in Bot API's time (its flood limits), moved a minute per update."""


@pytest.fixture
def errors() -> Iterator[Errors]:
    handler = Errors()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


@pytest.fixture
async def world(bot: Harness, errors: Errors) -> AsyncIterator[World]:
    """Users with money: Alice and the admin have a balance, the provider has earnings (too
    few to withdraw) and a payout wallet, Alice has an API key."""
    w = World(bot, errors)
    bot.tg.rules.clock = w.clock
    for telegram_id in KNOWN:
        await bot.send("/start", user=telegram_id)
        w.users[telegram_id] = (await bot.user(telegram_id)).id
    await bot.ledger.credit_deposit(w.users[ALICE], 5 * TON, "dep:alice")
    await bot.ledger.credit_deposit(w.users[ADMIN], 2 * TON, "dep:admin")
    await bot.send("/provider", user=PROVIDER)
    async with bot.db.session() as session, session.begin():
        session.add(
            TonWallet(
                user_id=w.users[PROVIDER],
                purpose="payout",
                address="0:" + "ab" * 32,
                public_key="00",
            )
        )
    await record_turn(bot.ledger, w.users[ADMIN], TON // 2, provider_id=w.users[PROVIDER])
    await create_key(bot.db, w.users[ALICE], name="fuzz")
    bot.app.services.limiter.per_minute = 10**9  # every text goes as far as a turn can
    bot.tg.clear()
    errors.records.clear()
    yield w


def note(what: str) -> None:
    """What became of an update, in ``--hypothesis-show-statistics``."""
    if currently_in_test_context():
        event(what)


async def balances(w: World) -> dict[int, int]:
    """Every account's balance but the empty ones (a new user's accounts are empty)."""
    async with w.h.db.session() as session:
        rows = await session.execute(select(Account.id, Account.balance))
        return {account_id: balance for account_id, balance in rows if balance}


async def handle(w: World, raw: dict[str, Any], expected: tuple[str, ...] = ()) -> bool:
    """Feed one update; False when aiogram's models refuse it (not a Telegram update). No
    ERROR is logged but the ``expected`` ones (their messages' beginnings)."""
    bot = w.h.app.bot
    try:
        update = Update.model_validate(raw, context={"bot": bot})
    except ValidationError:
        note("refused: not a Telegram update")
        return False
    w.errors.records.clear()
    w.h.tg.clear()
    # What Telegram delivered exists there (its chat's messages, its topic), as in feed(),
    # and a person sends one update a minute at most: the flood limits are never the bot's
    # doing here (tests/test_bot_telegram_rules.py tests them).
    w.h.tg.rules.saw(update.model_dump(mode="json", exclude_none=True))
    w.clock.now += 60
    await asyncio.wait_for(w.h.app.dp.feed_update(bot, update), TIMEOUT_S)
    crashes = [r for r in w.errors.records if str(r.msg).startswith(CRASH)]
    assert not crashes, crashes[0].getMessage()  # the type and the traceback, never the text
    unexpected = [r for r in w.errors.records if not str(r.msg).startswith(expected)]
    assert not unexpected, unexpected[0].getMessage()
    note("handled: " + (", ".join(sorted({r.__api_method__ for r in w.h.tg.requests})) or "-"))
    return True


async def check_money(w: World, before: dict[int, int]) -> None:
    assert await balances(w) == before
    assert (await w.h.ledger.audit()).ok


async def handle_moving_no_money(w: World, raw: dict[str, Any]) -> None:
    """Feed one update; no balance has changed after it and the ledger audits."""
    before = await balances(w)
    await handle(w, raw)
    await check_money(w, before)


# ------------------------------------------------------------------------ strategies

COMMANDS = (
    "/start", "/help", "/lang", "/model", "/balance", "/usage", "/privacy", "/forget", "/topup",
    "/apikey", "/provider", "/addworker", "/workers", "/earnings", "/withdraw", "/stats",
    "/prices", "/new", "/retry", "/nosuch", "/",
)  # fmt: skip
CALLBACK_PREFIXES = (
    "lang:", "model:", "forget:yes", "forget:no", "topup:stars", "topup:ton", "stars:",
    "tonamt:", "tcw:t:", "tcw:p", "tcw:p:", "apikey:new", "apikey:revoke:", "wd:", "wd:no",
    STOP,
)  # fmt: skip

telegram_ids = st.sampled_from(KNOWN) | st.integers(min_value=1, max_value=2**52 - 1)
numbers = st.from_regex(r"[-+]?[0-9]{0,25}([.,][0-9]{0,15})?", fullmatch=True) | st.integers(
    min_value=-(2**80), max_value=2**80
).map(str)
odd_text = st.sampled_from(
    ["", " ", "\n", "\u202e", "\x00", "\ufeff", "٣", "²", "1e9", "nan", "inf", "0x10", "1_000",
     "all", "ALL", "🏳️‍🌈" * 50, "<b>", "</code>", "&amp;", "*_`[", "@cocoon_bot", "\r\n\r\n"]
)  # fmt: skip
short_text = st.text(max_size=80) | odd_text | numbers


def odds(n: int) -> st.SearchStrategy[bool]:
    """True n times in n + 1 (hypothesis draws small integers far more often than 1 in n)."""
    return st.sampled_from([True] * n + [False])


def huge_text() -> st.SearchStrategy[str]:
    """Past the prompt limit (8000) and Telegram's (4096), in any script."""
    return st.builds(
        lambda c, n: c * n,
        st.characters(exclude_categories=["Cs"]),
        st.integers(min_value=1, max_value=10_000),
    )


def command_texts() -> st.SearchStrategy[str]:
    mention = st.sampled_from(["", "", "@cocoon_bot", "@COCOON_BOT", "@other_bot", "@"])
    sep = st.sampled_from([" ", " ", "  ", "\n", "\t", ""])
    arg = (
        short_text
        | st.from_regex(r"[A-Za-z0-9_-]{0,64}", fullmatch=True)  # a deep link's parameter
        | st.tuples(st.sampled_from(["new", "create", "revoke", "NEW", "all"]), short_text).map(
            " ".join
        )
        | st.sampled_from([DEFAULT_MODEL, "all", "new"])
        | huge_text()
    )
    return st.builds(
        lambda c, m, s, a: f"{c}{m}{s}{a}", st.sampled_from(COMMANDS), mention, sep, arg
    )


texts = command_texts() | st.text(max_size=300) | short_text | huge_text()

entities = st.lists(
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(["bot_command", "mention", "bold", "url", "text_link", "x"]),
            "offset": st.integers(min_value=-5, max_value=10_000),
            "length": st.integers(min_value=-5, max_value=10_000),
        },
        optional={"url": st.text(max_size=20), "user": st.builds(person, telegram_ids)},
    ),
    max_size=3,
)


def senders() -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(person, st.sampled_from(KNOWN)) | st.fixed_dictionaries(
        {
            "id": telegram_ids,
            "is_bot": st.sampled_from([False, False, False, True]),
            "first_name": st.text(max_size=40),
        },
        optional={
            "language_code": st.text(max_size=20) | st.sampled_from(["ru", "fr", "pt-br", ""]),
            "last_name": st.text(max_size=20),
            "username": st.text(max_size=20),
            "is_premium": st.booleans(),
        },
    )


CHAT_TYPES = st.sampled_from(["private", "private", "private", "group", "supergroup", "channel"])
bot_message = st.builds(
    lambda mid, text: {
        "message_id": mid,
        "date": 1_700_000_000,
        "chat": {"id": ALICE, "type": "private"},
        "from": {"id": BOT_ID, "is_bot": True, "first_name": "Cocoon"},
        "text": text,
    },
    st.integers(min_value=1, max_value=2**31),
    st.text(max_size=20),
)
content = st.fixed_dictionaries(
    {},
    optional={
        "location": st.fixed_dictionaries(
            {"latitude": st.floats(-90, 90), "longitude": st.floats(-180, 180)}
        ),
        "caption": st.text(max_size=100),
        "contact": st.fixed_dictionaries(
            {"phone_number": st.text(max_size=15), "first_name": st.text(max_size=10)}
        ),
        "dice": st.fixed_dictionaries(
            {"emoji": st.sampled_from(["🎲", "🎯"]), "value": st.integers(1, 6)}
        ),
        "new_chat_members": st.lists(senders(), max_size=2),
        "reply_to_message": bot_message,
        "via_bot": senders(),
        "is_topic_message": st.booleans(),
        "message_thread_id": st.integers(min_value=1, max_value=2**31),
        "unknown_field": json_values(4),
    },
)


@st.composite
def messages(draw: st.DrawFn) -> dict[str, Any]:
    sender = draw(senders())
    chat_type = draw(CHAT_TYPES)
    chat_id = (
        sender["id"]
        if chat_type == "private" and draw(odds(5))
        else draw(st.integers(min_value=-(10**13), max_value=2**52 - 1))
    )
    message: dict[str, Any] = {
        "message_id": draw(st.integers(min_value=1, max_value=2**31)),
        "date": draw(st.integers(min_value=0, max_value=2**32)),
        "chat": {"id": chat_id, "type": chat_type},
        "from": sender,
        **draw(content),
    }
    if draw(odds(4)):
        message["text"] = draw(texts)
        if draw(st.booleans()):
            message["entities"] = draw(entities)
    if not draw(odds(15)):
        del message["from"]  # what a channel sends
    return message


def corrupt(shapes: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """The shape as it is, or with a field (or a new one) replaced by any JSON."""

    @st.composite
    def maybe_corrupted(draw: st.DrawFn) -> dict[str, Any]:
        value = dict(draw(shapes))
        if not draw(odds(3)):
            key = draw(st.sampled_from(sorted(value)) | st.text(max_size=10))
            value[key] = draw(json_values(6))
        return value

    return maybe_corrupted()


def updates(kind: st.SearchStrategy[str], body: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.builds(
        lambda uid, k, b: {"update_id": uid, k: b},
        st.integers(min_value=0, max_value=2**31),
        kind,
        body,
    )


def callback_data() -> st.SearchStrategy[str]:
    prefix = st.sampled_from(CALLBACK_PREFIXES)
    tail = short_text | st.integers(min_value=-(2**70), max_value=2**70).map(str)
    return (
        st.builds(str.__add__, prefix, tail)
        | prefix
        | st.text(max_size=64)
        | st.builds(
            lambda amount, nonce: f"wd:{amount}:{nonce}",
            st.integers(min_value=-(2**70), max_value=2**70) | st.sampled_from([TON, TON // 2]),
            st.text(max_size=12),
        )
        | st.builds(
            lambda amount, index: f"tcw:t:{amount}:{index}",
            st.sampled_from([TON, 5 * TON, 0, -1, 10**16]) | numbers,
            st.integers(min_value=-3, max_value=30).map(str) | short_text,
        )
        | st.builds(lambda m: f"model:{model_token(m)}", st.sampled_from([DEFAULT_MODEL, "x"]))
        | st.integers(min_value=-5, max_value=MAX_STARS + 5).map(lambda n: f"stars:{n}")
    )


@st.composite
def callback_queries(draw: st.DrawFn) -> dict[str, Any]:
    sender = draw(senders())
    query: dict[str, Any] = {
        "id": draw(st.text(min_size=1, max_size=20)),
        "from": sender,
        "chat_instance": draw(st.text(max_size=20)),
    }
    if draw(odds(9)):
        query["data"] = draw(callback_data())
    else:
        query["game_short_name"] = draw(st.text(max_size=20))
    where = draw(st.sampled_from(["message", "message", "message", "inaccessible", "inline"]))
    chat = {"id": sender["id"], "type": "private"}
    if not draw(odds(3)):
        chat = {"id": draw(st.integers(-(10**13), -1)), "type": "supergroup"}
    if where == "message":
        query["message"] = {
            "message_id": draw(st.integers(min_value=1, max_value=2**31)),
            "date": draw(st.integers(min_value=1, max_value=2**32)),
            "chat": chat,
            "from": {"id": BOT_ID, "is_bot": True, "first_name": "Cocoon"},
            "text": draw(st.text(max_size=40)),
        }
    elif where == "inaccessible":  # a message older than 48 h: date 0, nothing but ids
        query["message"] = {
            "message_id": draw(st.integers(min_value=1, max_value=2**31)),
            "date": 0,
            "chat": chat,
        }
    else:
        query["inline_message_id"] = draw(st.text(min_size=1, max_size=20))
    return query


def anonymous(update: dict[str, Any]) -> dict[str, Any]:
    """The message as a group's anonymous admin sends it (from Telegram's stand-in bot)."""
    message = update["message"]
    message["from"] = {"id": 1087968824, "is_bot": True, "first_name": "Group"}
    message["sender_chat"] = {"id": message["chat"]["id"], "type": "group", "title": "G"}
    return update


def too_old(update: dict[str, Any]) -> dict[str, Any]:
    """The button's message as Telegram gives it once too old: ids only (date 0)."""
    message = update["callback_query"]["message"]
    update["callback_query"]["message"] = {k: message[k] for k in ("message_id", "chat")}
    update["callback_query"]["message"]["date"] = 0
    return update


def pre_checkout_queries() -> st.SearchStrategy[dict[str, Any]]:
    payload = (
        st.builds(
            lambda uid, stars: f"stars:{uid}:{stars}",
            st.integers(min_value=-3, max_value=10),
            st.integers(min_value=-5, max_value=MAX_STARS + 5),
        )
        | st.text(max_size=64)
        | st.builds(str.__add__, st.just("stars:"), short_text)
    )
    return st.fixed_dictionaries(
        {
            "id": st.text(min_size=1, max_size=20),
            "from": senders(),
            "currency": st.sampled_from(["XTR", "XTR", "USD", "", "xtr"]),
            "total_amount": st.integers(min_value=-(2**40), max_value=2**40)
            | st.integers(min_value=-5, max_value=MAX_STARS + 5),
            "invoice_payload": payload,
        },
        optional={
            "shipping_option_id": st.text(max_size=10),
            "order_info": st.fixed_dictionaries({}, optional={"name": st.text(max_size=10)}),
        },
    )


# ------------------------------------------------------------------------------ tests


message_updates = updates(
    st.sampled_from(["message"] * 6 + ["edited_message", "channel_post"]),
    corrupt(messages()),
)


@FUZZ
@given(raw=odds(3).flatmap(lambda shaped: message_updates if shaped else json_values()))
@example(raw=message_update(ALICE, "/withdraw 1,2.3"))
@example(raw=message_update(PROVIDER, "/withdraw all"))
@example(raw=message_update(ALICE, "/apikey revoke 99999999999999999999999"))
@example(raw=message_update(ALICE, "/start " + "ж" * 5000))
@example(raw=message_update(ALICE, "hello"))  # as far as a turn: no worker serves it
@example(raw=anonymous(message_update(ALICE, "/help@cocoon_bot", chat_id=-100, chat_type="group")))
async def test_any_message_gets_an_answer_or_a_refusal_and_moves_no_money(
    world: World, raw: Any
) -> None:
    await handle_moving_no_money(world, raw)


@FUZZ
@given(raw=updates(st.just("callback_query"), corrupt(callback_queries())))
@example(raw=callback_update(PROVIDER, f"wd:{TON // 2}:n0nce"))
@example(raw=callback_update(ALICE, "apikey:revoke:99999999999999999999999"))
@example(raw=callback_update(ALICE, "tcw:t:1000000000:²"))  # "²".isdigit(), not a number
@example(raw=too_old(callback_update(ALICE, "forget:no")))
async def test_any_callback_data_gets_an_answer_or_a_refusal_and_moves_no_money(
    world: World, raw: Any
) -> None:
    await handle_moving_no_money(world, raw)


@FUZZ
@given(raw=updates(st.just("pre_checkout_query"), corrupt(pre_checkout_queries())))
async def test_any_pre_checkout_query_is_answered_at_once_and_moves_no_money(
    world: World, raw: Any
) -> None:
    before = await balances(world)
    if not await handle(world, raw):
        return
    query = raw["pre_checkout_query"]
    answers = world.h.tg.calls("answerPreCheckoutQuery")
    if query["from"]["is_bot"]:  # nobody to serve (a bot cannot pay)
        assert not answers
    else:
        assert len(answers) == 1  # Telegram waits for it: always answered
    if answers and answers[0].ok:  # only our own invoice, for this user, of this many Stars
        user_id = (await world.h.user(query["from"]["id"])).id
        assert query["invoice_payload"] == f"stars:{user_id}:{query['total_amount']}"
        assert query["currency"] == "XTR" and 0 < query["total_amount"] <= MAX_STARS
    await check_money(world, before)


@FUZZ
@given(
    sender=st.sampled_from(KNOWN),
    payment=st.fixed_dictionaries(
        {
            "currency": st.sampled_from(["XTR", "XTR", "XTR", "USD"]),
            # What Telegram guarantees: a charge id, and the Stars of one of our invoices.
            "total_amount": st.integers(min_value=1, max_value=MAX_STARS),
            "invoice_payload": st.text(max_size=64) | st.just("stars:1:100"),
            "telegram_payment_charge_id": st.uuids().map(str)  # a new payment
            | st.sampled_from(["charge-1", "charge-2"])  # likely one sent again
            | st.text(min_size=1, max_size=150),
            "provider_payment_charge_id": st.text(max_size=20),
        },
        optional={"subscription_expiration_date": st.integers(0, 2**32)},
    ),
)
async def test_a_successful_payment_is_credited_once_per_charge(
    world: World, sender: int, payment: dict[str, Any]
) -> None:
    """Telegram's word (only Telegram sends it): credited at its Stars, once per charge id.
    Telegram sends a charge again only as it was (a redelivery): the same payer and payment."""
    charge = payment["telegram_payment_charge_id"]
    first = charge not in world.charges
    sender, payment = world.charges.setdefault(charge, (sender, payment))
    before = await balances(world)
    user_id = world.users[sender]
    was = (await world.h.ledger.balances(user_id)).available
    raw = {
        "update_id": 1,
        "message": {
            "message_id": 1,
            "date": 1_700_000_000,
            "chat": {"id": sender, "type": "private"},
            "from": person(sender),
            "successful_payment": payment,
        },
    }
    assert await handle(world, raw, expected=("a successful payment in",))
    credit = 0
    if first and payment["currency"] == "XTR":
        credit = payment["total_amount"] * world.h.settings.stars_nano_per_star
    told = [text for text in world.h.tg.texts() if "Stars" in text]
    assert len(told) == (1 if credit else 0)  # told at once, and never twice
    assert (await world.h.ledger.balances(user_id)).available == was + credit
    if not credit:
        assert await balances(world) == before
    assert (await world.h.ledger.audit()).ok


async def test_the_fuzzed_world_is_one_where_money_could_move(world: World) -> None:
    """The premise of the tests above, so that their "no money moved" means something: the
    users have money, a text goes as far as a turn (no worker serves it), and the provider's
    withdrawal stops only at the smallest amount."""
    h = world.h
    assert await handle(world, message_update(ALICE, "hello"))
    assert "No worker is serving" in h.last().text
    assert await handle(world, message_update(PROVIDER, "/withdraw all"))
    assert "smallest withdrawal is 1 GRAM" in h.last().text
    earned = (await h.ledger.balances(world.users[PROVIDER])).earned
    assert earned > 0
    assert await handle(world, callback_update(PROVIDER, f"wd:{earned}:n0nce"))
    assert "smallest withdrawal" in h.last("editMessageText").text
    assert (await h.ledger.balances(world.users[ALICE])).available == 5 * TON
