"""Stopping as a person or a supervisor does: real processes, each in a process group of its
own, stopped with SIGTERM to the main process only (``docker stop``, systemd), SIGTERM to the
whole group, SIGINT (also when started with SIGINT ignored, as a background job of a
non-interactive shell is), a signal while the worker is still onboarding, and a second signal.

Each test asserts the exit code, that the process ended (waits are upper bounds on events, never
speed assertions), that nothing it started is left (by PID and by port), and, where money was
moving at the moment of the signal, that the ledger audit is clean: the turn in flight billed
once or given back, the deposit credited once. The grace period is the setting
``COCOON_STOP_GRACE_S``; a stop that must wait for the grace period is shown by a turn that
would have run far longer being cut short.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from backend.apikeys import create_key
from backend.db import Database
from backend.invariants import InvariantReport, check_invariants
from backend.ledger import Ledger
from backend.users import get_or_create_user
from tests.support.fake_telegram import TelegramWithOneMessage
from tests.support.ops import InstantNode, free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
GRACE_S = 4
"""The grace period given to the processes under test (``COCOON_STOP_GRACE_S``)."""
BOUND_S = 90
"""Upper bound on every wait for an event: reaching it fails the test."""
TON = 1_000_000_000
MODEL = "smollm2-135m"


# -- processes -------------------------------------------------------------------------------


class Proc:
    """A command in a session and process group of its own, its output in a log file."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str],
        log: Path,
        *,
        ignore_sigint: bool = False,
    ) -> None:
        self.log = log
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                args,
                env=env,
                cwd=log.parent,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # What a non-interactive shell does to a background job: SIGINT ignored.
                preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
                if ignore_sigint
                else None,
            )
        self.pid = self.process.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, signum: int, *, group: bool = False) -> None:
        if group:
            os.killpg(self.pid, signum)
        else:
            os.kill(self.pid, signum)

    async def exit_code(self) -> int:
        """Wait for the process to end (within BOUND_S) and return its exit code."""
        await wait_until(lambda: self.process.poll() is not None, f"{self.log.name}: exit", self)
        return int(self.process.returncode)

    def kill_everything(self) -> None:
        """After a test: nothing of this process's group or descendants survives."""
        for pid in [self.pid, *descendants(self.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait(10)


def cocoon(*args: str) -> list[str]:
    return [sys.executable, "-m", "backend.cli", *args]


def base_env(data: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COCOON_")}
    env.update({"COCOON_DATA_DIR": str(data), "COCOON_STOP_GRACE_S": str(GRACE_S), **settings})
    env["PYTHONPATH"] = str(REPO)
    return env


def descendants(pid: int) -> dict[int, str]:
    """The living descendants of ``pid``: {pid: command line}."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found: dict[int, str] = {}
    queue = list(children.get(pid, []))
    while queue:
        child = queue.pop()
        if alive(child):
            try:
                found[child] = (Path("/proc") / str(child) / "cmdline").read_bytes().decode()
            except OSError:
                continue
            queue.extend(children.get(child, []))
    return found


def alive(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


async def wait_until(
    condition: Callable[[], bool], what: str, proc: Proc | None = None, bound_s: float = BOUND_S
) -> None:
    deadline = time.monotonic() + bound_s
    while not condition():
        if time.monotonic() > deadline:
            tail = proc.text()[-4000:] if proc is not None else ""
            raise AssertionError(f"waited {bound_s} s for {what}\n{tail}")
        await asyncio.sleep(0.05)


def assert_all_gone(started: dict[int, str], ports: list[int]) -> None:
    left = {pid: cmd for pid, cmd in started.items() if alive(pid)}
    assert not left, f"processes left behind: {left}"
    open_ports = [port for port in ports if port_open(port)]
    assert not open_ports, f"ports still served: {open_ports}"


async def audit(data: Path, *, settled: bool = True) -> InvariantReport:
    db = Database(f"sqlite+aiosqlite:///{data / 'cocoon.db'}")
    try:
        return await check_invariants(db, settled=settled)
    finally:
        await db.close()


# -- turns in flight ---------------------------------------------------------------------------


class StreamingTurn:
    """A streamed chat completion read in the background; ``started`` once text has arrived."""

    def __init__(self, url: str, key: str, content: str, max_tokens: int) -> None:
        self.started = asyncio.Event()
        self.text = ""
        self.ended = ""  # how the stream ended: "done", or the error
        self._task = asyncio.create_task(self._read(url, key, content, max_tokens))

    async def _read(self, url: str, key: str, content: str, max_tokens: int) -> None:
        body = {
            "model": MODEL,
            "stream": True,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": content}],
        }
        try:
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    f"{url}/v1/chat/completions",
                    json=body,
                    headers={"Authorization": f"Bearer {key}"},
                ) as reply,
            ):
                assert reply.status == 200, await reply.text()
                async for raw in reply.content:
                    line = raw.decode().strip()
                    if line == "data: [DONE]":
                        self.ended = "done"
                    elif line.startswith("data: "):
                        for choice in json.loads(line[6:]).get("choices", []):
                            self.text += (choice.get("delta") or {}).get("content") or ""
                        if self.text:
                            self.started.set()
                self.ended = self.ended or "closed"
        except (aiohttp.ClientError, OSError) as error:
            self.ended = f"cut: {type(error).__name__}"
        finally:
            self.started.set()

    async def wait_started(self) -> None:
        await asyncio.wait_for(self.started.wait(), BOUND_S)
        assert self.text, f"the turn never streamed ({self.ended})"

    async def finished(self) -> None:
        await asyncio.wait_for(self._task, BOUND_S)


# -- cocoon up -----------------------------------------------------------------------------------


class Up:
    """``cocoon up`` on free ports, with its own data directory and its own Redis port."""

    def __init__(self, tmp_path: Path, *, grace_s: float = GRACE_S, **start: bool) -> None:
        self.data = tmp_path / "data"
        self.redis_port = free_port()
        self.web_port = free_port()
        self.url = f"http://127.0.0.1:{self.web_port}"
        env = base_env(
            self.data,
            COCOON_REDIS_URL=f"redis://127.0.0.1:{self.redis_port}/0",
            COCOON_WEB_PORT=str(self.web_port),
            COCOON_STOP_GRACE_S=str(grace_s),
        )
        self.proc = Proc(cocoon("up"), env, tmp_path / "up.log", **start)

    async def ready(self) -> None:
        await wait_until(lambda: "cocoon: ready" in self.proc.text(), "cocoon up: ready", self.proc)

    def started(self) -> dict[int, str]:
        """What it started: the worker node and the Redis server (both must be there)."""
        found = descendants(self.proc.pid)
        assert any("workers.node" in cmd for cmd in found.values()), found
        assert any("redis-server" in cmd for cmd in found.values()), found
        return found

    def ports(self) -> list[int]:
        ton = re.search(r"local TON Center .* at http://127\.0\.0\.1:(\d+);", self.proc.text())
        assert ton is not None, self.proc.text()
        return [self.web_port, self.redis_port, int(ton.group(1))]

    def key(self) -> str:
        return (self.data / "local-api-key").read_text().strip()

    def stopped_line(self) -> str:
        lines = [line for line in self.proc.text().splitlines() if "cocoon: stopped (" in line]
        assert len(lines) == 1, self.proc.text()[-3000:]
        return lines[0]


@pytest.fixture
def up_stacks() -> Iterator[list[Up]]:
    stacks: list[Up] = []
    yield stacks
    for stack in stacks:
        stack.proc.kill_everything()


@pytest.mark.parametrize(
    ("signum", "group", "ignore_sigint"),
    [
        pytest.param(signal.SIGTERM, False, False, id="SIGTERM-to-cocoon-up-only"),
        pytest.param(signal.SIGTERM, True, False, id="SIGTERM-to-the-group"),
        pytest.param(signal.SIGINT, False, True, id="SIGINT-started-with-SIGINT-ignored"),
    ],
)
async def test_up_stops_everything_it_started_with_a_turn_in_flight(
    tmp_path: Path, up_stacks: list[Up], signum: int, group: bool, ignore_sigint: bool
) -> None:
    up = Up(tmp_path, ignore_sigint=ignore_sigint)
    up_stacks.append(up)
    await up.ready()
    started, ports = up.started(), up.ports()

    turn = StreamingTurn(up.url, up.key(), "Tell me a long story about a cat and a boat.", 300)
    await turn.wait_started()
    up.proc.signal(signum, group=group)

    assert await up.proc.exit_code() == 0, up.proc.text()[-3000:]
    await turn.finished()
    name = signal.Signals(signum).name
    line = up.stopped_line()
    assert line.startswith(f"cocoon: stopped ({name})"), line
    # In order: the front ends, then the worker, then the TON parts, then the Redis it started.
    order = ["web server", "worker", "local TON Center", "Redis"]
    assert [line.index(part) for part in order] == sorted(line.index(part) for part in order)
    assert_all_gone(started, ports)
    report = await audit(up.data)
    assert report.ok, str(report)
    assert (report.holds, report.holds_open) == (1, 0)  # the turn in flight: billed or given back


class FrozenRedis:
    """Freezes (SIGSTOP) the Redis ``cocoon up`` started, the moment its worker appears: the
    web server's onboarding calls then hang, so the worker is certain to be still onboarding."""

    def __init__(self, up: Up) -> None:
        self.up = up
        self.pid = 0

    async def freeze_when_the_worker_starts(self) -> int:
        found: dict[int, str] = {}

        def worker_started() -> bool:
            found.update(descendants(self.up.proc.pid))
            return any("workers.node" in cmd for cmd in found.values())

        await wait_until(worker_started, "the worker process", self.up.proc, bound_s=BOUND_S)
        self.pid = next(pid for pid, cmd in found.items() if "redis-server" in cmd)
        os.kill(self.pid, signal.SIGSTOP)
        return next(pid for pid, cmd in found.items() if "workers.node" in cmd)

    def thaw(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGCONT)


async def test_up_stops_at_once_while_its_worker_is_onboarding(
    tmp_path: Path, up_stacks: list[Up]
) -> None:
    up = Up(tmp_path)
    up_stacks.append(up)
    frozen = FrozenRedis(up)
    worker = await frozen.freeze_when_the_worker_starts()
    try:
        await wait_until(lambda: "the local worker is onboarding" in up.proc.text(), "web", up.proc)
        # Its engine is loaded: it is attesting, and the backend cannot answer it.
        await wait_until(lambda: "loaded in" in up.proc.text(), "the worker's engine", up.proc)
        started = descendants(up.proc.pid)
        up.proc.signal(signal.SIGTERM, group=True)
        assert await up.proc.exit_code() == 0, up.proc.text()[-3000:]
    finally:
        frozen.thaw()
    assert "stopped while onboarding: not attested" in up.proc.text()
    assert worker in started
    assert_all_gone(started, [up.web_port, up.redis_port])


async def test_a_second_signal_stops_up_at_once(tmp_path: Path, up_stacks: list[Up]) -> None:
    # A grace period far longer than the wait below: only the second signal can end it in time.
    up = Up(tmp_path, grace_s=600)
    up_stacks.append(up)
    frozen = FrozenRedis(up)
    await frozen.freeze_when_the_worker_starts()
    try:
        await wait_until(lambda: "the local worker is onboarding" in up.proc.text(), "web", up.proc)
        started = descendants(up.proc.pid)
        up.proc.signal(signal.SIGTERM)
        await wait_until(lambda: "SIGTERM: stopping within" in up.proc.text(), "stop", up.proc)
        up.proc.signal(signal.SIGTERM)
        code = await up.proc.exit_code()  # within BOUND_S, far less than the grace period
    finally:
        frozen.thaw()
    assert code == 128 + signal.SIGTERM, up.proc.text()[-3000:]
    assert "SIGTERM again: stopping now" in up.proc.text()
    assert_all_gone(started, [up.web_port, up.redis_port])
    assert (await audit(up.data, settled=False)).ok


async def test_what_up_started_stops_by_itself_when_up_is_killed(
    tmp_path: Path, up_stacks: list[Up]
) -> None:
    up = Up(tmp_path)
    up_stacks.append(up)
    await up.ready()
    started, ports = up.started(), up.ports()
    up.proc.signal(signal.SIGKILL)  # no handler runs: the children must notice by themselves
    assert await up.proc.exit_code() == -signal.SIGKILL
    await wait_until(lambda: not any(alive(pid) for pid in started), "the orphans to stop")
    await wait_until(lambda: not any(port_open(port) for port in ports), "the ports to close")


# -- the worker node alone -----------------------------------------------------------------------


def worker_command(register_url: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "workers.node", "--model", MODEL, "--engine", "instant",
        "--register-url", register_url, "--token", "cct_test", "--tee", "dev", *extra,
    ]  # fmt: skip


async def worker_run(data: Path, register_url: str, *extra: str) -> tuple[int, str]:
    """``cocoon worker`` (:func:`worker_command`) run to its end: its exit code, its log."""
    proc = Proc(worker_command(register_url, *extra), base_env(data), data / "worker.log")
    try:
        return await proc.exit_code(), proc.text()
    finally:
        proc.kill_everything()


@contextlib.asynccontextmanager
async def hanging_backend() -> AsyncIterator[tuple[str, asyncio.Event]]:
    """An onboarding API that takes the nonce request and never answers it."""
    asked = asyncio.Event()

    async def nonce(_request: web.Request) -> web.Response:
        asked.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_post("/v1/workers/nonce", nonce)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", asked
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signal_stops_a_worker_that_is_onboarding(tmp_path: Path, signum: int) -> None:
    async with hanging_backend() as (url, asked):
        proc = Proc(worker_command(url), base_env(tmp_path), tmp_path / "worker.log")
        try:
            await asyncio.wait_for(asked.wait(), BOUND_S)  # it is attesting, and will hang
            proc.signal(signum)
            assert await proc.exit_code() == 0, proc.text()
        finally:
            proc.kill_everything()
    assert "stopped while onboarding: not attested" in proc.text()


async def test_a_worker_that_cannot_onboard_exits_non_zero(tmp_path: Path) -> None:
    closed = free_port()  # nothing listens there
    code, text = await worker_run(tmp_path, f"http://127.0.0.1:{closed}", "--register-wait", "1")
    assert code == 1, text
    assert f"the backend at http://127.0.0.1:{closed} could not be reached for 1 s" in text
    assert "not onboarded, exiting" in text


async def test_a_worker_stops_when_its_parent_dies(tmp_path: Path) -> None:
    async with hanging_backend() as (url, asked):
        # A parent that starts the worker (as cocoon up does) and then just waits.
        pid_file = tmp_path / "worker.pid"
        parent_code = (
            "import os, pathlib, subprocess, time\n"
            f"command = {worker_command(url)!r} + ['--parent-pid', str(os.getpid())]\n"
            "child = subprocess.Popen(command)\n"
            f"pathlib.Path({str(pid_file)!r}).write_text(str(child.pid))\n"
            "time.sleep(3600)\n"
        )
        log = tmp_path / "parent.log"
        parent = Proc([sys.executable, "-c", parent_code], base_env(tmp_path), log)
        try:
            await asyncio.wait_for(asked.wait(), BOUND_S)
            worker = int(pid_file.read_text())
            assert alive(worker)
            parent.signal(signal.SIGKILL)
            await wait_until(lambda: not alive(worker), "the orphaned worker to stop", parent)
        finally:
            parent.kill_everything()
    assert "stopped while onboarding" in parent.text()


async def test_a_worker_whose_parent_is_already_gone_stops_by_itself(tmp_path: Path) -> None:
    async with hanging_backend() as (url, _asked):
        gone = ended_pid()  # a pid that is not this worker's parent
        code, text = await worker_run(tmp_path, url, "--parent-pid", str(gone))
        assert code == 0, text
    assert f"the parent process {gone} is gone: stopping" in text


def ended_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


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
