"""The rogue-worker suite (issue 12, item 8): a provider we do not know tries each attack with
what it really gets, and each attack fails.

The network is ``cocoon up``'s (``tests/support/network.py``): ``cocoon web`` on loopback, real
Redis with the real worker ACL, a SQLite ledger, an honest worker node (a process, the instant
engine) onboarded through the onboarding HTTP API with development-TEE evidence. Each rogue is
onboarded the same way (``tests/support/rogue.py``): it holds its own Redis ACL user and its
real keys, and writes valid, signed records whose contents lie, or sends the commands a
modified node could send. Users talk to the network through the OpenAI-compatible API.

After every attack the honest worker still serves turns (during it too, where the attack takes
time), and the ledger audit (``backend/invariants.py``) is clean. What each attack did before
issue 12 and does now, with figures: ``python -m bench.rogue`` (the long form).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from redis.exceptions import NoPermissionError, RedisError

from backend.bounds import (
    COMPLETION_SLACK_TOKENS,
    ReplyBounds,
    delivered_floor,
    prompt_token_bound,
)
from backend.pricing import turn_cost
from backend.settings import Settings
from tests.support import attest
from tests.support.network import SERVED, Network, Reply, Streamed, network, tdx_evidence
from tests.support.redis_server import RedisServer
from tests.support.rogue import RogueJob, RogueWorker
from workers import registry
from workers.evidence import AttestationRefused
from workers.wire import ChatMessage, WorkerKeys

pytestmark = pytest.mark.slow  # cocoon web, a worker node process, a Redis restart

OFF_MACHINE = "http://203.0.113.7:8000"  # TEST-NET-3: an address outside this machine


@pytest.fixture
async def net(settings: Settings, redis_url: str, tmp_path: Path) -> AsyncIterator[Network]:
    async with network(settings, tmp_path / "net") as n:
        yield n


async def serves_on(net: Network) -> None:
    """After an attack: the honest worker serves a turn, and the ledger audit is clean."""
    await net.honest_turn()
    report = await net.audit()
    assert report.ok, str(report)


def cost(net: Network, prompt: int, completion: int) -> int:
    price = net.settings.models[SERVED]
    return turn_cost(
        price, prompt_tokens=prompt, cached_prompt_tokens=0, completion_tokens=completion
    )


# -- the reply path: what it bills, how much, how long ---------------------------------------------


async def test_inflated_counts_are_billed_at_the_bound_and_the_worker_flagged(
    net: Network,
) -> None:
    """Before: a one-token reply billed as 10,000,000 prompt tokens of a 2,048-token model and
    the whole reply budget, capped only by the hold; 80 % went to the provider."""
    rogue = await net.rogue()
    await net.honest_turn()
    before = await net.available()
    text = "Say hi"
    asking = asyncio.create_task(net.chat(text, max_tokens=512, to=rogue.worker_id))
    job = await rogue.take()
    await rogue.chunk(job, "Hi!")
    await rogue.final(job, prompt_tokens=10_000_000, completion_tokens=512)
    reply = await asking

    assert reply.status == 200 and reply.worker == rogue.worker_id and reply.text == "Hi!"
    prompt = prompt_token_bound([ChatMessage(role="user", content=text)])
    completion = len(b"Hi!") + COMPLETION_SLACK_TOKENS
    usage = reply.body["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (prompt, completion)
    assert reply.cost == cost(net, prompt, completion) < cost(net, 2048, 512)
    assert before - await net.available() == reply.cost
    share = reply.cost * net.settings.provider_share_bps // 10_000
    assert (await net.ledger.balances(net.rogue_provider)).earned == share
    assert await net.flags() == {
        (rogue.worker_id, "prompt_tokens"),
        (rogue.worker_id, "completion_tokens"),
    }
    await serves_on(net)


async def test_an_oversized_reply_is_cut_off_unread_and_costs_nothing(net: Network) -> None:
    """Before: a ``max_tokens: 1`` request returned 300 MB and grew the web server by 1 GB."""
    rogue = await net.rogue()
    before = await net.available()
    asking = asyncio.create_task(net.chat("One word please", max_tokens=1, to=rogue.worker_id))
    job = await rogue.take()
    await rogue.oversized_chunk(job, 32 * 1024 * 1024)
    await rogue.final(job, prompt_tokens=5, completion_tokens=1)
    reply = await asking

    assert reply.status == 502 and reply.error == "worker_misbehaved", reply.body
    assert "chunk_bytes" in reply.body["error"]["message"]
    assert await net.available() == before  # nothing was delivered: nothing is charged
    assert await rogue.cancel_requested(job)  # its job was told to stop
    assert await net.flags() == {(rogue.worker_id, "chunk_bytes")}
    await serves_on(net)


async def test_an_endless_reply_is_cut_off_at_its_bound_while_the_honest_worker_serves(
    net: Network,
) -> None:
    rogue = await net.rogue()
    before = await net.available()
    bounds = ReplyBounds.for_max_tokens(16)
    asking = asyncio.create_task(net.streamed("Count for ever", max_tokens=16, to=rogue.worker_id))
    job = await rogue.take()
    await rogue.chunk(job, "1")
    honest = await net.honest_turn()  # while the rogue's reply goes on
    written = 1
    while not await rogue.cancel_requested(job):  # for ever: until the backend says stop
        await rogue.chunk(job, " 1")
        written += 1
        assert written < 100 * bounds.chunks, "the reply was never cut off"
    seen: Streamed = await asking

    assert seen.error is not None and seen.error["code"] == "worker_misbehaved", seen
    assert len(seen.texts) <= bounds.chunks and seen.usage is None
    delivered = len(seen.text.encode())
    charged = before - await net.available() - honest.cost
    assert charged == cost(net, 0, delivered_floor(delivered, 16))
    assert await net.flags() == {(rogue.worker_id, "chunks")}
    await serves_on(net)


async def told_to_stop(rogue: RogueWorker, job: RogueJob) -> None:
    """Wait until the backend asked the rogue's job to stop."""
    deadline = time.monotonic() + 60
    while not await rogue.cancel_requested(job):
        assert time.monotonic() < deadline, "the job was never told to stop"
        await asyncio.sleep(0.05)


