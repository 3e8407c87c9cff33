"""TON Connect from the chat, with pytonconnect's real connector, a TON Connect HTTP bridge on
loopback and a wallet app answering through it (tests/support/tonconnect_bridge.py): the wallets
come from TON's wallets list with their bridges; a top-up is connected, signed or rejected; a
payout wallet is linked with a ton_proof; every ending is told to the user and closes the
bridge connection; a bridge that is down is tried a bounded number of times; TON Connect is not
offered where a wallet app could not reach the bot's manifest."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from backend.settings import Settings
from backend.ton.comment import decode_comment
from backend.ton.proof import linked_wallet
from bot.tonconnect import ChatWallets
from bot.tonconnect_client import BRIDGE_GIVE_UP, BridgeUnreachable, CocoonTonConnect
from tests.support.bot import Harness, bot_settings, running_harness
from tests.support.tonconnect_bridge import Bridge, BridgeWallet, running_bridge
from tests.support.wallets import MemoryStorage
from workers.backoff import Backoff

MANIFEST = "https://cocoon.example/tonconnect-manifest.json"


@pytest.fixture
async def bridge() -> AsyncIterator[Bridge]:
    async with running_bridge() as found:
        yield found


def quick(url: str, storage: Any) -> CocoonTonConnect:
    """The real connector, retrying its bridge within milliseconds (the test's clock)."""
    return CocoonTonConnect(url, storage, backoff=Backoff(0.001, 0.002, jitter=max))


@pytest.fixture
async def chat(settings: Settings, redis_url: str, bridge: Bridge) -> AsyncIterator[Harness]:
    s = bot_settings(settings, tonconnect_wallets_url=bridge.wallets_url)
    async with running_harness(s, tonconnect=quick) as harness:
        yield harness


def wallets(chat: Harness) -> ChatWallets:
    return chat.app.services.wallets


async def settled(chat: Harness) -> None:
    """Until the chat's TON Connect sessions have ended (each one ends on its own)."""
    await asyncio.wait_for(asyncio.gather(*wallets(chat).tasks.values()), 30)


async def topup_link(chat: Harness, amount_index: int = 1) -> str:
    """/topup → Pay from a TON wallet → an amount → Tonkeeper: the link the bot gives."""
    await chat.send("/topup")
    buttons = [b for row in chat.last().reply_markup.inline_keyboard for b in row]
    assert "topup:ton" in [b.callback_data for b in buttons]
    await chat.press("topup:ton")
    amounts = chat.last().reply_markup.inline_keyboard[0]
    assert [b.text for b in amounts] == ["1 GRAM", "5 GRAM", "10 GRAM"]
    await chat.press(amounts[amount_index].callback_data)
    assert chat.last().text == "Which wallet do you use?"
    choices = chat.last().reply_markup.inline_keyboard
    assert [row[0].text for row in choices] == ["Tonkeeper", "MyTonWallet"]
    await chat.press(choices[0][0].callback_data)
    link = chat.last().reply_markup.inline_keyboard[0][0]
    assert link.text == "Open Tonkeeper"
    assert link.url.startswith("https://app.tonkeeper.com/ton-connect?v=2&id=")
    return str(link.url)


async def connected_wallet(chat: Harness, bridge: Bridge) -> BridgeWallet:
    """The user's wallet, connected through the link of a top-up of 5 GRAM."""
    wallet = BridgeWallet(bridge)
    await wallet.connect(await topup_link(chat), timestamp=int(time.time()))
    return wallet


# ------------------------------------------------------------------------- wallets list


async def test_the_wallets_are_tons_list_with_their_http_bridges(
    chat: Harness, bridge: Bridge
) -> None:
    offered = await wallets(chat).wallets()
    assert [(w["name"], w["bridge_url"]) for w in offered] == [
        ("Tonkeeper", bridge.url),
        ("MyTonWallet", bridge.url),
    ]  # the wallet with a JS bridge only is not offered: a bot cannot reach it


async def test_without_the_list_pytonconnects_own_wallets_have_https_bridges(
    settings: Settings, redis_url: str
) -> None:
    async with running_harness(bot_settings(settings)) as harness:  # the list is unreachable
        offered = await harness.app.services.wallets.wallets()
    assert [w["name"] for w in offered] == ["Wallet", "Tonkeeper", "Tonhub"]
    for wallet in offered:
        assert wallet["bridge_url"].startswith("https://"), wallet
        assert wallet["universal_url"].startswith("https://"), wallet


# ---------------------------------------------------------------------------- top-up


async def test_a_topup_connects_and_the_wallet_signs_the_transfer(
    chat: Harness, bridge: Bridge
) -> None:
    wallet = await connected_wallet(chat, bridge)
    request = await wallet.next_request()
    assert request["method"] == "sendTransaction"
    (params,) = [json.loads(p) for p in request["params"]]
    assert params["valid_until"] > time.time()  # a wallet refuses a request with no deadline
    (message,) = params["messages"]
    assert message["amount"] == "5000000000"
    user = await chat.user()
    assert decode_comment(message["payload"]).memo == user.deposit_memo
    await wallet.sign(request)
    await settled(chat)
    texts = chat.tg.texts()
    assert "Wallet connected. Confirm the transfer in your wallet." in texts
    assert "Sent 5 GRAM" in texts[-1]
    await bridge.until(lambda: bridge.open_streams == 0)  # the bot left the bridge
    told = [p for p in bridge.posts if p.get("topic") == "disconnect"]
    assert [p["to"] for p in told] == [wallet.client_id]  # and told the wallet so


async def test_a_rejected_transfer_is_told_and_nothing_is_sent(
    chat: Harness, bridge: Bridge
) -> None:
    wallet = await connected_wallet(chat, bridge)
    await wallet.reject(await wallet.next_request())
    await settled(chat)
    assert chat.tg.texts()[-1] == "You declined the transfer: nothing was sent."
    await bridge.until(lambda: bridge.open_streams == 0)


async def test_a_declined_connection_is_told(chat: Harness, bridge: Bridge) -> None:
    link = await topup_link(chat)
    await BridgeWallet(bridge).decline(link)
    await settled(chat)
    assert chat.tg.texts()[-1] == "You declined the connection in your wallet."
    await bridge.until(lambda: bridge.open_streams == 0)


async def test_an_unanswered_connection_times_out_told_and_closed(
    chat: Harness, bridge: Bridge
) -> None:
    wallets(chat).timeout_s = 0.05  # the test's clock: the wallet never opens the link
    await topup_link(chat)
    await settled(chat)
    assert chat.tg.texts()[-1] == "The wallet did not answer in time: nothing was done."
    await bridge.until(lambda: bridge.open_streams == 0)
    subscribed = len(bridge.subscriptions)
    await asyncio.sleep(0.2)  # a closed connector subscribes no more
    assert len(bridge.subscriptions) == subscribed


async def test_cancel_closes_the_bridge_connection(chat: Harness, bridge: Bridge) -> None:
    await topup_link(chat)
    await bridge.until(lambda: bridge.open_streams == 1)
    cancel = chat.last().reply_markup.inline_keyboard[1][0]
    assert cancel.callback_data == "tcx"
    await chat.press("tcx")
    assert chat.last("answerCallbackQuery").text == "Cancelled: the wallet connection is closed."
    await bridge.until(lambda: bridge.open_streams == 0)
    await chat.press("tcx")
    assert chat.last("answerCallbackQuery").text == "Nothing is waiting for your wallet."


async def test_a_bridge_that_is_down_is_told_at_once(chat: Harness, bridge: Bridge) -> None:
    bridge.refuse = True
    await chat.send("/topup")
    await chat.press("topup:ton")
    await chat.press(chat.last().reply_markup.inline_keyboard[0][0].callback_data)
    await chat.press(chat.last().reply_markup.inline_keyboard[0][0].callback_data)
    assert "This wallet cannot be reached right now" in chat.tg.texts()[-1]
    assert not wallets(chat).tasks
    subscribed = len(bridge.subscriptions)
    assert subscribed == 1
    await asyncio.sleep(0.2)  # nothing keeps trying
    assert len(bridge.subscriptions) == subscribed


async def test_a_bridge_lost_after_the_link_is_retried_a_bounded_number_of_times(
    chat: Harness, bridge: Bridge
) -> None:
    await topup_link(chat)
    await bridge.until(lambda: bridge.open_streams == 1)
    bridge.refuse = True
    bridge.drop()  # the bridge goes away under the open stream
    await settled(chat)
    assert chat.tg.texts()[-1].startswith("The connection to your wallet was lost")
    assert len(bridge.subscriptions) == 1 + BRIDGE_GIVE_UP


async def test_the_real_connector_refuses_an_unreachable_bridge(bridge: Bridge) -> None:
    bridge.refuse = True
    connector = quick(MANIFEST, MemoryStorage())
    wallet = {"name": "W", "bridge_url": bridge.url, "universal_url": "https://w.example/tc"}
    with pytest.raises(BridgeUnreachable):
        await connector.connect(wallet, None)
    await asyncio.sleep(0.1)
    assert len(bridge.subscriptions) == 1


# -------------------------------------------------------------------------- payout wallet


async def test_a_payout_wallet_is_linked_only_with_a_valid_proof(
    chat: Harness, bridge: Bridge
) -> None:
    await chat.send("/provider")
    assert chat.last().reply_markup.inline_keyboard[-1][0].callback_data == "tcw:p"
    provider = await chat.user()
    for domain, expected in (("evil.example", "did not verify"), ("cocoon.example", "linked")):
        await chat.press("tcw:p")
        await chat.press(chat.last().reply_markup.inline_keyboard[0][0].callback_data)
        link = chat.last().reply_markup.inline_keyboard[0][0].url
        wallet = BridgeWallet(bridge)
        await wallet.connect(link, domain=domain, timestamp=int(time.time()))
        await settled(chat)
        assert expected in chat.tg.texts()[-1]
    linked = await linked_wallet(chat.db, provider.id, "payout")
    assert linked is not None and linked.public_key == wallet.account.public_key.hex()


# -------------------------------------------------------------- offered only where it works


@pytest.mark.parametrize("public_url", [None, "http://127.0.0.1:18732", "https://10.0.0.5"])
async def test_ton_connect_is_not_offered_where_a_wallet_cannot_reach_the_bot(
    settings: Settings, redis_url: str, public_url: str | None
) -> None:
    async with running_harness(bot_settings(settings, public_url=public_url)) as harness:
        await harness.send("/topup")
        markup = harness.last().reply_markup
        data = [b.callback_data for row in markup.inline_keyboard for b in row]
        assert "topup:ton" not in data and "topup:stars" in data
        await harness.send("/provider")
        markup = harness.last().reply_markup
        data = [b.callback_data for row in (markup.inline_keyboard if markup else []) for b in row]
        assert "tcw:p" not in data
        await harness.press("topup:ton")  # an old button: told, not left spinning
        answer = harness.last("answerCallbackQuery")
        assert answer.show_alert and "not available" in answer.text
        await harness.press("tcw:t:5000000000:tonkeeper")
        assert "not available" in harness.tg.texts()[-1]
