"""The Mini App's API on money and what it serves: the one amount grammar (refusals as stable
problems said in the page's language), history paged by cursor, and its files (gzipped,
versioned, cached)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from ton_core import Address, Cell

from backend import appkeys
from backend.ledger import Ledger
from backend.models import AccountKind
from backend.settings import Settings, TonSettings
from backend.ton.comment import decode_comment, raw_address
from backend.ton.localnet import LocalTonCenter, LocalTonCenterServer
from backend.ton.toncenter import TonCenter
from backend.ton.watcher import DepositWatcher
from backend.users import get_or_create_user
from backend.web import create_app
from tests.support.miniapp_api import (  # the fixtures, imported by other names
    client_fixture,  # noqa: F401
    error_of,
    node_modules_fixture,  # noqa: F401
)
from tests.support.miniapp_helpers import (
    DEPOSIT,
    TON,
    TestWallet,
    app_settings,
    auth,
    init_data,
)
from tests.support.turns import add_wallet

ALICE = 7101


@pytest.mark.parametrize(
    ("amount", "language", "problem", "words"),
    [
        ("0", "en", "not_positive", "more than 0"),
        ("1.0000000001", "en", "precision", "9 digits"),
        ("1e9", "en", "format", "digits only"),
        ("1_000", "en", "format", "digits only"),
        ("+5", "en", "format", "digits only"),
        ("\u0663", "en", "format", "digits only"),  # an Arabic-Indic three
        ("1,000", "en", "comma", "point for decimals"),  # never read as 1
        ("99999999999", "en", "too_large", "too large"),
        ("1.5.5", "ru", "format", "только цифры"),
        ("0,0", "fr", "not_positive", "supérieur à 0"),
    ],
)
async def test_a_bad_top_up_amount_is_refused_in_the_pages_language(
    client: TestClient, amount: str, language: str, problem: str, words: str
) -> None:
    headers = {**auth(init_data(ALICE)), "X-Cocoon-Language": language}
    response = await client.post("/app/api/topup", headers=headers, json={"amount": amount})
    error = await error_of(response, 400)
    assert error["code"] == "invalid_amount" and error["details"] == {"problem": problem}
    assert words in error["message"], error["message"]


async def test_a_comma_is_a_decimal_separator_where_the_language_has_one(
    client: TestClient,
) -> None:
    for language, amount in (("ru", "1,5"), ("fr", "1,5 GRAM"), ("en", "1.5 TON")):
        headers = {**auth(init_data(ALICE)), "X-Cocoon-Language": language}
        response = await client.post("/app/api/topup", headers=headers, json={"amount": amount})
        assert response.status == 200, await response.text()
        assert (await response.json())["amount"] == "1500000000"


async def test_a_ton_top_up_in_history_links_its_chain_transaction(client: TestClient) -> None:
    ledger: Ledger = client.app[appkeys.LEDGER]
    user = await get_or_create_user(client.app[appkeys.DATABASE], 7302)
    tx_hash = base64.b64encode(bytes(range(32))).decode()
    await ledger.credit_deposit(user.id, TON, f"ton:0:{'ab' * 32}:4242:{tx_hash}")
    await ledger.credit_deposit(user.id, TON, "manual:7302", source=AccountKind.OPERATOR)
    history = await (await client.get("/app/api/history", headers=auth(init_data(7302)))).json()
    (ton,) = (i for i in history["items"] if i["details"]["source"] == "ton")
    assert ton["details"]["tx_url"] == "https://tonviewer.com/transaction/" + bytes(range(32)).hex()
    (other,) = (i for i in history["items"] if i["details"]["source"] == "operator")
    assert "tx_url" not in other["details"]


async def test_history_pages_by_cursor_never_repeat_a_row(client: TestClient) -> None:
    """Paging by offset repeats rows when new ones arrive between pages; by cursor it cannot."""
    ledger: Ledger = client.app[appkeys.LEDGER]
    user = await get_or_create_user(client.app[appkeys.DATABASE], 7301)
    for n in range(25):
        await ledger.credit_deposit(user.id, TON + n, f"dep:cursor:{n}")
    headers = auth(init_data(7301))
    first = await (await client.get("/app/api/history", headers=headers)).json()
    assert len(first["items"]) == 20 and first["has_more"] and first["next_cursor"]
    for n in range(3):  # top-ups land while the user reads the first page
        await ledger.credit_deposit(user.id, 5 * TON + n, f"dep:cursor:new:{n}")
    query = f"/app/api/history?cursor={first['next_cursor']}"
    second = await (await client.get(query, headers=headers)).json()
    amounts = [int(i["amount"]) for i in first["items"] + second["items"]]
    assert sorted(amounts) == [TON + n for n in range(25)]  # each row once, none skipped
    assert not second["has_more"] and second["next_cursor"] is None
    for bad in ("garbage", "x" * 200, "MjAyNnww"):
        response = await client.get(f"/app/api/history?cursor={bad}", headers=headers)
        error = await error_of(response, 400)
        assert error["code"] == "invalid_page" and "cursor" not in error["message"]


# ------------------------------------------------------------------- the libraries


def test_without_node_modules_the_server_says_what_to_do(
    tmp_path: Path, settings: Settings
) -> None:
    from miniapp.assets import TELEGRAM_CDN, find_assets

    bare = find_assets(settings, node_modules=tmp_path / "node_modules")
    assert bare.tonconnect_url is None and bare.telegram_url == TELEGRAM_CDN
    tonconnect, sodium = bare.problems
    assert "npm ci" in tonconnect and "COCOON_TONCONNECT_UI_URL" in tonconnect
    assert "npm ci" in sodium and "sealed chat" in sodium  # libsodium-wrappers
    cdn = "https://cdn.example/@tonconnect/ui@2.4.4/dist/tonconnect-ui.min.js"
    with_cdn = find_assets(
        settings.model_copy(update={"tonconnect_ui_url": cdn}),
        node_modules=tmp_path / "node_modules",
    )
    assert with_cdn.tonconnect_url == cdn and with_cdn.problems == [sodium]


async def test_a_cdn_setting_replaces_the_local_copy(settings: Settings, db_url: str) -> None:
    cdn = "https://cdn.example/tonconnect-ui.min.js"
    configured = app_settings(settings, db_url, tonconnect_ui_url=cdn)
    async with TestClient(TestServer(create_app(configured))) as client:
        page = await (await client.get("/app")).text()
        assert f'"tonconnectUrl": "{cdn}"' in page  # loaded by the views that use it
        assert "/app/vendor/tonconnect/" not in page


async def test_the_local_copy_is_served(client: TestClient, node_modules: None) -> None:
    response = await client.get("/app/vendor/tonconnect/tonconnect-ui.min.js")
    assert response.status == 200 and "TON_CONNECT_UI" in await response.text()
    response = await client.get("/app/vendor/telegram-web-app.js")
    assert response.status == 200 and "Telegram" in await response.text()


async def test_files_are_gzipped_versioned_and_cached(client: TestClient) -> None:
    page = await client.get("/app", headers={"Accept-Encoding": "gzip"})
    assert page.headers["Cache-Control"] == "no-cache"
    assert page.headers["Content-Encoding"] in ("gzip", "deflate")
    html = await page.text()
    bundle = html.split('src="/app/static/cocoon.js?v=', 1)[1].split('"', 1)[0]
    versioned = await client.get(
        f"/app/static/cocoon.js?v={bundle}", headers={"Accept-Encoding": "gzip"}
    )
    assert versioned.status == 200
    assert versioned.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert versioned.headers["Content-Encoding"] == "gzip"
    assert "Cocoon.view" not in html and "window.Cocoon" in await versioned.text()
    plain = await client.get("/app/static/cocoon.js", headers={"Accept-Encoding": "identity"})
    assert plain.headers["Cache-Control"] == "no-cache" and "Content-Encoding" not in plain.headers
    etag = plain.headers["ETag"]
    again = await client.get("/app/static/cocoon.js", headers={"If-None-Match": etag})
    assert again.status == 304 and not await again.read()
    stale = await client.get("/app/static/cocoon.js?v=0000000000000000")
    assert stale.headers["Cache-Control"] == "no-cache"  # an old version is never pinned
    missing = await client.get("/app/static/nothing.js")
    assert missing.status == 404


async def test_withdrawing_all_of_nothing_is_said_in_the_pages_words(client: TestClient) -> None:
    from backend import accounts

    user = await get_or_create_user(client.app[appkeys.DATABASE], 7303)
    await accounts.become_provider(client.app[appkeys.DATABASE], user.id)
    wallet = TestWallet()
    await add_wallet(
        client.app[appkeys.DATABASE], user.id, "payout", wallet.raw, wallet.account()["publicKey"]
    )
    headers = {**auth(init_data(7303)), "X-Cocoon-Language": "ru"}
    body = {"amount": "all", "key": "withdraw-all-of-nothing"}
    response = await client.post("/app/api/provider/withdraw", headers=headers, json=body)
    error = await error_of(response, 400)
    assert error["code"] == "invalid_amount" and error["details"] == {"problem": "not_positive"}
    assert "больше 0" in error["message"]


async def test_a_usdt_top_up_is_offered_at_its_rate_built_for_the_wallet_and_shown_in_history(
    settings: Settings, db_url: str
) -> None:
    """The Mini App's USDT top-up end to end against the local TON Center: the rate shown,
    the jetton transfer the linked wallet signs (executed as the jetton wallets do), the
    watcher's credit, and the history row with the USDT paid."""
    usdt_master = "0:" + "7E" * 32
    net = LocalTonCenter()
    net.add_jetton(usdt_master)
    wallet = TestWallet()
    net.mint_jetton(usdt_master, wallet.raw, 100 * 10**6)
    async with LocalTonCenterServer(net) as url:
        ton = TonSettings(
            deposit_address=DEPOSIT,
            proof_domains=["cocoon.example"],
            api_url=url,
            usdt_master=usdt_master,
            usdt_nano_per_micro=400,
        )
        client = TestClient(TestServer(create_app(app_settings(settings, db_url, ton=ton))))
        await client.start_server()
        try:
            db = client.app[appkeys.DATABASE]
            await db.upgrade()
            headers = auth(init_data(7304))
            me = await (await client.get("/app/api/me", headers=headers)).json()
            topup = me["topup"]
            assert (topup["usdt"], topup["nano_per_usdt"]) == (True, "400000000")
            response = await client.post(
                "/app/api/topup/usdt", headers=headers, json={"amount": "5"}
            )
            assert response.status == 400  # no wallet linked: nothing to sign with
            user = await get_or_create_user(db, 7304)
            await add_wallet(db, user.id, "user", wallet.raw, wallet.account()["publicKey"])
            for bad in ("0", "1.0000001", "99999999999"):  # USDT has 6 decimals
                response = await client.post(
                    "/app/api/topup/usdt", headers=headers, json={"amount": bad}
                )
                assert (await error_of(response, 400))["code"] == "invalid_amount"
            response = await client.post(
                "/app/api/topup/usdt", headers=headers, json={"amount": "12.5"}
            )
            assert response.status == 200, await response.text()
            order = await response.json()
            assert (order["usdt"], order["units"], order["amount"]) == (
                "12.5",
                "12500000",
                str(12_500_000 * 400),
            )
            (message,) = order["transaction"]["messages"]
            assert raw_address(message["address"]) == net.jetton_wallet(usdt_master, wallet.raw)
            assert "network" not in order["transaction"]  # TON Connect refuses null keys
            # The wallet signs it; its jetton wallet moves the USDT and notifies the deposit
            # wallet with the memo, as the contracts do.
            body = Cell.one_from_boc(base64.b64decode(message["payload"])).begin_parse()
            assert body.load_uint(32) == 0x0F8A7EA5
            body.load_uint(64)
            units, destination = body.load_coins(), body.load_address()
            body.load_address(), body.load_bit(), body.load_coins(), body.load_bit()
            memo = decode_comment(base64.b64encode(body.load_ref().to_boc()).decode()).memo
            assert isinstance(destination, Address)
            net.transfer_jetton(
                usdt_master, wallet.raw, raw_address(destination), units, comment=memo
            )
            async with TonCenter(url) as api:
                w = DepositWatcher(
                    db,
                    client.app[appkeys.LEDGER],
                    api,
                    DEPOSIT,
                    usdt_master=usdt_master,
                    usdt_nano_per_micro=400,
                )
                while await w.poll_once():
                    pass
            me = await (await client.get("/app/api/me", headers=headers)).json()
            assert me["balance"]["available"] == str(12_500_000 * 400)
            history = await (await client.get("/app/api/history", headers=headers)).json()
            (item,) = history["items"]
            assert item["details"]["source"] == "usdt"
            assert (item["details"]["usdt_micro"], item["details"]["nano_per_micro"]) == (
                12_500_000,
                400,
            )
        finally:
            await client.close()
