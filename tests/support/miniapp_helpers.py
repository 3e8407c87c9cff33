"""Helpers of the Mini App tests: signed Telegram initData, a TON Connect wallet that signs
ton_proof and transfers in Python, a fake Telegram Bot API on loopback, and the
settings of ``cocoon web`` for these tests."""

from __future__ import annotations

import base64
import json
import os
import time
from typing import Any

from aiohttp import web
from nacl.signing import SigningKey
from pydantic import SecretStr

from backend.settings import Settings, TonSettings
from backend.ton.proof import proof_message
from backend.ton.wallet import HotWallet
from miniapp.auth import init_data_for, sign_init_data

BOT_TOKEN = "123456789:AAtest-token-of-the-cocoon-test-bot"
OTHER_BOT_TOKEN = "987654321:AAanother-bot-entirely"
DEPOSIT = "0:" + "D1" * 32
DOMAIN = "cocoon.example"
TON = 1_000_000_000


def init_data(
    telegram_id: int,
    *,
    token: str = BOT_TOKEN,
    language: str = "en",
    auth_date: int | None = None,
) -> str:
    return init_data_for(
        telegram_id, token, first_name="Ada", language_code=language, auth_date=auth_date
    )


def app_settings(settings: Settings, db_url: str, **changes: object) -> Settings:
    """The test settings for ``cocoon web``: this database, the test bot, a deposit wallet and
    ``DOMAIN`` as the public URL and the ton_proof domain."""
    values: dict[str, object] = {
        "database_url": db_url,
        "bot_token": SecretStr(BOT_TOKEN),
        "public_url": f"https://{DOMAIN}",
        "ton": TonSettings(deposit_address=DEPOSIT, proof_domains=[DOMAIN]),
    }
    values.update(changes)
    return settings.model_copy(update=values)


def forged_init_data(telegram_id: int, victim_id: int) -> str:
    """initData signed for ``telegram_id`` with the user field then changed to the victim."""
    from urllib.parse import parse_qsl, urlencode

    fields = dict(parse_qsl(init_data(telegram_id)))
    user = json.loads(fields["user"])
    user["id"] = victim_id
    fields["user"] = json.dumps(user, separators=(",", ":"))
    return urlencode(fields)


def auth(data: str) -> dict[str, str]:
    return {"Authorization": f"tma {data}"}


class TestWallet:
    """A user's wallet app (wallet v4r2): signs ton_proof and transfers with its own key."""

    __test__ = False  # not a test class, for pytest

    def __init__(self) -> None:
        self.seed = os.urandom(32)
        self.key = SigningKey(self.seed)
        self.wallet = HotWallet(self.seed)
        self.raw = self.wallet.raw
        self.public_key = bytes(self.key.verify_key)
        self.state_init = base64.b64encode(self.wallet.state_init.serialize().to_boc()).decode()

    def account(self, chain: str = "-239") -> dict[str, Any]:
        """``wallet.account`` as TON Connect gives it to the page."""
        return {
            "address": self.raw.lower(),
            "chain": chain,
            "walletStateInit": self.state_init,
            "publicKey": self.public_key.hex(),
        }

    def proof(self, payload: str, domain: str, timestamp: int | None = None) -> dict[str, Any]:
        timestamp = int(time.time()) if timestamp is None else timestamp
        digest = proof_message(self.raw, domain, timestamp, payload)
        return {
            "timestamp": timestamp,
            "domain": {"lengthBytes": len(domain.encode()), "value": domain},
            "signature": base64.b64encode(self.key.sign(digest).signature).decode(),
            "payload": payload,
        }


class FakeBotApi:
    """A Telegram Bot API server on loopback answering ``createInvoiceLink``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail = False

    def create_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/bot{token}/{method}", self._method)
        return app

    async def _method(self, request: web.Request) -> web.Response:
        data = dict(await request.post())
        self.calls.append((request.match_info["method"], data))
        if self.fail:
            return web.json_response(
                {"ok": False, "error_code": 400, "description": "Bad Request: test failure"},
                status=400,
            )
        if request.match_info["method"] == "createInvoiceLink":
            return web.json_response({"ok": True, "result": "https://t.me/$testinvoice"})
        return web.json_response({"ok": False, "error_code": 404, "description": "Not Found"})


__all__ = [
    "BOT_TOKEN",
    "DEPOSIT",
    "DOMAIN",
    "OTHER_BOT_TOKEN",
    "TON",
    "FakeBotApi",
    "TestWallet",
    "app_settings",
    "auth",
    "forged_init_data",
    "init_data",
    "sign_init_data",
]
