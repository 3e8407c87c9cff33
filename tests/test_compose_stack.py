"""The production stack for real: the images built and compose.yaml brought up in a real Docker
engine, driven from the host as Telegram, a wallet app, the TON network and an operator would.

Run by ``.ci/compose`` (which starts dockerd, builds the images and tears the stack down),
skipped elsewhere: ``COCOON_COMPOSE`` is the compose command line of the stack (compose.yaml +
deploy/compose.ci.yaml, profile cpu) and ``COCOON_COMPOSE_ENV`` its variables' file.

The stand-in Telegram Bot API server and the local TON Center run here, in this process, bound
to the compose network's gateway address (the containers' one way to the host). PostgreSQL is
read from its loopback port for the ledger audit only; everything else goes through the stack's
own doors: the webhook, the Mini App API, the chain, ``docker compose``.

The tests run in order and share the stack: each leaves it as the next expects.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from backend.db import Database
from backend.invariants import InvariantReport, check_invariants
from backend.ton.localnet import LocalTonCenter
from backend.ton.wallet import HotWallet
from miniapp.auth import init_data_for
from tests.support.fake_telegram import FakeTelegram
from tests.support.miniapp_helpers import TestWallet

COMPOSE = os.environ.get("COCOON_COMPOSE", "")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not COMPOSE, reason="run by .ci/compose (a Docker engine and the images)"),
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(900),
]

TON = 1_000_000_000
USER = 5_100_001
PROVIDER = 5_100_002
BOUND_S = 240.0
"""Upper bound on every wait for an event: reaching it fails the test."""
PROOF_DOMAIN = "cocoon.ci"


def variables() -> dict[str, str]:
    text = Path(os.environ["COCOON_COMPOSE_ENV"]).read_text()
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line)
    return {name: value for name, value in pairs if not name.startswith("#")}


async def wait_for(what: str, check: Callable[[], Awaitable[Any]]) -> Any:
    """``check()``'s first truthy result, polled; fails after ``BOUND_S``."""
    deadline = time.monotonic() + BOUND_S
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {BOUND_S:.0f} s")
        await asyncio.sleep(0.5)