async def test_a_chunk_skipped_in_a_stream_ends_the_turn_billed_for_what_arrived(
    net: Network,
) -> None:
    """A worker that skips a chunk number (a lost token, or text kept back) does not get a
    reply with a silent hole: the turn ends with ``worker_misbehaved``, the user pays for the
    text that arrived in order, and the worker is flagged."""
    rogue = await net.rogue()
    before = await net.available()
    asking = asyncio.create_task(net.streamed("Say hello world", max_tokens=16, to=rogue.worker_id))
    job = await rogue.take()
    await rogue.chunk(job, "Hello")
    await rogue.chunk(job, " world", seq=2)  # chunk 1 never comes
    await told_to_stop(rogue, job)
    await rogue.final(job, prompt_tokens=5, completion_tokens=3)
    seen: Streamed = await asking

    assert seen.error is not None and seen.error["code"] == "worker_misbehaved", seen
    assert "chunk 2 where chunk 1 was due" in seen.error["message"]
    assert seen.text == "Hello" and seen.usage is None
    charged = before - await net.available()
    assert charged == cost(net, 0, delivered_floor(len(b"Hello"), 16))
    assert await net.flags() == {(rogue.worker_id, "sequence")}
    await serves_on(net)


async def test_a_chunk_sent_twice_or_out_of_order_is_never_delivered(net: Network) -> None:
    rogue = await net.rogue()
    before = await net.available()
    asking = asyncio.create_task(net.chat("Say one two", max_tokens=16, to=rogue.worker_id))
    job = await rogue.take()
    await rogue.chunk(job, "two", seq=1)  # ahead of chunk 0
    await rogue.chunk(job, "one", seq=0)
    await told_to_stop(rogue, job)
    await rogue.final(job, prompt_tokens=5, completion_tokens=2)
    reply = await asking

    assert reply.status == 502 and reply.error == "worker_misbehaved", reply.body
    assert await net.available() == before  # nothing arrived in order: nothing is charged
    assert await net.flags() == {(rogue.worker_id, "sequence")}

    # A repeated chunk number (the same text twice, or another text in its place).
    again = await net.rogue()
    asking = asyncio.create_task(net.streamed("Say one two", max_tokens=16, to=again.worker_id))
    job = await again.take()
    await again.chunk(job, "one")
    await again.chunk(job, " one", seq=0)
    await told_to_stop(again, job)
    seen: Streamed = await asking
    assert seen.error is not None and seen.error["code"] == "worker_misbehaved", seen
    assert seen.text == "one"
    assert (again.worker_id, "sequence") in await net.flags()
    await serves_on(net)


