"""The Mini App's JSON API through ``cocoon web`` (aiohttp test client), on SQLite and
PostgreSQL: Telegram initData on every call, ton_proof before a wallet is linked, the top-up
transaction, history, the provider dashboard and withdrawals, Stars invoices."""

from __future__ import annotations

import base64
import struct
import time
from urllib.parse import parse_qsl

import pytest
from aiohttp.test_utils import TestClient, TestServer
from pytoniq_core import Cell

from backend import accounts, appkeys
from backend.ledger import Ledger, TurnUsage
from backend.models import WorkerState
from backend.settings import Settings, TonSettings
from backend.ton.comment import decode_comment, friendly_address
from backend.users import get_or_create_user
from backend.web import create_app
from tests.support.miniapp_api import (  # the fixtures, imported by other names
    client_fixture,  # noqa: F401
    error_of,
    node_modules_fixture,  # noqa: F401
)
from tests.support.miniapp_helpers import (
    DEPOSIT,
    DOMAIN,
    OTHER_BOT_TOKEN,
    TON,
    FakeBotApi,
    TestWallet,
    app_settings,
    auth,
    forged_init_data,
    init_data,
)

ALICE = 7001


# ----------------------------------------------------------------------- initData


async def test_valid_init_data_is_the_user(client: TestClient) -> None:
    response = await client.get("/app/api/me", headers=auth(init_data(ALICE)))
    assert response.status == 200
    me = await response.json()
    assert me["telegram_id"] == ALICE and me["first_name"] == "Ada" and not me["dev"]
    assert me["balance"] == {"available": "0", "held": "0"}
    assert me["deposit_memo"].startswith("CC")
    assert me["wallet"] is None and me["is_provider"] is False
    assert me["topup"]["ton"] is True and me["topup"]["stars"] is True


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (None, "init_data_missing"),
        ("Bearer something", "init_data_missing"),
        ("tma query_id=1&user=%7B%22id%22%3A1%7D&auth_date=1&hash=00", "init_data_invalid"),
        ("tma " + forged_init_data(ALICE, 1), "init_data_invalid"),
        ("tma " + init_data(ALICE, token=OTHER_BOT_TOKEN), "init_data_invalid"),
        ("tma " + init_data(ALICE, auth_date=int(time.time()) - 86_400 - 60), "init_data_expired"),
        ("tma " + init_data(ALICE, auth_date=int(time.time()) + 3600), "init_data_expired"),
    ],
    ids=["missing", "other-scheme", "garbage", "forged", "other-bot", "expired", "future"],
)
async def test_bad_init_data_is_a_401_json_error(
    client: TestClient, header: str | None, code: str
) -> None:
    headers = {"Authorization": header} if header else {}
    for method, path in (("GET", "/app/api/me"), ("POST", "/app/api/topup")):
        response = await client.request(method, path, headers=headers, json={"amount": "1"})
        assert (await error_of(response, 401))["code"] == code


async def test_errors_speak_the_callers_language(client: TestClient) -> None:
    response = await client.get("/app/api/me", headers={"Accept-Language": "ru-RU,ru;q=0.9"})
    russian = (await error_of(response, 401))["message"]
    response = await client.get("/app/api/me")
    english = (await error_of(response, 401))["message"]
    assert russian != english and "Telegram" in russian
    response = await client.post(
        "/app/api/topup", headers=auth(init_data(ALICE, language="fr")), json={"amount": "x"}
    )
    assert "montant" in (await error_of(response, 400))["message"].lower()


async def test_development_mode_signs_for_the_dev_user_only(
    settings: Settings, db_url: str
) -> None:
    dev = app_settings(settings, db_url, miniapp_dev=True, local_telegram_id=4242)
    async with TestClient(TestServer(create_app(dev))) as client:
        await client.app[appkeys.DATABASE].upgrade()
        page = await (await client.get("/app")).text()
        assert 'id="dev-banner"' in page and "4242" in page
        verifier = client.app[__import__("miniapp.routes").routes.VERIFIER]
        dev_data = verifier.dev_init_data()
        me = await (await client.get("/app/api/me", headers=auth(dev_data))).json()
        assert me["telegram_id"] == 4242 and me["dev"] is True
        # The dev key cannot sign for anyone else, and a real initData still works.
        fields = dict(parse_qsl(dev_data))
        assert fields["user"].startswith('{"id":4242')
        response = await client.get("/app/api/me", headers=auth(init_data(ALICE)))
        assert (await response.json())["dev"] is False
    off = await _page_without_dev(settings, db_url)
    assert 'id="dev-banner"' not in off and 'devInitData": null' in off


