"""A newcomer's first minute (Telegram faked at the session layer, the rest real): /start shows
the balance and a way to top up; /topup gives an address and memo to copy, a ton://transfer
link and takes an amount; a question refused for balance is kept (sealed) and offered again
once money arrives; a balance that covers a shorter answer gets one instead of a refusal."""

from __future__ import annotations

import asyncio
import html
from urllib.parse import parse_qs, urlsplit

from sqlalchemy import select

from backend import notifications
from backend.models import AccountKind, Hold
from backend.pricing import worst_case_cost
from backend.settings import Settings
from bot.handlers.wallet import deposit_address
from tests.support.bot import ALICE, TON, Harness, bot_settings, running_harness
from tests.support.bot_fakes import feed, message_update


def buttons(message: object) -> list[str]:
    markup = getattr(message, "reply_markup", None)
    rows = markup.inline_keyboard if markup is not None else []
    return [str(b.callback_data) for row in rows for b in row if b.callback_data]


async def test_start_shows_the_balance_and_a_way_to_top_up(bot: Harness) -> None:
    await bot.send("/start")
    hello = bot.last()
    assert "Your balance: 0 GRAM" in hello.text and "short answer" in hello.text
    assert {"topup:ton", "topup:stars"} <= set(buttons(hello))
    await bot.ledger.credit_deposit((await bot.user()).id, TON, "dep:start")
    await bot.send("/start")
    assert "Your balance: 1 GRAM" in bot.last().text and bot.last().reply_markup is None


async def test_topup_gives_what_to_copy_a_transfer_link_and_takes_an_amount(bot: Harness) -> None:
    await bot.send("/topup 2.5")
    shown = bot.last()
    me = await bot.user()
    address = deposit_address(bot.settings)
    assert address and shown.parse_mode == "HTML"
    assert (
        f"<code>{address}</code>" in shown.text and f"<code>{me.deposit_memo}</code>" in shown.text
    )
    assert "Amount: 2.5 GRAM" in shown.text
    link = html.unescape(shown.text.split("<code>ton://")[1].split("</code>")[0])
    parts = urlsplit("ton://" + link)
    assert parts.netloc == "transfer" and parts.path == "/" + address
    assert parse_qs(parts.query) == {"amount": ["2500000000"], "text": [me.deposit_memo]}
    assert "tonamt:2500000000" in buttons(shown)  # TON Connect asks that amount
    for wrong in ("/topup abc", "/topup -1", "/topup 1e9"):
        await bot.send(wrong)
        assert "The amount must be a positive number" in bot.last().text, wrong
    await bot.send("/topup 0.0000000001")
    assert "At most 9 digits after the point" in bot.last().text


async def test_a_question_refused_for_balance_is_kept_and_offered_again(bot: Harness) -> None:
    await bot.send("What is the capital of France?")
    refusal = bot.last()
    assert "Not enough balance" in refusal.text
    assert buttons(refusal) == ["topup:open", "again"]
    contexts = bot.app.services.contexts
    raw = await bot.app.services.redis.get(contexts.redis_key(ALICE))
    assert raw and b"France" not in raw  # kept sealed, never in plaintext
    assert (await contexts.load(ALICE)).pending == "What is the capital of France?"
    await bot.press("again")  # still no money: nothing to do but say so again
    assert "Not enough balance" in bot.last().text

    await bot.press("topup:open")
    assert "<code>" in bot.last().text  # the top-up page

    user = await bot.user()
    await bot.ledger.credit_deposit(user.id, TON, "dep:again")
    await notifications.notify(
        bot.db, user.id, notifications.NOTIFY_DEPOSIT, "deposit:9", amount=TON
    )
    assert await bot.app.outbox.drain_once() == 1
    assert buttons(bot.last()) == ["again"]  # the deposit notice offers the question again
    bot.tg.clear()
    await bot.press("again")
    assert (await contexts.load(ALICE)).pending == ""
    assert "Not enough balance" not in bot.tg.all_text()
    async with bot.db.session() as session:
        holds = list(await session.scalars(select(Hold).where(Hold.user_id == user.id)))
    assert holds  # the question was asked (and its hold released: no worker here)


async def test_a_balance_that_covers_a_shorter_answer_gets_one(bot: Harness) -> None:
    await bot.send("/start")
    me = await bot.user()
    price = bot.settings.models[bot.settings.default_model()]
    affordable = worst_case_cost(price, prompt_tokens=200, max_tokens=100)
    await bot.ledger.credit_deposit(me.id, affordable, "dep:short")
    await bot.send("Hi")
    assert "Not enough balance" not in bot.tg.all_text()
    async with bot.db.session() as session:
        (hold,) = list(await session.scalars(select(Hold).where(Hold.user_id == me.id)))
    assert 0 < hold.amount <= affordable  # held what the balance covers, not 512 tokens


async def test_a_deposit_notice_shows_the_balance_as_of_that_deposit(bot: Harness) -> None:
    from backend import accounts
    from tests.support.bot import record_turn

    await bot.send("/start")
    user = await bot.user()
    rate = bot.settings.stars_nano_per_star
    await accounts.credit_stars(bot.ledger, bot.settings, user.id, 100, "charge-a")
    await accounts.credit_stars(bot.ledger, bot.settings, user.id, 100, "charge-b")
    await record_turn(bot.ledger, user.id, 50 * rate)  # spent before the notices go out
    bot.tg.clear()
    assert await bot.app.outbox.drain_once() == 2
    first, second = bot.tg.texts()
    assert "Balance: 0.4 GRAM" in first and "Balance: 0.8 GRAM" in second


async def test_the_welcome_credit_is_given_once_even_to_twin_and_replayed_starts(
    settings: Settings, db_url: str, redis_url: str
) -> None:
    gift = TON // 2
    configured = bot_settings(settings, database_url=db_url, welcome_credit_nano=gift)
    async with running_harness(configured) as bot:
        # The first /start twice at once (a double tap), then the same update delivered again.
        first = message_update(ALICE, "/start")
        await asyncio.gather(
            feed(bot.app.dp, bot.app.bot, first), bot.send("/start"), bot.send("/start")
        )
        await feed(bot.app.dp, bot.app.bot, first)
        await bot.send("/start")
        user = await bot.user()
        assert (await bot.ledger.balances(user.id)).available == gift
        assert await bot.ledger.balance(AccountKind.OPERATOR) == -gift  # the operator paid it
        assert (await bot.ledger.audit()).ok
        welcomes = [t for t in bot.tg.texts() if "was added to your balance" in t]
        assert welcomes == [welcomes[0]] and "Welcome! 0.5 GRAM was added" in welcomes[0]
        assert all("Your balance: 0.5 GRAM" in t for t in bot.tg.texts())

        # Another newcomer gets theirs; the operator changing the amount later gives none again.
        await bot.send("/start", user=ALICE + 1, language="ru")
        assert "Добро пожаловать! На ваш баланс зачислено 0.5 GRAM" in bot.last().text
        bot.settings.welcome_credit_nano = TON  # the same object the handlers read
        await bot.send("/start")
        assert (await bot.ledger.balances(user.id)).available == gift
        assert "was added" not in bot.last().text


async def test_no_welcome_credit_unless_the_operator_sets_one(bot: Harness) -> None:
    await bot.send("/start")
    assert "Your balance: 0 GRAM" in bot.last().text and "was added" not in bot.last().text
    assert await bot.ledger.balance(AccountKind.OPERATOR) == 0