class FakeClock:
    """The web server's dispatcher clock (deadlines, timeouts), moved by the test."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


async def test_a_trickling_worker_is_cut_off_at_the_absolute_deadline(net: Network) -> None:
    """Before: one chunk every 59 s held a connection, a hold and a slot until the 900 s
    sweeper: there was no absolute turn deadline."""
    rogue = await net.rogue()
    d = net.dispatcher
    clock = FakeClock()
    d.clock = clock
    # The job may wait for its worker until the first-token timeout, run for the job timeout,
    # and end a grace later: 60 + 600 + 30 s with cocoon web's settings.
    allowed = min(d.first_token_timeout_s, d.queue_ttl_s) + d.job_timeout_s + d.deadline_grace_s
    step = d.idle_timeout_s - 1  # a word just before the idle timeout, every time
    before = await net.available()
    seen = Streamed()
    events = aiter(net.stream("Tell me a long story", max_tokens=2048, to=rogue.worker_id))
    # The request goes out; its reply opens (status, then the role) with the first word.
    opening = asyncio.ensure_future(anext(events))
    job = await rogue.take()

    elapsed = 0.0
    honest = 0  # what the honest turns meanwhile cost
    while elapsed <= allowed:
        await rogue.chunk(job, f"word{len(seen.texts)} ")
        if not seen.texts:
            assert seen.add(await opening) is None  # the role, before any text
        assert seen.add(await anext(events)) is not None
        honest += (await net.honest_turn()).cost  # served meanwhile
        clock.now += step
        elapsed += step
    async for event in events:
        seen.add(event)

    assert seen.error is not None and seen.error["code"] == "worker_misbehaved", seen
    steps = int(allowed // step) + 1  # the words written before the deadline passed
    assert len(seen.texts) == steps
    delivered = len(seen.text.encode())
    charged = before - await net.available() - honest
    assert charged == cost(net, 0, delivered_floor(delivered, 2048))
    assert await net.flags() == {(rogue.worker_id, "deadline")}
    assert await rogue.cancel_requested(job)
    await serves_on(net)


# -- what a worker proves about itself -----------------------------------------------------------


async def test_an_off_machine_engine_is_refused_for_attested_workers_and_labelled_for_dev(
    net: Network,
) -> None:
    """Before: ``--engine openai --engine-option base_url=http://<any host>`` sent every
    decrypted prompt to that host, and nothing in the evidence said so."""
    off = {"base_url": OFF_MACHINE, "served_model": SERVED, "api_key": False}
    status, body = await net.attempt(
        lambda nonce: tdx_evidence(WorkerKeys.generate(), nonce, engine="openai", engine_config=off)
    )
    assert status == 403 and body["accepted"] is False
    assert (
        f"the openai engine sends every prompt to '{OFF_MACHINE}', which is not a loopback "
        "address: off this machine, outside the TEE: refused for an attested worker (such an "
        "engine is allowed only with the development TEE)"
    ) in body["reasons"]
    assert await net.indexed() == [net.honest_id]

    # With the development TEE it runs, and users are told where their prompts go.
    rogue = await net.rogue(engine="openai", engine_config=off)
    record = await registry.read_attestation(net.admin, rogue.worker_id)
    assert record is not None and record.off_machine and record.tee == "dev"
    asking = asyncio.create_task(net.chat("where does this go", to=rogue.worker_id))
    await rogue.answer_honestly(await rogue.take())
    reply = await asking
    assert reply.status == 200 and reply.worker == rogue.worker_id
    shown = reply.body["cocoon"]["worker"]
    assert (shown["off_machine"], shown["tee"], shown["engine"]) == (True, "dev", "openai")
    await serves_on(net)


async def test_weights_not_on_the_allow_list_are_refused(net: Network) -> None:
    other = hashlib.sha256(b"weights with a backdoor").hexdigest()
    refusal = f"weights sha256 {other} are not on the allow-list of model '{attest.MODEL}'"
    # The policy lists this model's weights: even a development worker runs only those.
    with pytest.raises(AttestationRefused) as refused:
        await net.rogue(model=attest.MODEL, model_sha256=other)
    assert refused.value.status == 403 and refused.value.reasons == [refusal]
    status, body = await net.attempt(
        lambda nonce: tdx_evidence(WorkerKeys.generate(), nonce, model_sha256=other)
    )
    assert status == 403 and refusal in body["reasons"], body
    assert await net.indexed() == [net.honest_id]  # neither got in
    # The listed digest is accepted: what was refused is the digest.
    listed = await net.rogue(model=attest.MODEL, model_sha256=attest.WEIGHTS, advertise=False)
    record = await registry.read_attestation(net.admin, listed.worker_id)
    assert record is not None and record.model_sha256 == attest.WEIGHTS
    await serves_on(net)


# -- shared routing state is the backend's ------------------------------------------------------


async def test_editing_the_index_is_refused(net: Network) -> None:
    """Before: a worker removed every other id from the index, and 10 of 10 requests got 503
    while an honest worker was healthy."""
    rogue = await net.rogue(advertise=False)  # it serves nothing: it only edits
    for name, attack in rogue.index_edits(net.honest_id).items():
        with pytest.raises(NoPermissionError):
            attack()
            pytest.fail(f"{name}: allowed")
    with rogue.keep_trying(lambda: rogue.sync.zrem(registry.INDEX_KEY, net.honest_id)) as tries:
        replies = [await net.chat(f"turn {n} of ten, unrouted") for n in range(10)]
    assert [r.worker for r in replies] == [net.honest_id] * 10
    assert tries and set(tries) == {"NoPermissionError"}
    assert await net.indexed() == sorted([net.honest_id, rogue.worker_id])
    await serves_on(net)


async def test_flooding_the_index_is_refused_and_a_flooded_index_is_read_off_the_turns_path(
    net: Network,
) -> None:
    """Before: 300,000 bogus ids froze the web server's event loop for 30-60 s."""
    rogue = await net.rogue(advertise=False)
    with pytest.raises(NoPermissionError):
        rogue.flood_index(100_000)
    assert await net.admin.zcard(registry.INDEX_KEY) == 2  # the two workers the backend took
    # Bogus ids in the index (as an older release let workers write them): turns go on, and
    # each background read of the registry (a bounded page) drops the ids that name no worker.
    pipe = net.admin.pipeline(transaction=False)
    for start in range(0, 50_000, 10_000):
        pipe.zadd(registry.INDEX_KEY, {f"bogus-{n}": 0 for n in range(start, start + 10_000)})
    await pipe.execute()
    replies = [await net.chat(f"turn {n} among bogus ids") for n in range(5)]
    assert [r.worker for r in replies] == [net.honest_id] * 5
    deadline = time.monotonic() + 60
    while await net.admin.zcard(registry.INDEX_KEY) > 2:
        assert time.monotonic() < deadline, "the bogus ids were never dropped"
        await asyncio.sleep(0.1)
    assert await net.indexed() == sorted([net.honest_id, rogue.worker_id])
    await serves_on(net)


