"""The lifecycle tests' harness (tests/test_lifecycle.py, test_lifecycle_services.py): real
`cocoon` processes in process groups of their own, their descendants and ports, waits bounded by
``BOUND_S`` (upper bounds on events, never speed assertions), the ledger audit of a data
directory, and a turn streaming while a signal arrives."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from backend.db import Database
from backend.invariants import InvariantReport, check_invariants

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
