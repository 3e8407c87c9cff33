"""Reading one turn's reply, held to the turn's bounds (:mod:`backend.bounds`): each stream
entry opened in its place under the job's stream key (:mod:`workers.stream_crypto`: agreed with
the job's reply key, signed by the worker's attested key), each chunk
counted against the bytes, chunk size and chunk count the turn allows, the stream against its
absolute deadline; a worker crossing one is cut off (billed only what it delivered within the
bounds, flagged, the turn ended with ``worker_misbehaved``), and so is a worker whose tool
calls the request did not allow (:mod:`backend.tool_checks`). Chunks must come in the order
the worker numbered them (``seq`` 0, 1, 2, ...): a gap, a repeat or a reorder would drop or
double text without anyone noticing, so it is the worker's fault like a crossed bound. The
reading half of
:class:`backend.dispatch.Turn`."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import NoReturn, Protocol

import nacl.public
import redis

from backend import bounds
from backend.bounds import Bill, Flag, Violation
from backend.errors import ErrorCode
from backend.settlement import SettlingDispatcher, TurnSettlement
from backend.tool_checks import CallCheck
from backend.turns import TurnError
from workers import streams
from workers.stream_bell import StreamBell
from workers.stream_crypto import StreamOpener
from workers.wire import ErrorRecord, FinalRecord, StreamChunk, WireError

__all__ = ["ReadingDispatcher", "TurnReading"]

log = logging.getLogger("cocoon.dispatch")

_STREAM_VIOLATIONS = {
    "total_bytes": Violation.REPLY_BYTES,
    "entry_bytes": Violation.CHUNK_BYTES,
    "entries": Violation.CHUNKS,
    "deadline": Violation.DEADLINE,
}


class ReadingDispatcher(SettlingDispatcher, Protocol):
    """What reading a turn's reply uses of its dispatcher (:class:`backend.dispatch.Dispatcher`)."""

    clock: Callable[[], float]
    first_token_timeout_s: float
    idle_timeout_s: float
    queue_ttl_s: int
    job_timeout_s: int
    deadline_grace_s: float
    bell: StreamBell


class TurnReading(TurnSettlement):
    """The reading half of :class:`backend.dispatch.Turn`. The turn holds the state declared
    here and in :class:`~backend.settlement.TurnSettlement`."""

    d: ReadingDispatcher
    bounds: bounds.ReplyBounds
    _reply_key: nacl.public.PrivateKey
    _opener: StreamOpener
    _reading_since: float
    _chunks: int
    _next_seq: int
    _calls: CallCheck

    async def _job_events(self) -> AsyncIterator[StreamChunk | FinalRecord | ErrorRecord]:
        """The job's events, opened and held to the turn's bounds. Reading resumes where it
        stopped (a client that leaves hands the rest of the stream to the settling task). A
        worker crossing a bound ends the turn here (:meth:`_cut_off`)."""
        assert self.worker is not None
        reader = self._reader
        if reader is None or reader.job_id != self.job_id:
            reader = self._reader = self._new_reader()
            self._opener = StreamOpener(self._reply_key, self.worker.verify_key, self.job_id)
        opener = self._opener
        try:
            async for blob in reader.entries():
                try:
                    event = opener.open(blob)
                except WireError as error:
                    log.warning("turn %s: refused an event: %s", self.turn_id, error)
                    raise TurnError(
                        ErrorCode.WORKER_ERROR, "the worker sent a reply that does not verify"
                    ) from None
                if isinstance(event, StreamChunk):
                    if event.seq != self._next_seq:  # a chunk lost, repeated or reordered
                        await self._cut_off(Flag(Violation.SEQUENCE, event.seq, self._next_seq))
                    self._next_seq += 1
                    flag = self._calls.read(event.tool_calls) or self._over_bounds(event)
                    if flag is not None:
                        await self._cut_off(flag)
                elif isinstance(event, FinalRecord) and (flag := self._calls.finish()):
                    await self._cut_off(flag)
                yield event
        except streams.StreamOverrun as overrun:
            await self._cut_off(self._stream_flag(overrun))

    def _new_reader(self) -> streams.StreamReader:
        """A reader for the job just dispatched. Its deadline: the job may wait for a worker
        until the first-token timeout (or its queue TTL), then run for the job timeout."""
        d = self.d
        self._delivered_bytes = 0
        self._chunks = 0
        self._next_seq = 0
        self._calls = CallCheck(self.request.tools)
        self._reading_since = d.clock()
        waiting = min(d.first_token_timeout_s, d.queue_ttl_s)
        deadline = self._reading_since + waiting + d.job_timeout_s + d.deadline_grace_s
        return streams.StreamReader(
            d.redis,
            self.job_id,
            first_timeout_s=d.first_token_timeout_s,
            idle_timeout_s=d.idle_timeout_s,
            limits=self.bounds.stream_limits(deadline),
            clock=d.clock,
            bell=d.bell,
        )

    def _over_bounds(self, chunk: StreamChunk) -> Flag | None:
        """Count a chunk in; the bound it crosses, if it crosses one (then it is not counted)."""
        size = self._reply_size(chunk.reply_text())
        b = self.bounds
        if size > b.chunk_bytes:
            return Flag(Violation.CHUNK_BYTES, size, b.chunk_bytes)
        if self._delivered_bytes + size > b.text_bytes:
            return Flag(Violation.REPLY_BYTES, self._delivered_bytes + size, b.text_bytes)
        if self._chunks + 1 > b.chunks:
            return Flag(Violation.CHUNKS, self._chunks + 1, b.chunks)
        self._delivered_bytes += size
        self._chunks += 1
        return None

    def _stream_flag(self, overrun: streams.StreamOverrun) -> Flag:
        """The flag of a bound the reader saw crossed (a deadline in whole seconds of the job)."""
        kind = _STREAM_VIOLATIONS[overrun.kind]
        if kind is Violation.DEADLINE and self._reader is not None:
            allowed = (self._reader.limits.deadline or 0.0) - self._reading_since
            return Flag(kind, int(allowed) + overrun.seen, int(allowed))
        return Flag(kind, overrun.seen, overrun.limit)

    async def _cut_off(self, flag: Flag) -> NoReturn:
        """The worker crossed a bound: stop reading and stop its job, bill only the text it
        delivered within the bounds (the fewest tokens that text can be, no prompt), give the
        rest of the hold back, flag the worker, and end the turn with ``worker_misbehaved``."""
        log.warning(
            "turn %s job %s: the worker crossed its %s bound (%d > %d); cut off",
            self.turn_id,
            self.job_id,
            flag.kind.value,
            flag.claimed,
            flag.bound,
        )
        with contextlib.suppress(redis.RedisError):
            await streams.request_cancel(self.d.redis, self.job_id)
        completion = bounds.delivered_floor(self._delivered_bytes, self.max_tokens)
        self.end_outcome = "failed"
        if completion:
            await self._charge(Bill(0, 0, completion), "cancelled", outcome="failed")
        else:
            await self.release()
        await self._flag((flag,))
        if flag.kind is Violation.SEQUENCE:
            broke = f"sent chunk {flag.claimed} where chunk {flag.bound} was due"
        elif flag.kind is Violation.TOOL_CALLS:
            broke = f"sent a tool call this request did not allow (call {flag.claimed})"
        else:
            broke = f"broke this turn's {flag.kind.value} bound ({flag.claimed} > {flag.bound})"
        raise TurnError(
            ErrorCode.WORKER_MISBEHAVED,
            f"the worker {broke} and was stopped; you paid only for the text it delivered",
            kind=flag.kind.value,
        )