async def _page_without_dev(settings: Settings, db_url: str) -> str:
    async with TestClient(TestServer(create_app(app_settings(settings, db_url)))) as client:
        return await (await client.get("/app")).text()


# ------------------------------------------------------------------------ ton_proof


async def _payload(client: TestClient, who: int = ALICE) -> str:
    response = await client.post("/app/api/wallet/payload", headers=auth(init_data(who)))
    assert response.status == 200
    body = await response.json()
    assert len(body["payload"]) == 64 and body["ttl_s"] > 0
    return body["payload"]


async def test_a_valid_ton_proof_links_the_wallet_and_disconnect_unlinks(
    client: TestClient,
) -> None:
    wallet = TestWallet()
    payload = await _payload(client)
    body = {"account": wallet.account(), "proof": wallet.proof(payload, DOMAIN)}
    response = await client.post("/app/api/wallet", headers=auth(init_data(ALICE)), json=body)
    assert response.status == 200, await response.text()
    linked = await response.json()
    assert linked["raw"] == wallet.raw
    assert linked["address"] == friendly_address(wallet.raw, bounceable=False)
    me = await (await client.get("/app/api/me", headers=auth(init_data(ALICE)))).json()
    assert me["wallet"] == linked

    # The same proof again: its payload is spent.
    response = await client.post("/app/api/wallet", headers=auth(init_data(ALICE)), json=body)
    error = await error_of(response, 400)
    assert error["code"] == "proof_refused" and "already used" in error["message"]

    response = await client.delete("/app/api/wallet", headers=auth(init_data(ALICE)))
    assert response.status == 200 and (await response.json())["wallet"] is None


@pytest.mark.parametrize("case", ["domain", "signature", "old", "testnet", "state_init"])
async def test_a_bad_ton_proof_is_refused(client: TestClient, case: str) -> None:
    wallet, other = TestWallet(), TestWallet()
    payload = await _payload(client)
    account_ = wallet.account()
    proof = wallet.proof(payload, DOMAIN)
    if case == "domain":
        proof = wallet.proof(payload, "evil.example")
    elif case == "signature":
        proof["signature"] = other.proof(payload, DOMAIN)["signature"]
    elif case == "old":
        proof = wallet.proof(payload, DOMAIN, timestamp=int(time.time()) - 3600)
    elif case == "testnet":
        account_ = wallet.account(chain="-3")
    else:
        account_ = {**account_, "walletStateInit": other.state_init, "publicKey": None}
    response = await client.post(
        "/app/api/wallet",
        headers=auth(init_data(ALICE)),
        json={"account": account_, "proof": proof},
    )
    assert (await error_of(response, 400))["code"] == "proof_refused"
    me = await (await client.get("/app/api/me", headers=auth(init_data(ALICE)))).json()
    assert me["wallet"] is None


async def test_a_payout_wallet_is_for_providers(client: TestClient) -> None:
    wallet = TestWallet()
    payload = await _payload(client)
    body = {
        "purpose": "payout",
        "account": wallet.account(),
        "proof": wallet.proof(payload, DOMAIN),
    }
    response = await client.post("/app/api/wallet", headers=auth(init_data(ALICE)), json=body)
    assert (await error_of(response, 403))["code"] == "not_provider"


async def test_malformed_bodies_are_readable_errors(client: TestClient) -> None:
    headers = auth(init_data(ALICE))
    response = await client.post("/app/api/wallet", headers=headers, data=b"{nope")
    assert (await error_of(response, 400))["code"] == "invalid_json"
    response = await client.post("/app/api/wallet", headers=headers, json={"account": {}})
    error = await error_of(response, 400)
    assert error["code"] == "invalid_request" and "account" in error["message"]


# -------------------------------------------------------------------------- top-up


