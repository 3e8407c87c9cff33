"""A Cocoon network as ``cocoon up`` runs it, for the rogue-worker suite
(``tests/test_rogue_workers.py``) and its long form (``bench/rogue.py``).

``cocoon web`` (:func:`backend.web.create_app`: the OpenAI-compatible API, the onboarding API,
the dispatcher, the sweeper) on loopback, over a real Redis and a SQLite ledger; an honest
worker node (``python -m workers.node``, the instant engine) onboarded through the onboarding
HTTP API with a one-time token and development-TEE evidence, exactly as ``cocoon up`` starts
its worker, holding its own Redis ACL user; and rogue workers onboarded the same way
(:meth:`Network.rogue`, ``tests/support/rogue.py``). Users talk to it through
``/v1/chat/completions`` with an API key.

The policy file allow-lists the real TDX quote's image (``tests/support/attest.py``) and the
weights of one model (``attest.MODEL``); the workers serve ``SERVED``, which it does not list,
so development workers without a weights file pass. The quote's recorded collateral is cached
and the verifier's clock set inside its window, so TDX evidence is decided in full.

Which worker a turn goes to is the dispatcher's choice; :meth:`Network.route` sets what a
conversation's previous turn would have set (the route to a worker), so that a test can send a
turn to the rogue, or to the honest worker, and still go through dispatch (health, attestation,
capacity and slot reservation all apply; a full or missing worker is passed over).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from sqlalchemy import select

from backend import appkeys
from backend.apikeys import create_key
from backend.attestation import acl, onboarding, store
from backend.db import Database
from backend.dispatch import Dispatcher
from backend.invariants import InvariantReport, check_invariants
from backend.ledger import Ledger
from backend.models import Hold, HoldState, WorkerFlag
from backend.openai_api.service import conversation_id_for
from backend.serverkeys import route_id, route_secret
from backend.settings import DEFAULT_MODEL, AttestationSettings, Settings
from backend.users import get_or_create_user
from backend.web import create_app
from tests.support import attest
from tests.support.redis_server import start_node, stop_process
from tests.support.rogue import RogueWorker
from workers import evidence as ev
from workers import registry
from workers.wire import ChatMessage, WorkerKeys

SERVED = DEFAULT_MODEL  # what the workers serve (the instant engine, under the default model's id)
TON = 1_000_000_000


@dataclass
class Reply:
    """What the API answered one chat completion."""

    status: int
    body: dict[str, Any]

    @property
    def text(self) -> str:
        return str(self.body["choices"][0]["message"]["content"])

    @property
    def worker(self) -> str | None:
        """The id of the worker that served it (None: it was not served)."""
        if self.status != 200:
            return None
        return "w-" + self.body["cocoon"]["worker"]["key_fingerprint"]

    @property
    def cost(self) -> int:
        return int(self.body["cocoon"]["cost_nanoton"])

    @property
    def error(self) -> str | None:
        return self.body.get("error", {}).get("code") if self.status != 200 else None


@dataclass
class Streamed:
    """What the API streamed of one chat completion (``stream: true``)."""

    texts: list[str] = field(default_factory=list)
    error: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def add(self, event: dict[str, Any]) -> str | None:
        """Take in one event; its text, if it carries some."""
        if "error" in event:
            self.error = event["error"]
        elif event.get("usage"):
            self.usage = event
        else:
            text = event["choices"][0]["delta"].get("content")
            if text:
                self.texts.append(text)
                return str(text)
        return None


@dataclass
class Network:
    settings: Settings
    server: TestServer
    admin: aioredis.Redis
    db: Database
    ledger: Ledger
    session: aiohttp.ClientSession
    user_id: int
    api_key: str
    honest_provider: int
    rogue_provider: int
    node_log: Path
    node: Any = None  # the honest node's process
    honest_id: str = ""
    rogues: list[RogueWorker] = field(default_factory=list)

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    @property
    def dispatcher(self) -> Dispatcher:
        return self.server.app[appkeys.DISPATCHER]

    # -- workers --------------------------------------------------------------------------------

    async def token(self, provider_id: int | None = None) -> str:
        """A provider's one-time registration token (``cocoon provider token``)."""
        return await store.issue_registration_token(self.admin, provider_id, 600)

    async def rogue(
        self, *, model: str = SERVED, capacity: int = 4, advertise: bool = True, **claims: Any
    ) -> RogueWorker:
        """A worker onboarded through the API with development-TEE evidence claiming the
        instant engine's claims changed by ``claims``, its own Redis user in hand, its provider
        :attr:`rogue_provider`; with ``advertise``, in dispatch (claiming ``capacity``)."""
        token = await self.token(self.rogue_provider)
        rogue = await RogueWorker.onboard(
            self.url,
            token,
            model=model,
            capacity=capacity,
            claims=claims or None,
            advertise=advertise,
        )
        self.rogues.append(rogue)
        if advertise:
            await self.dispatcher.workers.refresh()
        return rogue

    async def attempt(self, evidence: Any) -> tuple[int, dict[str, Any]]:
        """Onboard with evidence of any kind (``evidence(nonce)`` builds it), as a modified
        node may send it: (HTTP status, body)."""
        token = await self.token(self.rogue_provider)
        async with self.session.post(f"{self.url}/v1/workers/nonce", json={"token": token}) as r:
            nonce = (await r.json())["nonce"]
        payload = {"token": token, "evidence": evidence(nonce).model_dump(mode="json")}
        async with self.session.post(f"{self.url}/v1/workers/register", json=payload) as r:
            return r.status, await r.json()

    async def indexed(self) -> list[str]:
        return sorted(m.decode() for m in await self.admin.zrange(registry.INDEX_KEY, 0, -1))

    # -- turns ----------------------------------------------------------------------------------

    async def route(self, text: str, worker_id: str) -> None:
        """Send the next turns that open with ``text`` to ``worker_id`` while it has room."""
        messages = [ChatMessage(role="user", content=text)]
        conversation = conversation_id_for(self.user_id, messages)
        route = route_id(route_secret(self.settings), conversation)  # as the dispatcher names it
        await registry.remember_route(self.admin, route, worker_id, 600)

    def _request(
        self, text: str, max_tokens: int | None, stream: bool, api_key: str | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": SERVED,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens,
        }
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        return {
            "url": f"{self.url}/v1/chat/completions",
            "json": body,
            "headers": {"Authorization": f"Bearer {api_key or self.api_key}"},
        }

    async def chat(
        self,
        text: str,
        *,
        max_tokens: int | None = 8,
        to: str | None = None,
        api_key: str | None = None,
    ) -> Reply:
        """One chat completion (``max_tokens`` None: the default; ``api_key``: another user's
        than :attr:`user_id`'s); ``to``: route it to that worker first."""
        if to is not None:
            await self.route(text, to)
        request = self._request(text, max_tokens, False, api_key)
        async with self.session.post(**request) as reply:
            return Reply(reply.status, await reply.json(content_type=None))

    async def stream(
        self, text: str, *, max_tokens: int = 8, to: str | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """The events of one streamed chat completion as they arrive (``data:`` objects)."""
        if to is not None:
            await self.route(text, to)
        async with self.session.post(**self._request(text, max_tokens, True)) as reply:
            assert reply.status == 200, await reply.text()
            async for line in reply.content:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                yield json.loads(line[len(b"data: ") :])

    async def streamed(self, text: str, *, max_tokens: int = 8, to: str | None = None) -> Streamed:
        """All of one streamed chat completion."""
        seen = Streamed()
        async for event in self.stream(text, max_tokens=max_tokens, to=to):
            seen.add(event)
        return seen

    async def honest_turn(self, words: int = 4) -> Reply:
        """A turn routed to the honest worker: it must be served by it, its words echoed."""
        text = " ".join(f"w{uuid.uuid4().hex[:6]}" for _ in range(words))
        reply = await self.chat(text, to=self.honest_id)
        assert reply.status == 200, reply.body
        assert reply.worker == self.honest_id and reply.text == text, reply.body
        return reply

    # -- money ----------------------------------------------------------------------------------

    async def user(self, telegram_id: int, balance: int = 10 * TON) -> tuple[int, str]:
        """Another funded user: (user id, API key)."""
        user = await get_or_create_user(self.db, telegram_id)
        await self.ledger.credit_deposit(user.id, balance, f"dep:{telegram_id}")
        key, _row = await create_key(self.db, user.id)
        return user.id, key

    async def available(self, user_id: int | None = None) -> int:
        return (await self.ledger.balances(user_id or self.user_id)).available

    async def flags(self) -> set[tuple[str, str]]:
        """(worker id, kind) of every bound a worker crossed."""
        async with self.db.session() as session:
            return {(f.worker_id, f.kind) for f in await session.scalars(select(WorkerFlag))}

    async def audit(self, timeout_s: float = 60.0) -> InvariantReport:
        """The ledger audit (``backend/invariants.py``) once every turn has settled (a turn
        whose client left settles in the background): an upper bound, not a pause."""
        deadline = time.monotonic() + timeout_s
        while True:
            async with self.db.session() as session:
                open_holds = await session.scalar(
                    select(Hold.id).where(Hold.state == HoldState.OPEN).limit(1)
                )
            if open_holds is None or time.monotonic() > deadline:
                return await check_invariants(self.db)
            await asyncio.sleep(0.05)


def policy_file(directory: Path) -> Path:
    """The operator's allow-list: the real quote's image, ``attest.MODEL``'s weights."""
    path = directory / "policy.json"
    policy = {"tcb_statuses": ["UpToDate"], "images": [attest.image()], "models": attest.MODELS}
    path.write_text(json.dumps(policy))
    return path


def network_settings(settings: Settings, workdir: Path, *, capacity: int) -> Settings:
    """``settings`` (its Redis URL and data directory) as ``cocoon up`` runs: the development
    TEE allowed, the policy file of :func:`policy_file`, jobs at once per worker ``capacity``
    (``cocoon up``'s 64 by default), and Redis restarts noticed within 0.2 s."""
    workdir.mkdir(parents=True, exist_ok=True)
    price = settings.models[DEFAULT_MODEL]
    attestation = AttestationSettings(
        allow_dev=True,
        policy_file=policy_file(workdir),
        collateral_dir=workdir / "collateral",
        pccs_url="http://127.0.0.1:9",  # nothing listens: the recorded collateral is cached
        default_capacity=capacity,
        users_check_s=0.2,
    )
    return settings.model_copy(
        update={
            "attestation": attestation,
            "models": {SERVED: price, attest.MODEL: price},
            # The attacks drive many turns of one user: no 429 from the API's limits.
            "rate_limit_per_minute": 100_000,
            "api_rate_limit_per_key_per_minute": 100_000,
            "api_max_concurrent_per_key": 1_000,
            "api_max_concurrent_per_user": 1_000,
        }
    )


def tdx_evidence(keys: WorkerKeys, nonce: str, **claims: Any) -> ev.Evidence:
    """TDX evidence as a modified node could send it: the real quote (taken for other claims),
    with the claims of ``attest.claims_for`` changed by ``claims``."""
    return ev.Evidence(
        tee="tdx",
        claims=attest.claims_for(keys, nonce, **claims),
        quote=base64.b64encode(attest.QUOTE).decode(),
    )


@contextlib.asynccontextmanager
async def network(
    settings: Settings, workdir: Path, *, capacity: int = 64
) -> AsyncIterator[Network]:
    """The network of the module doc on ``settings.redis_url``, with an honest node serving."""
    s = network_settings(settings, workdir, capacity=capacity)
    # The test's own client: a Redis restart costs it a reconnection, not an error.
    admin = aioredis.Redis.from_url(s.redis_url, retry_on_error=[redis.ConnectionError])
    users_before = set(await acl.worker_users(admin))
    db = Database.from_settings(s)
    await db.upgrade()
    ledger = Ledger(db)
    user = await get_or_create_user(db, 9001)
    await ledger.credit_deposit(user.id, 10 * TON, "dep:9001")
    honest_provider = (await get_or_create_user(db, 9002)).id
    rogue_provider = (await get_or_create_user(db, 9003)).id
    key, _row = await create_key(db, user.id)
    server = TestServer(create_app(s))
    await server.start_server()
    # The quote's recorded collateral, cached; it is valid in July 2025: the verifier decides
    # at that time.
    verifier = server.app[onboarding.ONBOARDING].verifier
    verifier.collateral.store(verifier.collateral.cache_key(attest.QUOTE), attest.COLLATERAL)
    verifier.clock = lambda: attest.AT
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300))
    net = Network(
        s, server, admin, db, ledger, session, user.id, key, honest_provider, rogue_provider,
        workdir / "node.log",
    )  # fmt: skip
    try:
        token = await net.token(honest_provider)
        net.node = start_node(net.url, token, net.node_log, model=SERVED)
        net.honest_id = await _attested(net)
        await net.dispatcher.workers.refresh()
        yield net
    finally:
        for rogue in net.rogues:
            await rogue.close()
        if net.node is not None:
            stop_process(net.node)
        await session.close()
        await server.close()
        with contextlib.suppress(Exception):  # a Redis of the test's own may be stopped
            for worker_id in set(await acl.worker_users(admin)) - users_before:
                await acl.delete_worker_user(admin, worker_id)
        await admin.aclose()
        await db.close()


async def _attested(net: Network, timeout_s: float = 60.0) -> str:
    """The honest node's id once the backend attested it and its entry is up."""
    deadline = time.monotonic() + timeout_s
    while True:
        workers = [w for w in await registry.list_workers(net.admin, SERVED) if w.attested]
        if workers:
            return workers[0].worker_id
        assert net.node.poll() is None, net.node_log.read_text()
        assert time.monotonic() < deadline, net.node_log.read_text()
        await asyncio.sleep(0.1)
