"""Stopping the processes that run alone as a person or a supervisor does (tests/test_lifecycle.py
has `cocoon up` and the worker node): `cocoon web` and `cocoon bot` with a turn in flight,
`cocoon watcher` with a deposit in flight (credited once), the payout sender, and a process
that said it stopped exiting even with a thread stuck. Exit codes, nothing left behind, the
ledger audit clean; the harness is tests/support/lifecycle.py.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from backend.apikeys import create_key
from backend.db import Database
from backend.ledger import Ledger
from backend.users import get_or_create_user
from tests.support.fake_telegram import TelegramWithOneMessage
from tests.support.lifecycle import (
    GRACE_S,
    TON,
    Proc,
    StreamingTurn,
    audit,
    base_env,
    cocoon,
    port_open,
    wait_until,
)
from tests.support.ops import InstantNode, free_port

pytestmark = pytest.mark.slow


# -- cocoon web alone ----------------------------------------------------------------------------


async def funded_user(data: Path, telegram_id: int = 4242) -> tuple[int, str]:
    """The database of ``data`` at the newest schema, a user with 1 TON, an API key."""
    await asyncio.to_thread(data.mkdir, parents=True, exist_ok=True)
    db = Database(f"sqlite+aiosqlite:///{data / 'cocoon.db'}")
    try:
        await db.upgrade()
        user = await get_or_create_user(db, telegram_id)
        await Ledger(db).credit_deposit(user.id, TON, f"dep:{telegram_id}")
        key, _row = await create_key(db, user.id)
    finally:
        await db.close()
    return user.id, key


LONG_PROMPT = " ".join(f"word{i}" for i in range(400))
"""The instant engine echoes it word by word: 400 words at 0.1 s, a turn of 40 s."""


@pytest.mark.parametrize(
    ("signals", "grace_s", "code"),
    [
        pytest.param([signal.SIGTERM], GRACE_S, 0, id="SIGTERM"),
        pytest.param([signal.SIGINT], GRACE_S, 0, id="SIGINT"),
        pytest.param([signal.SIGTERM] * 2, 600, 128 + signal.SIGTERM, id="SIGTERM-twice"),
    ],
)
async def test_web_stops_within_its_grace_period_with_a_turn_in_flight(
    tmp_path: Path, redis_url: str, signals: list[int], grace_s: int, code: int
) -> None:
    data = tmp_path / "data"
    _user, key = await funded_user(data)
    node = InstantNode(redis_url, token_delay=0.1, log_file=tmp_path / "node.log")
    port = free_port()
    env = base_env(
        data,
        COCOON_REDIS_URL=redis_url,
        COCOON_ATTESTATION__ALLOW_DEV="true",
        COCOON_STOP_GRACE_S=str(grace_s),
    )
    proc = Proc(cocoon("web", "--port", str(port)), env, tmp_path / "web.log")
    try:
        await wait_until(lambda: port_open(port), "cocoon web to listen", proc)
        turn = StreamingTurn(f"http://127.0.0.1:{port}", key, LONG_PROMPT, 400)
        await turn.wait_started()
        for signum in signals:
            proc.signal(signum)
            if len(signals) > 1:
                name = signal.Signals(signum).name
                await wait_until(
                    lambda n=name: f"{n}: stopping within" in proc.text(), "stop", proc
                )
        assert await proc.exit_code() == code, proc.text()[-3000:]
        await turn.finished()
    finally:
        proc.kill_everything()
        node.stop()
    assert not port_open(port)
    # The 40 s turn was cut short by the stop, not waited for.
    assert len(turn.text.split()) < 400 and turn.ended != "done"
    report = await audit(data, settled=code == 0)
    assert report.ok, str(report)
    if code == 0:  # a graceful stop billed what was generated, or gave the hold back
        assert (report.holds, report.holds_open) == (1, 0)


# -- cocoon bot alone ----------------------------------------------------------------------------


async def test_bot_stops_on_sigterm_with_a_turn_in_flight(tmp_path: Path, redis_url: str) -> None:
    data = tmp_path / "data"
    await funded_user(data, telegram_id=5151)
    node = InstantNode(redis_url, token_delay=0.1, log_file=tmp_path / "node.log")
    telegram = TelegramWithOneMessage(5151, LONG_PROMPT)
    await telegram.start()
    env = base_env(
        data,
        COCOON_REDIS_URL=redis_url,
        COCOON_ATTESTATION__ALLOW_DEV="true",
        COCOON_BOT_TOKEN="4242:lifecycle-test-token",
        COCOON_TELEGRAM_API_URL=telegram.url,
        COCOON_MAX_TOKENS_DEFAULT="400",
    )
    proc = Proc(cocoon("bot"), env, tmp_path / "bot.log")
    try:
        # The reply is streaming to the user (drafts or edits of a message).
        drafts = {"sendMessageDraft", "editMessageText"}
        await wait_until(lambda: bool(drafts & set(telegram.methods())), "a streamed reply", proc)
        proc.signal(signal.SIGTERM)
        assert await proc.exit_code() == 0, proc.text()[-3000:]
    finally:
        proc.kill_everything()
        node.stop()
        await telegram.stop()
    report = await audit(data)
    assert report.ok, str(report)
    assert (report.holds, report.holds_open) == (1, 0)


# -- cocoon watcher and cocoon ton payouts alone -------------------------------------------------


async def test_watcher_stops_with_a_deposit_in_flight_and_credits_it_once(tmp_path: Path) -> None:
    from backend.ton.localnet import LocalTonCenter, LocalTonCenterServer

    data = tmp_path / "data"
    await funded_user(data, telegram_id=6161)
    db = Database(f"sqlite+aiosqlite:///{data / 'cocoon.db'}")
    try:
        memo = (await get_or_create_user(db, 6161)).deposit_memo
    finally:
        await db.close()
    deposit_wallet = "0:" + "d0" * 32
    net = LocalTonCenter()
    async with LocalTonCenterServer(net) as url:
        env = base_env(
            data,
            COCOON_TON__API_URL=url,
            COCOON_TON__DEPOSIT_ADDRESS=deposit_wallet,
            COCOON_TON__NETWORK="testnet",
            COCOON_TON__POLL_INTERVAL_S="0.2",
        )
        # Started as a background job of a script is: SIGINT ignored. SIGINT still stops it.
        proc = Proc(
            cocoon("watcher", "--no-payouts"), env, tmp_path / "watcher.log", ignore_sigint=True
        )
        try:
            await wait_until(lambda: "watching testnet" in proc.text(), "the watcher", proc)
            requests = net.requests
            net.add_incoming(deposit_wallet, 3 * TON, comment=memo)
            await wait_until(lambda: net.requests > requests, "a poll after the deposit", proc)
            proc.signal(signal.SIGINT)
            assert await proc.exit_code() == 0, proc.text()
        finally:
            proc.kill_everything()
        assert (await audit(data)).ok
        # Whatever the stop left undone is picked up by the next run, and credited once.
        again = Proc(cocoon("watcher", "--no-payouts", "--once"), env, tmp_path / "once.log")
        try:
            assert await again.exit_code() == 0, again.text()
        finally:
            again.kill_everything()
    report = await audit(data)
    assert report.ok and report.deposits_credited == 1, str(report)
    db = Database(f"sqlite+aiosqlite:///{data / 'cocoon.db'}")
    try:
        user = await get_or_create_user(db, 6161)
        assert (await Ledger(db).balances(user.id)).available == TON + 3 * TON
    finally:
        await db.close()


async def test_payout_sender_stops_on_sigterm(tmp_path: Path) -> None:
    from backend.ton.localnet import LocalTonCenter, LocalTonCenterServer
    from backend.ton.wallet import new_mnemonic

    data = tmp_path / "data"
    await funded_user(data, telegram_id=7171)
    async with LocalTonCenterServer(LocalTonCenter()) as url:
        env = base_env(
            data,
            COCOON_TON__API_URL=url,
            COCOON_TON__NETWORK="testnet",
            COCOON_TON__HOT_WALLET_MNEMONIC=new_mnemonic(),
        )
        proc = Proc(cocoon("ton", "payouts"), env, tmp_path / "payouts.log")
        try:
            await wait_until(lambda: "payouts on" in proc.text(), "the payout sender", proc)
            proc.signal(signal.SIGTERM, group=True)
            assert await proc.exit_code() == 0, proc.text()
        finally:
            proc.kill_everything()
    assert "SIGTERM: stopping within" in proc.text()
    assert (await audit(data)).ok


def test_a_process_that_said_it_stopped_exits_even_with_a_thread_stuck() -> None:
    """Before: a node that logged "stopped" stayed alive about one time in six after a Redis
    restart, its dequeue thread stuck in a blocking read the interpreter joins before exiting.
    The entries (``cocoon``, ``cocoon-worker``) end the process ``FORCE_EXIT_S`` after main
    returned, with main's exit code."""
    program = (
        "import sys, threading\n"
        "from workers.lifecycle import exit_within\n"
        "threading.Thread(target=threading.Event().wait).start()  # never ends, not a daemon\n"
        "print('stopped', flush=True)\n"
        "sys.exit(exit_within(7, 0.2))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 7 and done.stdout == "stopped\n", done.stderr
