"""What a lying worker gets out of the reply path: an inflated final record, a huge reply, a
trickle (issue 12, items 2 and 4). Figures for the closing note, before and after.

``.venv/bin/python -m bench.reply_bounds --redis-url redis://127.0.0.1:6379/8`` (that Redis
database is flushed) runs each attack against a real dispatcher and ledger (SQLite in a temporary
directory) with a rogue worker (``tests/support/rogue.py``) writing sealed, signed records
straight into Redis, and prints one line per attack: what the user was charged, what the client
received, how much the dispatcher's process grew, how long the turn held its hold and slot. The
flood's rogue writes from a process of its own, so the growth measured is the dispatcher's.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import multiprocessing
import tempfile
import time
from pathlib import Path

import nacl.public
import redis
import redis.asyncio as aioredis

from backend.db import Database
from backend.dispatch import Dispatcher, TurnError, TurnRequest, TurnText
from backend.ledger import Ledger
from backend.pricing import turn_cost
from backend.settings import DEFAULT_MODEL, AttestationSettings, Settings
from backend.users import get_or_create_user
from tests.support.rogue import RogueWorker
from workers import streams
from workers.wire import ChatMessage, StreamChunk

TON = 1_000_000_000


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux)


def _flood(redis_url: str, job_id: str, reply_key: str, chunks: int, chunk_chars: int) -> None:
    """The flooding worker, in a process of its own: ``chunks`` valid chunks of text."""
    client = redis.Redis.from_url(redis_url)
    text = "x" * chunk_chars
    box = nacl.public.SealedBox(nacl.public.PublicKey(base64.b64decode(reply_key)))
    for seq in range(chunks):
        chunk = StreamChunk(job_id=job_id, seq=seq, text=text)
        sealed = box.encrypt(chunk.model_dump_json().encode())
        client.xadd(streams.stream_key(job_id), {b"d": sealed})
    client.close()


async def _consume(turn) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    """Read a turn as a web server streaming it out would: count the bytes, keep none."""
    received = 0
    try:
        async for event in turn.events():
            if isinstance(event, TurnText):
                received += len(event.text.encode())
            else:
                return received, f"done ({event.finish_reason})"
    except TurnError as error:
        return received, f"error {error.code}"
    return received, "?"


async def main(redis_url: str, flood_mb: int, trickle_s: float) -> None:
    sync = redis.Redis.from_url(redis_url)
    sync.flushdb()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            _env_file=None,
            data_dir=Path(tmp),
            redis_url=redis_url,
            attestation=AttestationSettings(allow_dev=True),
        )
        db = Database.from_settings(settings)
        await db.upgrade()
        ledger = Ledger(db)
        dispatcher = Dispatcher(
            settings,
            ledger,
            aioredis.Redis.from_url(redis_url),
            first_token_timeout_s=10,
            idle_timeout_s=10,
        )
        price = settings.models[DEFAULT_MODEL]
        provider = (await get_or_create_user(db, 1)).id
        rogue = RogueWorker(redis_url, provider_id=provider)

        async def funded(telegram_id: int) -> int:
            user = (await get_or_create_user(db, telegram_id)).id
            await ledger.credit_deposit(user, TON, f"dep:{telegram_id}")
            return user

        def ask(user: int, text: str, max_tokens: int | None) -> TurnRequest:
            return TurnRequest(
                user, DEFAULT_MODEL, [ChatMessage(role="user", content=text)], max_tokens
            )

        # 1. An inflated final record: a one-token reply claimed as 10M prompt tokens of a
        #    2,048-token model and the whole reply budget (max_tokens: the default).
        user = await funded(10)
        turn = await dispatcher.start_turn(ask(user, "Say hi", None))
        job = await rogue.take()
        await rogue.chunk(job, "Hi!")
        await rogue.final(job, prompt_tokens=10_000_000, completion_tokens=job.request.max_tokens)
        received, how = await _consume(turn)
        charged = TON - (await ledger.balances(user)).available
        honest = turn_cost(price, prompt_tokens=31, cached_prompt_tokens=0, completion_tokens=2)
        print(
            f"inflated final record: charged {charged} nanoTON (an honest SmolLM2 turn: "
            f"{honest}); provider credited {(await ledger.balances(provider)).earned}; {how}"
        )

        # 2. A flood to max_tokens 1: flood_mb chunks of one million characters.
        user = await funded(20)
        turn = await dispatcher.start_turn(ask(user, "One word please", 1))
        job = await rogue.take()
        writer = multiprocessing.get_context("spawn").Process(
            target=_flood,
            args=(redis_url, job.job_id, job.request.reply_key, flood_mb, 1_000_000),
        )
        writer.start()
        await asyncio.to_thread(writer.join)
        await rogue.final(job, prompt_tokens=5, completion_tokens=1)
        _reset_peak_rss()
        before = _rss_mb("VmRSS")
        started = time.monotonic()
        received, how = await _consume(turn)
        grew = _rss_mb("VmHWM") - before
        charged = TON - (await ledger.balances(user)).available
        print(
            f"{flood_mb} MB reply to max_tokens 1: client received {received} bytes; the "
            f"dispatcher's process grew {grew:.0f} MB at its peak; read in "
            f"{time.monotonic() - started:.1f} s; charged {charged} nanoTON; {how}"
        )

        # 3. A trickle: one word every 1.5 s, for trickle_s seconds, under a 4 s job timeout
        #    (a short job timeout so the figure takes seconds: the rule is the same at 600 s).
        dispatcher.job_timeout_s = 4
        dispatcher.first_token_timeout_s = 2
        dispatcher.idle_timeout_s = 2
        dispatcher.deadline_grace_s = 1  # an attribute the code before the bounds ignores
        user = await funded(30)
        turn = await dispatcher.start_turn(ask(user, "Tell me a long story", 2048))
        job = await rogue.take()
        started = time.monotonic()

        async def trickle() -> None:
            while time.monotonic() - started < trickle_s:
                await rogue.chunk(job, "word ")
                await asyncio.sleep(1.5)
            await rogue.final(job, prompt_tokens=50, completion_tokens=2048)

        writing = asyncio.create_task(trickle())
        received, how = await _consume(turn)
        held = time.monotonic() - started
        writing.cancel()
        charged = TON - (await ledger.balances(user)).available
        print(
            f"trickle (1 word / 1.5 s, job timeout 4 s, first token 2 s): the turn held its hold "
            f"and slot {held:.1f} s; client received {received} bytes; charged {charged} "
            f"nanoTON; {how}"
        )
        audit = await ledger.audit()
        print(f"ledger audit: {'clean' if audit.ok else audit}")
        await rogue.close()
        await dispatcher.close()
        await db.close()
    sync.flushdb()
    sync.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/8")
    parser.add_argument("--flood-mb", type=int, default=300)
    parser.add_argument("--trickle-s", type=float, default=30.0)
    options = parser.parse_args()
    asyncio.run(main(options.redis_url, options.flood_mb, options.trickle_s))
