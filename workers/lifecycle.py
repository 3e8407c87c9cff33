"""Stopping a long-running process: SIGINT (Ctrl-C) and SIGTERM (``docker stop``, systemd, most
process managers) are treated alike.

Every long-running command (``cocoon up``, ``web``, ``bot``, ``watcher``, ``ton payouts`` and
``worker``) runs under one :class:`Shutdown`, installed first thing in its event loop:

- the first signal sets ``stop``: the process takes no new work, lets what is running finish
  within its grace period, hands back or releases what it cannot finish, closes its
  connections and exits 0;
- a second signal sets ``force``: every grace period ends at once and the process exits with
  128 + the signal's number (130 after SIGINT, 143 after SIGTERM). Should it still be alive
  ``FORCE_EXIT_S`` later (a thread that cannot be interrupted), it is ended outright.

The handlers replace Python's default SIGINT handler and an inherited "ignore" alike (a
background job of a non-interactive shell starts with SIGINT ignored), so both signals always
work. A process can also be asked to stop from inside (:meth:`Shutdown.request`), e.g. when
its parent is gone (:func:`watch_parent`, :func:`die_with_parent`).

Standard library only: the worker node imports it without the operator's stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any, TypeVar

__all__ = [
    "DEFAULT_GRACE_S",
    "FORCE_EXIT_S",
    "REQUESTS_SHARE",
    "SETTLE_SHARE",
    "WORKER_SHARE",
    "Shutdown",
    "cancel_and_wait",
    "die_with_parent",
    "exit_within",
    "parent_death_preexec",
    "run_command",
    "watch_parent",
]

log = logging.getLogger("cocoon.lifecycle")

T = TypeVar("T")
FutureT = TypeVar("FutureT", bound="asyncio.Future[Any]")

DEFAULT_GRACE_S = 8.0
"""How long an operator process takes to stop, at most: under Docker's default 10 s."""

REQUESTS_SHARE = 0.4
"""Of the grace period: requests and bot updates in flight finish, then are cancelled."""

SETTLE_SHARE = 0.2
"""Of the grace period: turns cut short settle what was generated, else their holds are
released."""

WORKER_SHARE = 0.2
"""Of the grace period: the worker ``cocoon up`` started finishes its running jobs (the rest
is for closing connections and exiting)."""