async def test_the_top_up_transaction_pays_the_deposit_wallet_with_the_memo(
    client: TestClient,
) -> None:
    me = await (await client.get("/app/api/me", headers=auth(init_data(ALICE)))).json()
    before = int(time.time())
    response = await client.post(
        "/app/api/topup", headers=auth(init_data(ALICE)), json={"amount": "1.5"}
    )
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["amount"] == "1500000000" and body["memo"] == me["deposit_memo"]
    tx = body["transaction"]
    assert set(tx) == {"validUntil", "messages"}  # mainnet: no network key, no nulls
    assert before + 300 <= tx["validUntil"] <= int(time.time()) + 300  # wallets warn past 5 min
    [message] = tx["messages"]
    assert message["address"] == friendly_address(DEPOSIT, bounceable=False)
    assert message["address"] == body["deposit_address"]
    assert message["amount"] == "1500000000"
    assert decode_comment(message["payload"]).memo == me["deposit_memo"]
    cell = Cell.one_from_boc(base64.b64decode(message["payload"])).begin_parse()
    assert cell.load_uint(32) == 0 and cell.load_snake_string() == me["deposit_memo"]


async def test_no_deposit_wallet_no_ton_top_ups(settings: Settings, db_url: str) -> None:
    bare = app_settings(settings, db_url, ton=TonSettings(), bot_token=None)
    async with TestClient(TestServer(create_app(bare))) as client:
        await client.app[appkeys.DATABASE].upgrade()
        # Without a bot token, initData cannot be checked at all: every call is refused.
        response = await client.get("/app/api/me", headers=auth(init_data(ALICE)))
        assert (await error_of(response, 401))["code"] == "init_data_invalid"
    bare = app_settings(settings, db_url, ton=TonSettings())
    async with TestClient(TestServer(create_app(bare))) as client:
        await client.app[appkeys.DATABASE].upgrade()
        me = await (await client.get("/app/api/me", headers=auth(init_data(ALICE)))).json()
        assert me["topup"]["ton"] is False
        response = await client.post(
            "/app/api/topup", headers=auth(init_data(ALICE)), json={"amount": "1"}
        )
        assert (await error_of(response, 503))["code"] == "topup_unavailable"


async def test_a_stars_invoice_comes_from_the_bot_api(settings: Settings, db_url: str) -> None:
    fake = FakeBotApi()
    async with _serve(fake) as url:
        configured = app_settings(settings, db_url, telegram_api_url=url, stars_nano_per_star=5)
        async with TestClient(TestServer(create_app(configured))) as client:
            await client.app[appkeys.DATABASE].upgrade()
            headers = auth(init_data(ALICE))
            response = await client.post("/app/api/stars", headers=headers, json={"stars": 100})
            assert response.status == 200, await response.text()
            assert await response.json() == {
                "invoice_url": "https://t.me/$testinvoice",
                "stars": 100,
                "amount": "500",
            }
            [(method, data)] = fake.calls
            assert method == "createInvoiceLink" and data["currency"] == "XTR"
            assert '"amount":100' in str(data["prices"]).replace(" ", "")
            user = await get_or_create_user(client.app[appkeys.DATABASE], ALICE)
            settings = client.app[appkeys.SETTINGS]
            # What the bot's handlers check, with the rate the page showed.
            assert data["payload"] == f"stars:{user.id}:100:{settings.stars_nano_per_star}"
            assert not data.get("provider_token")
            fake.fail = True
            response = await client.post("/app/api/stars", headers=headers, json={"stars": 100})
            assert (await error_of(response, 502))["code"] == "stars_failed"
            response = await client.post("/app/api/stars", headers=headers, json={"stars": 0})
            assert (await error_of(response, 400))["code"] == "invalid_request"


class _serve:
    """Serve a fake's aiohttp app on loopback: ``async with _serve(fake) as url``."""

    def __init__(self, fake: FakeBotApi) -> None:
        self.server = TestServer(fake.create_app())

    async def __aenter__(self) -> str:
        await self.server.start_server()
        return str(self.server.make_url("")).rstrip("/")

    async def __aexit__(self, *_exc: object) -> None:
        await self.server.close()


# ------------------------------------------------------------ history and provider


async def _provider_with_earnings(client: TestClient, telegram_id: int, earned: int) -> int:
    db = client.app[appkeys.DATABASE]
    ledger: Ledger = client.app[appkeys.LEDGER]
    provider = await get_or_create_user(db, telegram_id)
    await accounts.become_provider(db, provider.id)
    customer = await get_or_create_user(db, telegram_id + 1)
    await ledger.credit_deposit(customer.id, 2 * earned, f"dep:{telegram_id}")
    await ledger.hold(customer.id, earned, f"turn-{telegram_id}")
    usage = TurnUsage("smollm2-135m", 10, 0, 20, "stop", worker_id="w-abc", tee="dev")
    await ledger.settle(
        f"turn-{telegram_id}", earned, provider_id=provider.id, share_bps=10_000, usage=usage
    )
    await accounts.record_worker(
        db, "w-abc", WorkerState.ATTESTED, provider_id=provider.id, model="smollm2-135m", tee="dev"
    )
    return provider.id