def gateway_socket(host: str, port: int) -> socket.socket:
    """A listening socket on the network's gateway address, which exists only while the
    compose network does: IP_FREEBIND lets it be bound before, and keeps it through a
    `docker compose down` / `up`."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


class Stack:
    """The compose stack and what stands in for the world around it."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.web = f"http://127.0.0.1:{env['CI_WEB_PORT']}"
        self.telegram = FakeTelegram()
        self.hot = HotWallet.from_mnemonic(env["CI_HOT_WALLET_MNEMONIC"])
        self.net = LocalTonCenter()
        hot = self.hot
        self.net.add_wallet(
            hot.raw, hot.public_key, balance=1_000 * TON, subwallet_id=hot.subwallet_id
        )
        self.deposit_address = env["CI_DEPOSIT_ADDRESS"]
        self.db_url = (
            f"postgresql+asyncpg://cocoon:{env['POSTGRES_PASSWORD']}"
            f"@127.0.0.1:{env['CI_POSTGRES_PORT']}/cocoon"
        )
        self.worker_token = ""
        self.sent: list[str] = []  # the texts said to the bot, in order
        self._runners: list[web.AppRunner] = []
        self.http: aiohttp.ClientSession | None = None

    async def serve_the_world(self) -> None:
        gateway = self.env["CI_GATEWAY"]
        for app, port in (
            (self.telegram.app, self.env["CI_TELEGRAM_PORT"]),
            (self.net.create_app(), self.env["CI_TON_PORT"]),
        ):
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.SockSite(runner, gateway_socket(gateway, int(port))).start()
            self._runners.append(runner)
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()
        for runner in self._runners:
            await runner.cleanup()

    async def compose(self, *args: str, check: bool = True, stderr: bool = True) -> str:
        """``docker compose ARGS``'s output (standard output only with ``stderr=False``)."""
        extra = {"CI_WORKER_TOKEN": self.worker_token} if self.worker_token else {}
        process = await asyncio.create_subprocess_exec(
            *shlex.split(COMPOSE),
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT if stderr else asyncio.subprocess.DEVNULL,
            env={**os.environ, **extra},
        )
        async with asyncio.timeout(600):
            out, _ = await process.communicate()
        text = out.decode(errors="replace")
        if check:
            assert process.returncode == 0, f"docker compose {' '.join(args)}:\n{text[-4000:]}"
        return text

    async def up(self) -> None:
        """The operator's services, healthy (compose waits for the health checks); not "bot":
        web serves the bot (webhook mode), "bot" runs no replica."""
        await self.compose("up", "-d", "--wait", "postgres", "redis", "web", "watcher", "payouts")

    async def health(self) -> dict[str, str]:
        out = await self.compose("ps", "--all", "--format", "json")
        rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        return {row["Service"]: f"{row['State']}/{row.get('Health', '')}" for row in rows}

    # -- the doors ------------------------------------------------------------------------------

    async def update(self, update: dict[str, Any], secret: str | None = None) -> int:
        assert self.http is not None
        headers = {"X-Telegram-Bot-Api-Secret-Token": secret or self.env["CI_WEBHOOK_SECRET"]}
        async with self.http.post(
            f"{self.web}/telegram/webhook", json=update, headers=headers
        ) as response:
            return response.status

    def commands_sent(self, command: str) -> int:
        return sum(1 for text in self.sent if text.split(maxsplit=1)[:1] == [command])

    async def say(self, telegram_id: int, text: str) -> int:
        self.sent.append(text)
        update_id = int(time.time() * 1000) % 2_000_000_000
        return await self.update(
            {
                "update_id": update_id,
                "message": {
                    "message_id": update_id % 1_000_000,
                    "date": int(time.time()),
                    "chat": {"id": telegram_id, "type": "private", "first_name": "Ada"},
                    "from": {"id": telegram_id, "is_bot": False, "first_name": "Ada"},
                    "text": text,
                },
            }
        )

    async def app_api(
        self, method: str, path: str, telegram_id: int, body: Any = None
    ) -> tuple[int, Any]:
        assert self.http is not None
        data = init_data_for(telegram_id, self.env["CI_BOT_TOKEN"], first_name="Ada")
        async with self.http.request(
            method, f"{self.web}{path}", json=body, headers={"Authorization": f"tma {data}"}
        ) as response:
            return response.status, await response.json(content_type=None)

    async def me(self, telegram_id: int) -> dict[str, Any]:
        status, body = await self.app_api("GET", "/app/api/me", telegram_id)
        assert status == 200, body
        return dict(body)

    async def audit(self) -> InvariantReport:
        db = Database(self.db_url)
        try:
            return await check_invariants(db)
        finally:
            await db.close()

    async def workers_online(self) -> set[str]:
        """The ids of the provider's workers online now (none when web cannot be reached)."""
        try:
            status, board = await self.app_api("GET", "/app/api/provider", PROVIDER)
        except aiohttp.ClientError:
            return set()
        if status != 200:
            return set()
        return {worker["worker_id"] for worker in board["workers"] if worker["online"]}

    async def worker_online(self) -> bool:
        return bool(await self.workers_online())

    async def add_worker(self) -> None:
        """What a provider with a fleet (or a container that restarts) does: `/addworker
        reusable` gives a reusable enrollment token; the worker runs with it, and each new
        container attests again with the same token."""
        text = await self.reply_to_command(PROVIDER, "/addworker reusable smollm2-135m")
        match = re.search(r"--token (cce_[\w-]+)", text)
        assert match, text
        self.worker_token = match[1]

    async def reply_to_command(self, telegram_id: int, command: str) -> str:
        """Send a command; the text of the bot's first message in answer."""
        start = len(self.telegram.calls)
        assert await self.say(telegram_id, command) == 200

        async def answer() -> str | None:
            for method, params in self.telegram.calls[start:]:
                if method == "sendMessage" and str(params.get("chat_id")) == str(telegram_id):
                    return str(params.get("text", ""))
            return None

        text: str = await wait_for(f"an answer to {command}", answer)
        return text

    async def turn(self, telegram_id: int, text: str) -> str:
        """Say ``text`` and wait for the turn to end: "charged" (a reply, billed) or
        "refunded" (an answer, nothing billed, nothing held)."""
        before = int((await self.me(telegram_id))["balance"]["available"])
        start = len(self.telegram.calls)
        assert await self.say(telegram_id, text) == 200
        replies = {"sendMessage", "editMessageText"}

        async def ended() -> str | None:
            if not replies & {method for method, _ in self.telegram.calls[start:]}:
                return None
            balance = (await self.me(telegram_id))["balance"]
            if balance["held"] != "0":
                return None
            return "charged" if int(balance["available"]) < before else "refunded"

        outcome: str = await wait_for("the turn's end", ended)
        return outcome

    async def reply_to(self, telegram_id: int, text: str) -> list[tuple[str, dict[str, Any]]]:
        """Say ``text``: a reply, charged; the Bot API calls made since."""
        start = len(self.telegram.calls)
        assert await self.turn(telegram_id, text) == "charged"
        return self.telegram.calls[start:]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[Stack]:
    stack = Stack(variables())
    await stack.serve_the_world()
    try:
        await stack.up()
        await stack.reply_to_command(PROVIDER, "/provider")
        await stack.add_worker()
        await stack.compose("up", "-d", "worker-cpu")
        yield stack
    finally:
        await stack.close()