FORCE_EXIT_S = 3.0
"""After a second signal, the process is ended outright if it is still alive this much later."""

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class Shutdown:
    """The stop requests of one process: ``stop`` (first signal), ``force`` (second signal)."""

    def __init__(
        self,
        grace_s: float = DEFAULT_GRACE_S,
        *,
        announce: Callable[[str], None] | None = None,
    ) -> None:
        if not grace_s >= 0:
            raise ValueError(f"the grace period must be 0 or more seconds, got {grace_s}")
        self.grace_s = grace_s
        self.stop = asyncio.Event()
        self.force = asyncio.Event()
        self.reason = ""  # what asked to stop: "SIGTERM", "SIGINT", or a sentence
        self.forced_by: signal.Signals | None = None
        self.stop_requested_at: float | None = None  # time.monotonic() of the first request
        self._announce = announce or log.info
        self._on_force: list[Callable[[], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- installing --------------------------------------------------------------------------

    def install(self) -> Shutdown:
        """Handle SIGINT and SIGTERM in the running event loop (until :meth:`uninstall`)."""
        loop = asyncio.get_running_loop()
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, self._on_signal, signum)
        self._loop = loop
        return self

    def uninstall(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            for signum in STOP_SIGNALS:
                self._loop.remove_signal_handler(signum)
        self._loop = None

    def on_force(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` (synchronously, in the loop) when a second signal arrives."""
        self._on_force.append(callback)

    # -- requests ----------------------------------------------------------------------------

    def request(self, reason: str) -> None:
        """Ask to stop as a first signal would (nothing happens when a stop is under way)."""
        if self.stop.is_set():
            return
        self.reason = reason
        self.stop_requested_at = time.monotonic()
        self.stop.set()
        self._announce(
            f"{reason}: stopping within {self.grace_s:g} s (a second signal stops at once)"
        )

    def _on_signal(self, signum: signal.Signals) -> None:
        name = signal.Signals(signum).name
        if not self.stop.is_set():
            self.request(name)
            return
        if self.force.is_set():
            return
        self.forced_by = signal.Signals(signum)
        self.force.set()
        self._announce(f"{name} again: stopping now")
        for callback in self._on_force:
            try:
                callback()
            except Exception:  # one failing callback must not keep the others from running
                log.exception("a stop callback failed")
        code = self.exit_code()
        watchdog = threading.Timer(FORCE_EXIT_S, os._exit, args=(code,))
        watchdog.daemon = True
        watchdog.start()

    # -- while stopping ----------------------------------------------------------------------

    @property
    def forced(self) -> bool:
        return self.force.is_set()

    def exit_code(self) -> int:
        """0 after a graceful stop; 128 + the signal's number after a forced one."""
        return 128 + int(self.forced_by) if self.forced_by is not None else 0

    def left(self) -> float:
        """Seconds left of the grace period (all of it before a stop; 0 once forced)."""
        if self.force.is_set():
            return 0.0
        if self.stop_requested_at is None:
            return self.grace_s
        return max(0.0, self.stop_requested_at + self.grace_s - time.monotonic())

    async def wait(self, tasks: Collection[FutureT], timeout_s: float) -> set[FutureT]:
        """Wait for ``tasks`` to end, for at most ``timeout_s``, and not past a second signal.
        Returns those still pending (the caller cancels them or lets them be)."""
        pending = {task for task in tasks if not task.done()}
        if not pending or self.force.is_set():
            return pending
        forced = asyncio.ensure_future(self.force.wait())
        ended = asyncio.ensure_future(asyncio.wait(pending))  # cancelling it cancels no task
        try:
            await asyncio.wait(
                [ended, forced], timeout=max(0.0, timeout_s), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            forced.cancel()
            ended.cancel()
        return {task for task in pending if not task.done()}

    async def run(self, main: Awaitable[T]) -> T | None:
        """Run ``main``, which watches ``stop`` itself and returns once it has stopped; after a
        stop request it gets what is left of the grace period, then is cancelled (None)."""
        task = asyncio.ensure_future(main)
        stopping = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait([task, stopping], return_when=asyncio.FIRST_COMPLETED)
            if await self.wait({task}, self.left()):
                if not self.forced:
                    log.warning("not stopped within the grace period: cancelled")
                await cancel_and_wait({task})
                return None
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            stopping.cancel()
        return task.result()


def exit_within(code: int, seconds: float = FORCE_EXIT_S) -> int:
    """Return ``code``, and end the process with it ``seconds`` from now if the interpreter's
    exit has not ended it by then: a thread that cannot be interrupted (a blocking Redis read
    on a connection a restart left half open) would otherwise keep a process that said it
    stopped alive for good, as the interpreter joins such threads before exiting."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    watchdog = threading.Timer(seconds, os._exit, args=(code,))
    watchdog.daemon = True
    watchdog.start()
    return code


def run_command(
    main: Callable[[Shutdown], Awaitable[int | None]],
    grace_s: float = DEFAULT_GRACE_S,
    *,
    announce: Callable[[str], None] | None = None,
) -> int:
    """``asyncio.run(main(shutdown))`` with SIGINT and SIGTERM handled from the start; the exit
    code: ``main``'s (0 when None), or 128 + the signal's number after a forced stop."""

    async def runner() -> int:
        shutdown = Shutdown(grace_s, announce=announce).install()
        try:
            code = await main(shutdown)
        finally:
            shutdown.uninstall()
        return shutdown.exit_code() or int(code or 0)

    return asyncio.run(runner())


async def cancel_and_wait(tasks: Collection[asyncio.Future[Any]]) -> None:
    """Cancel ``tasks`` and wait until they have ended (their errors are theirs to log)."""
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


# -- parent death ----------------------------------------------------------------------------


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(signum: int = signal.SIGTERM) -> bool:
    """Ask Linux to send ``signum`` to this process when the thread that started it ends
    (``prctl(PR_SET_PDEATHSIG)``). False where that is not available."""
    prctl = _prctl()
    return prctl is not None and prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0


def parent_death_preexec(signum: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` for :class:`subprocess.Popen` that makes the child get ``signum`` when
    the calling thread ends (Linux); None elsewhere. Start the child from the main thread."""
    prctl = _prctl()  # looked up here: the child only makes the call
    if prctl is None:
        return None

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)

    return preexec


async def watch_parent(parent_pid: int, shutdown: Shutdown, interval_s: float = 1.0) -> None:
    """Ask ``shutdown`` to stop once the process ``parent_pid`` is no longer this process's
    parent (it ended and this process was handed to another). Returns then, or at a stop."""
    while not shutdown.stop.is_set():
        if os.getppid() != parent_pid:
            shutdown.request(f"the parent process {parent_pid} is gone")
            return
        try:
            await asyncio.wait_for(shutdown.stop.wait(), interval_s)
        except TimeoutError:
            continue