async def test_history_pages_deposits_and_turns(client: TestClient, redis_url: str) -> None:
    await _provider_with_earnings(client, 7100, 3 * TON)
    customer = auth(init_data(7101))
    response = await client.get("/app/api/history", headers=customer)
    history = await response.json()
    assert [i["kind"] for i in history["items"]] == ["turn", "deposit"]
    turn, deposit = history["items"]
    assert turn["amount"] == str(-3 * TON) and turn["details"]["model"] == "smollm2-135m"
    assert turn["details"]["completion_tokens"] == 20
    assert deposit["amount"] == str(6 * TON) and deposit["details"]["source"] == "ton"
    assert history["has_more"] is False and history["page"] == 1
    only = await (await client.get("/app/api/history?kind=deposit", headers=customer)).json()
    assert [i["kind"] for i in only["items"]] == ["deposit"]
    response = await client.get("/app/api/history?page=0", headers=customer)
    assert (await error_of(response, 400))["code"] == "invalid_page"
    response = await client.get("/app/api/history?kind=bets", headers=customer)
    assert (await error_of(response, 400))["code"] == "invalid_page"


async def test_the_provider_dashboard_and_withdrawals(client: TestClient, redis_url: str) -> None:
    response = await client.get("/app/api/provider", headers=auth(init_data(ALICE)))
    assert (await error_of(response, 403))["code"] == "not_provider"

    await _provider_with_earnings(client, 7200, 3 * TON)
    headers = auth(init_data(7200))
    board = await (await client.get("/app/api/provider", headers=headers)).json()
    assert board["earnings"] == {
        "available": str(3 * TON),
        "pending": "0",
        "paid": "0",
        "earned": str(3 * TON),
        "jobs": 1,
    }
    [worker] = board["workers"]
    assert worker["worker_id"] == "w-abc" and worker["tee"] == "dev" and worker["jobs"] == 1
    assert worker["online"] is False and worker["earned"] == str(3 * TON)
    assert board["payout_wallet"] is None and board["min_withdrawal"] == str(TON)
    economics = board["economics"]  # no online time counted yet: no hourly rate to show
    assert (economics["per_hour"], economics["fee_bps"], economics["tokens"]) == (None, 2000, 30)
    assert economics["per_million_tokens"] == str(3 * TON * 1_000_000 // 30)
    assert economics["fees"] == "0"  # this turn was settled with the whole price to the provider
    assert economics["next_payout"]["kind"] == "ready"  # 3 GRAM available, 1 GRAM minimum

    withdraw = "/app/api/provider/withdraw"
    response = await client.post(withdraw, headers=headers, json={"amount": "1", "key": "k0000001"})
    assert (await error_of(response, 409))["code"] == "no_payout_wallet"

    wallet = TestWallet()
    payload = await _payload(client, 7200)
    body = {
        "purpose": "payout",
        "account": wallet.account(),
        "proof": wallet.proof(payload, DOMAIN),
    }
    assert (await client.post("/app/api/wallet", headers=headers, json=body)).status == 200

    response = await client.post(
        withdraw, headers=headers, json={"amount": "0.5", "key": "k0000002"}
    )
    error = await error_of(response, 400)
    assert error["code"] == "below_minimum" and "1 GRAM" in error["message"]
    response = await client.post(withdraw, headers=headers, json={"amount": "4", "key": "k0000003"})
    error = await error_of(response, 409)
    assert error["code"] == "insufficient_funds" and "3 GRAM" in error["message"]

    request = {"amount": "1.25", "key": "k0000004"}
    first = await (await client.post(withdraw, headers=headers, json=request)).json()
    again = await (await client.post(withdraw, headers=headers, json=request)).json()
    assert first == again  # one request, one payout
    assert first["amount"] == "1250000000" and first["state"] == "requested"
    assert first["destination"] == friendly_address(wallet.raw, bounceable=False)
    board = await (await client.get("/app/api/provider", headers=headers)).json()
    assert board["earnings"]["available"] == "1750000000"
    assert board["earnings"]["pending"] == "1250000000"
    everything = {"amount": "all", "key": "k0000005"}
    rest = await (await client.post(withdraw, headers=headers, json=everything)).json()
    assert rest["amount"] == "1750000000"


# ---------------------------------------------------------------- pages and manifest


async def test_the_manifest_and_its_icon(client: TestClient) -> None:
    manifest = await (await client.get("/tonconnect-manifest.json")).json()
    assert manifest == {
        "url": f"https://{DOMAIN}",
        "name": "Cocoon",
        "iconUrl": f"https://{DOMAIN}/app/static/icon.png",
    }
    icon = await (await client.get("/app/static/icon.png")).read()
    assert icon[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", icon[16:24]) == (180, 180)


@pytest.mark.parametrize(
    ("path", "lang", "words"),
    [
        ("/app", "en", "Top up with GRAM"),
        ("/app/history?lang=ru", "ru", "История"),
        ("/app/provider", "fr", "Fournisseur"),
        ("/app/chat", "ru", "Новый чат"),
    ],
)
async def test_pages_are_translated(
    client: TestClient, node_modules: None, path: str, lang: str, words: str
) -> None:
    response = await client.get(path, headers={"Accept-Language": f"{lang},en;q=0.5"})
    assert response.status == 200
    page = await response.text()
    assert f'<html lang="{lang}">' in page and words in page
    assert "/app/vendor/tonconnect/tonconnect-ui.min.js" in page


async def test_the_model_choice_is_kept(client: TestClient) -> None:
    headers = auth(init_data(ALICE))
    response = await client.post("/app/api/model", headers=headers, json={"model": "gpt-17"})
    assert (await error_of(response, 404))["code"] == "unknown_model"
    response = await client.post("/app/api/model", headers=headers, json={"model": "smollm2-135m"})
    assert (await response.json())["model"] == "smollm2-135m"


async def test_unknown_api_paths_and_methods_are_json_errors(client: TestClient) -> None:
    response = await client.get("/app/api/nothing", headers=auth(init_data(ALICE)))
    assert (await error_of(response, 404))["code"] == "not_found"
    response = await client.put("/app/api/me", headers=auth(init_data(ALICE)))
    assert (await error_of(response, 405))["code"] == "not_found"


# ---------------------------------------------------------------------------- chat


async def test_chat_refusals_are_json_errors(
    settings: Settings, db_url: str, redis_url: str
) -> None:
    configured = app_settings(settings, db_url, rate_limit_per_minute=3, max_prompt_chars=50)
    async with TestClient(TestServer(create_app(configured))) as client:
        await client.app[appkeys.DATABASE].upgrade()
        headers = auth(init_data(ALICE, language="ru"))
        chat = {
            "model": "smollm2-135m",
            "messages": [{"role": "user", "content": "Hello"}],
            "conversation": "c0nversation-1",
        }
        response = await client.post("/app/api/chat", headers=headers, json=chat)
        error = await error_of(response, 402)
        assert error["code"] == "insufficient_balance" and "GRAM" in error["message"]
        assert "баланс" in error["message"].lower()
        unknown = {**chat, "model": "gpt-17"}
        response = await client.post("/app/api/chat", headers=headers, json=unknown)
        assert (await error_of(response, 404))["code"] == "unknown_model"

        ledger: Ledger = client.app[appkeys.LEDGER]
        user = await get_or_create_user(client.app[appkeys.DATABASE], ALICE)
        await ledger.credit_deposit(user.id, TON, "dep:chat")
        response = await client.post("/app/api/chat", headers=headers, json=chat)
        assert (await error_of(response, 503))["code"] == "no_worker"
        assert (await ledger.balances(user.id)).available == TON  # the hold came back
        response = await client.post("/app/api/chat", headers=headers, json=chat)
        limited = await error_of(response, 429)
        assert limited["code"] == "rate_limited"
        assert 1 <= limited["details"]["retry_after"] <= 60  # the page says "wait N s"

        long = {**chat, "messages": [{"role": "user", "content": "x" * 51}]}
        response = await client.post("/app/api/chat", headers=headers, json=long)
        too_long = await error_of(response, 400)
        assert too_long["code"] == "message_too_long" and too_long["details"] == {"limit": 50}