async def test_every_service_is_up_and_healthy_and_logs_json(stack: Stack) -> None:
    health = await stack.health()
    for name in ("postgres", "redis", "web"):
        assert health[name] == "running/healthy", health
    for name in ("watcher", "payouts", "worker-cpu"):
        assert health[name].startswith("running"), health
    assert "bot" not in health  # no replica
    await wait_for("the CPU worker online", stack.worker_online)
    # Every process of ours writes one JSON object per line.
    for name in ("web", "watcher", "payouts", "worker-cpu"):
        out = await stack.compose("logs", "--no-log-prefix", "--no-color", name)
        lines = [line for line in out.splitlines() if line.strip()]
        assert lines, name
        for line in lines:
            assert isinstance(json.loads(line), dict), f"{name}: {line}"


async def test_the_mini_app_page_loads_ton_connect(stack: Stack) -> None:
    assert stack.http is not None
    async with stack.http.get(f"{stack.web}/app/") as response:
        assert response.status == 200
        page = await response.text()
    # The page's configuration names the TON Connect UI it loads: served by cocoon web itself
    # from the image's npm packages (not a CDN), with the manifest wallets read.
    raw = page.split('<script id="cocoon-config" type="application/json">', 1)[1]
    config = json.loads(raw.split("</script>", 1)[0])
    assert config["tonconnect"] is True, config
    url = str(config["tonconnectUrl"])
    assert url.startswith("/app/vendor/"), url
    async with stack.http.get(f"{stack.web}{url}") as response:
        assert response.status == 200
        script = await response.text()
    assert "TonConnectUI" in script and len(script) > 100_000
    async with stack.http.get(f"{stack.web}/tonconnect-manifest.json") as response:
        assert response.status == 200
        assert (await response.json())["url"]


async def test_a_deposit_is_credited_once(stack: Stack) -> None:
    assert await stack.say(USER, "/start") == 200
    memo = (await stack.me(USER))["deposit_memo"]
    stack.net.add_incoming(stack.deposit_address, 2 * TON, comment=memo)

    async def credited() -> bool:
        return (await stack.me(USER))["balance"]["available"] == str(2 * TON)

    await wait_for("the deposit credited", credited)
    requests = stack.net.requests
    await wait_for("more polls", lambda: asyncio.sleep(0, stack.net.requests > requests + 4))
    assert (await stack.me(USER))["balance"]["available"] == str(2 * TON)  # once
    report = await stack.audit()
    assert report.ok and report.deposits_credited == 1, str(report)


async def test_a_telegram_message_gets_a_streamed_charged_reply(stack: Stack) -> None:
    refused = await stack.update({"update_id": 1, "message": {}}, secret="wrong-secret")
    assert refused in (401, 403)
    before = int((await stack.me(USER))["balance"]["available"])
    calls = await stack.reply_to(USER, "Say hello in three words.")
    methods = [method for method, _ in calls]
    assert {"sendMessageDraft", "editMessageText"} & set(methods), methods  # streamed
    after = int((await stack.me(USER))["balance"]["available"])
    assert 0 < before - after, "the turn was charged"
    report = await stack.audit()
    assert report.ok and report.holds_open == 0, str(report)