async def test_scripts_are_refused_so_no_worker_can_keep_redis_busy(net: Network) -> None:
    """Before: an 8 s Lua loop made Redis answer BUSY to everyone (a script that writes first
    cannot even be killed)."""
    rogue = await net.rogue()
    turn = asyncio.create_task(net.honest_turn())
    for name, attack in rogue.script_attempts(busy_s=8).items():
        with pytest.raises(NoPermissionError):
            attack()
            pytest.fail(f"{name}: allowed")
    await turn
    assert await net.admin.ping()
    await serves_on(net)


async def test_select_of_another_database_is_refused(net: Network) -> None:
    rogue = await net.rogue()
    own = int(rogue.sync.connection_pool.connection_kwargs.get("db", 0) or 0)
    other = (own + 1) % 16
    assert rogue.select(own) in (b"OK", "OK", True)  # its own database: allowed
    with pytest.raises(NoPermissionError):
        rogue.select(other)
    elsewhere = rogue.other_database(other)
    try:
        with pytest.raises(RedisError, match=r"(?i)no permissions|noperm"):
            elsewhere.set(registry.worker_key(rogue.worker_id), "mine")
    finally:
        elsewhere.close()
    await serves_on(net)


async def test_a_huge_capacity_is_capped_by_the_attestation_record(
    settings: Settings, redis_url: str, tmp_path: Path
) -> None:
    """Before: a worker advertising a capacity of 10^9 (and no load) took all traffic."""
    async with network(settings, tmp_path / "net", capacity=3) as net:
        rogue = await net.rogue()
        rogue.advertise(capacity=10**9, load=0)
        await net.dispatcher.workers.refresh()
        listed = await registry.get_worker(net.admin, rogue.worker_id)
        assert listed is not None and listed.capacity == 3

        # Six turns, each routed to the rogue: it takes three and holds them.
        asks = [
            asyncio.create_task(net.chat(f"turn {n} for the greedy one", to=rogue.worker_id))
            for n in range(6)
        ]
        held = [await rogue.take() for _ in range(3)]
        answered: set[asyncio.Task[Reply]] = set()
        deadline = time.monotonic() + 60
        while len(answered) < 3:
            assert time.monotonic() < deadline, "the honest worker did not serve the rest"
            done, _ = await asyncio.wait(
                set(asks) - answered, timeout=1, return_when=asyncio.FIRST_COMPLETED
            )
            answered |= done
        assert {a.result().worker for a in answered} == {net.honest_id}
        # Saying it is idle frees no slot: load is the backend's own count.
        rogue.advertise(capacity=10**9, load=0)
        extra = await net.chat("one more for the greedy one", to=rogue.worker_id)
        assert extra.worker == net.honest_id
        assert len(rogue.taken) == 3
        assert await net.admin.llen(f"rq:queue:{registry.queue_name(rogue.worker_id)}") == 0

        for job in held:  # it answers at last: those three are its own
            await rogue.answer_honestly(job)
        rest = [await a for a in asks if a not in answered]
        assert [r.worker for r in rest] == [rogue.worker_id] * 3
        await rogue.close()  # it leaves: the honest worker serves on alone
        await serves_on(net)


