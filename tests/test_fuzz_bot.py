"""Bad input to the bot, generated (hypothesis): Telegram updates of every shape the bot
handles (messages and edits with any text, commands with any arguments, callback queries with
any data, pre-checkout queries, successful payments) with garbage in their fields, fed through
the real dispatcher (Telegram faked at the session layer, tests/support/bot_fakes.py).

Every update ends in an answer or a refusal: one that does not validate as a Telegram update
is refused by aiogram's models; one that does is handled without an error reaching the bot's
error handler (it logs ``update ... failed``), within a time limit, and without moving money:
no account's balance changes and the ledger audit holds. A successful payment (trusted input:
only Telegram can send it) credits its Stars once per charge id, and nothing else.

Shared settings (``FUZZ``: ``COCOON_FUZZ_EXAMPLES``) and ``json_values``: tests/support/fuzz.py;
the updates' strategies: tests/support/bot_updates.py.
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
from backend.models import Account
from bot.handlers.wallet import MAX_STARS
from tests.support.bot import ADMIN, ALICE, TON, Harness, record_turn
from tests.support.bot_fakes import callback_update, message_update, person
from tests.support.bot_updates import (
    KNOWN,
    PROVIDER,
    anonymous,
    callback_queries,
    corrupt,
    message_updates,
    odds,
    pre_checkout_queries,
    too_old,
    updates,
)
from tests.support.fuzz import FUZZ, json_values
from tests.support.payouts import Clock
from tests.support.turns import add_wallet

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
    await add_wallet(bot.db, w.users[PROVIDER], "payout", "0:" + "ab" * 32, "00")
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