async def test_a_provider_payout_goes_through(stack: Stack) -> None:
    status, board = await stack.app_api("GET", "/app/api/provider", PROVIDER)
    assert status == 200 and int(board["earnings"]["available"]) > 0, board
    wallet = TestWallet()  # the provider's wallet app, on testnet like the stack
    status, payload = await stack.app_api("POST", "/app/api/wallet/payload", PROVIDER)
    assert status == 200, payload
    proof = wallet.proof(payload["payload"], PROOF_DOMAIN)
    body = {"purpose": "payout", "account": wallet.account(chain="-3"), "proof": proof}
    status, linked = await stack.app_api("POST", "/app/api/wallet", PROVIDER, body)
    assert status == 200, linked
    request = {"amount": "all", "key": "ci-payout-1"}
    status, payout = await stack.app_api("POST", "/app/api/provider/withdraw", PROVIDER, request)
    assert status == 200, payout
    amount = int(payout["amount"])

    def sent() -> list[int]:
        return [
            int(out["value"])
            for tx in stack.net.transactions_of(stack.hot.raw)
            for out in tx["out_msgs"]
            if out["destination"].upper() == wallet.raw.upper()
        ]

    await wait_for("the payout on chain", lambda: asyncio.sleep(0, sent()))

    async def confirmed() -> bool:
        _status, board = await stack.app_api("GET", "/app/api/provider", PROVIDER)
        return int(board["earnings"]["paid"]) == amount

    await wait_for("the payout confirmed", confirmed)
    assert sent() == [amount]  # once
    report = await stack.audit()
    assert report.ok and report.payouts_confirmed == 1, str(report)


async def balances(stack: Stack) -> tuple[dict[str, Any], dict[str, Any]]:
    user = (await stack.me(USER))["balance"]
    _status, board = await stack.app_api("GET", "/app/api/provider", PROVIDER)
    return user, board["earnings"]


async def test_a_redis_restart_loses_nothing_and_the_worker_comes_back(stack: Stack) -> None:
    before = await balances(stack)
    await stack.compose("restart", "redis")
    await stack.compose("up", "-d", "--wait", "redis")
    await wait_for("the CPU worker online again", stack.worker_online)
    assert await balances(stack) == before
    # The first turn after the restart may meet a connection Redis closed (web's pool): then
    # the user is told and nothing is billed or held. Asked again, it is served.
    if await stack.turn(USER, "One more word.") == "refunded":
        assert await balances(stack) == before
        await stack.reply_to(USER, "One more word.")
    assert int((await stack.me(USER))["balance"]["available"]) < int(before[0]["available"])
    assert (await stack.audit()).ok


async def test_down_and_up_keep_every_account_and_the_worker_comes_back(stack: Stack) -> None:
    first = await wait_for("the CPU worker online", stack.workers_online)
    before = await balances(stack)
    report = await stack.audit()
    await stack.compose("down")  # volumes kept
    assert not [s for s, state in (await stack.health()).items() if state.startswith("running")]
    await stack.up()
    # A worker's keys and renewal token live in its process only: the new container is a new
    # worker. It attests on its own with the provider's reusable enrollment token, the one
    # its first container used: no new /addworker.
    token, addworker_calls = stack.worker_token, stack.commands_sent("/addworker")
    await stack.compose("up", "-d", "worker-cpu")

    async def new_worker_online() -> set[str]:  # the old one may still look online a while
        return await stack.workers_online() - first

    # a new worker (new keys) online, for the same provider
    await wait_for("the CPU worker online again, as a new worker", new_worker_online)
    assert stack.worker_token == token and stack.commands_sent("/addworker") == addworker_calls
    assert await balances(stack) == before
    again = await stack.audit()
    assert again.ok and again.deposits_credited == report.deposits_credited == 1
    assert again.payouts_confirmed == 1
    await stack.reply_to(USER, "Last word.")
    assert (await stack.audit()).ok
