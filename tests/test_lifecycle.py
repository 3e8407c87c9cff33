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
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from tests.support.lifecycle import (
    BOUND_S,
    GRACE_S,
    MODEL,
    Proc,
    StreamingTurn,
    alive,
    assert_all_gone,
    audit,
    base_env,
    cocoon,
    descendants,
    port_open,
    wait_until,
)
from tests.support.ops import free_port

pytestmark = pytest.mark.slow


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