# -- Redis restarts --------------------------------------------------------------------------------


async def test_a_redis_restart_mid_load_ends_no_worker_and_breaks_no_money(
    settings: Settings, tmp_path: Path
) -> None:
    """Before: the node took the restart for a revocation and exited for good, and the first
    request after it answered 500."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        s = settings.model_copy(update={"redis_url": server.url()})
        async with network(s, tmp_path / "net") as net:
            seen: list[tuple[int, int, str | None]] = []  # (restarts, status, worker or error)
            stop = asyncio.Event()

            async def load() -> None:
                while not stop.is_set():
                    try:
                        reply = await net.chat(f"under load {uuid.uuid4().hex[:8]}")
                    except aiohttp.ClientError as error:
                        seen.append((server.restarts, -1, type(error).__name__))
                        continue
                    seen.append((server.restarts, reply.status, reply.worker or reply.error))
                    if reply.status != 200:
                        await asyncio.sleep(0.05)

            async def served(restarts: int, count: int) -> None:
                deadline = time.monotonic() + 60
                while sum(1 for r, st, _ in seen if r == restarts and st == 200) < count:
                    assert time.monotonic() < deadline, (seen[-5:], net.node_log.read_text())
                    await asyncio.sleep(0.05)

            loads = [asyncio.create_task(load()) for _ in range(3)]
            await served(0, 5)
            await asyncio.to_thread(server.restart)  # mid-load: turns are in flight
            await served(1, 5)
            stop.set()
            await asyncio.gather(*loads)

            # Never a 500: Redis away is a 503 that says so (nothing held or charged); a job
            # the restart cut off is given up on as any lost job is, with nothing charged.
            assert {(st, w) for _r, st, w in seen if st != 200} <= {
                (503, "internal"),
                (503, "no_worker"),
            }, seen
            assert {w for _r, st, w in seen if st == 200} == {net.honest_id}
            assert net.node.poll() is None and "revoked" not in net.node_log.read_text()
            await serves_on(net)
    finally:
        server.stop()
