"""A worker's tool calls, checked as they stream against what the turn's request allowed.

A worker is a stranger (DESIGN, "Trust and privacy"): the calls its engine read out of the reply
(:class:`workers.wire.ToolCallDelta` pieces, each call's name first, then fragments of its
arguments) are let through only when they are calls of an offered function (the named one,
with a named ``tool_choice``), numbered in order from 0, at most one without
``parallel_tool_calls``, with arguments within :data:`~workers.wire.MAX_TOOL_ARGUMENTS_CHARS`
that are, once whole, a JSON object. A turn that offered no function takes no call. Anything
else is a :class:`~backend.bounds.Flag` of kind ``tool_calls``: the turn reading it
(:class:`backend.turn_reading.TurnReading`) cuts the worker off as for any crossed bound (billed
only what it delivered, flagged, ``worker_misbehaved``), before anything is settled.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from backend.bounds import Flag, Violation
from workers.wire_tools import MAX_TOOL_ARGUMENTS_CHARS, MAX_TOOLS, ToolCallDelta, Tools

__all__ = ["CallCheck"]


class CallCheck:
    """The calls of one job's reply, checked piece by piece (see the module)."""

    def __init__(self, tools: Tools | None) -> None:
        if tools is None:
            self.names: frozenset[str] = frozenset()
            self.limit = 0
        else:
            self.names = frozenset(
                [tools.name] if tools.name else (f.name for f in tools.functions)
            )
            self.limit = MAX_TOOLS if tools.parallel else 1
        self.calls = 0
        self._arguments: list[str] = []  # the fragments of the last call's arguments
        self._size = 0

    def read(self, pieces: Sequence[ToolCallDelta] | None) -> Flag | None:
        """Take a chunk's pieces in; the flag of the first one that is not allowed, if any."""
        for piece in pieces or ():
            if piece.name is not None:  # the first piece of the next call
                if piece.index != self.calls or self.calls >= self.limit:
                    return self._flag(piece.index + 1)
                if piece.name not in self.names:
                    return self._flag(piece.index + 1)
                if (flag := self._last_whole()) is not None:  # the call before is whole now
                    return flag
                self.calls += 1
                self._arguments, self._size = [], 0
            elif piece.index != self.calls - 1:
                return self._flag(piece.index + 1)
            self._size += len(piece.arguments)
            if self._size > MAX_TOOL_ARGUMENTS_CHARS:
                return self._flag(self.calls)
            self._arguments.append(piece.arguments)
        return None

    def finish(self) -> Flag | None:
        """The reply has ended: the flag of a last call whose arguments are not a JSON object."""
        return self._last_whole()

    def _last_whole(self) -> Flag | None:
        if not self.calls:
            return None
        try:
            arguments = json.loads("".join(self._arguments))
        except ValueError:
            arguments = None
        return None if isinstance(arguments, dict) else self._flag(self.calls)

    def _flag(self, call: int) -> Flag:
        """Calls are counted from 1 in a flag; its bound is the most the request allowed."""
        return Flag(Violation.TOOL_CALLS, call, self.limit)
