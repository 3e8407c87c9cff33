"""Hypothesis strategies for Telegram updates of every shape the bot handles (messages and edits
with any text, commands with any arguments, callback queries with any data, pre-checkout
queries), with garbage in their fields, drawn from the fuzzed world's users (``KNOWN``) and
strangers; and the odd shapes Telegram really sends (``anonymous``, ``too_old``)."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from backend.settings import DEFAULT_MODEL
from bot.common import model_token
from bot.handlers.wallet import MAX_STARS
from bot.streaming import STOP
from tests.support.bot import ADMIN, ALICE, TON
from tests.support.bot_fakes import BOT_ID, person
from tests.support.fuzz import json_values

PROVIDER = 601  # a provider with a payout wallet and earnings below the smallest withdrawal
POOR = 602  # a user with no balance
KNOWN = (ALICE, ADMIN, PROVIDER, POOR)

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


message_updates = updates(
    st.sampled_from(["message"] * 6 + ["edited_message", "channel_post"]),
    corrupt(messages()),
)
