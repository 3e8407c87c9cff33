"""What a worker may bill and send for one turn: the backend's own bounds, never the worker's word.

A worker is trusted only for what its attestation proves; its token counts, its reply's size and
its timing are checked here against bounds the backend computes from what it knows itself: the
prompt it sent, the turn's ``max_tokens``, and the reply text it actually received.

Billing (:func:`bill`), from the worker's signed final record:

* ``prompt_tokens`` ≤ :func:`prompt_token_bound` of the messages (the backend has no tokenizer:
  a token of byte-level BPE is at least one byte of UTF-8, plus the chat template's tokens around
  each message and before the reply, default system prompts included; with tools, the text the
  worker's chat template writes for the offered functions and for the calls and results in the
  messages, their JSON re-serialised as templates do) and ≤ the model's ``context_length``;
* ``completion_tokens`` ≤ ``max_tokens`` and ≤ the bytes of reply text delivered plus
  :data:`COMPLETION_SLACK_TOKENS` plus the longest stop string of the request (tokens an honest
  engine counts without delivering their text: the end-of-turn token, an unfinished UTF-8
  character, text held back as the start of a stop string, the stop string itself);
* ``cached_prompt_tokens`` ≤ the ``prompt_tokens`` billed.

A count over its bound is billed at the bound, and the turn carries a :class:`Flag` for it.

Replies (:class:`ReplyBounds`), from ``max_tokens``: the reply text's bytes (a token decodes to
at most :data:`BYTES_PER_TOKEN_MAX` bytes), one chunk's bytes, the number of chunks, and the
sealed bytes the stream reader may pull for the whole job (more when the turn asked for log
probabilities: each token's record, with its alternatives, :data:`LOGPROB_RECORD_BYTES` each).
A worker crossing one is cut off: the turn is billed :func:`delivered_floor` (the fewest tokens
the text delivered can be, no prompt), the rest of the hold goes back, and the worker is
flagged.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass

from workers.streams import MAX_CHUNK_CHARS, StreamLimits
from workers.wire import MAX_LOGPROBS_PER_CHUNK, MAX_TOKEN_CHARS, ChatMessage, FinalRecord
from workers.wire_tools import Tools

__all__ = [
    "BYTES_PER_TOKEN_MAX",
    "COMPLETION_SLACK_TOKENS",
    "Bill",
    "Flag",
    "ReplyBounds",
    "Violation",
    "bill",
    "completion_token_bound",
    "delivered_floor",
    "prompt_token_bound",
    "sealed_prompt_bound",
    "sealed_text_bound",
    "tools_token_bound",
]

MESSAGE_OVERHEAD_TOKENS = 8
"""Chat-template tokens a message can add around its text (role markers, separators)."""

PROMPT_TEMPLATE_TOKENS = 256
"""Chat-template tokens a prompt can carry besides its messages: the reply's header and a
default system prompt (SmolLM2's template makes a lone empty user message 30 tokens)."""

COMPLETION_SLACK_TOKENS = 32
"""Tokens an honest engine may count beyond the bytes of text it delivered (see the module)."""

BYTES_PER_TOKEN_MAX = 256
"""The most UTF-8 bytes one token's text can take (SmolLM2's longest token is 32 bytes; the
vocabularies of large models stay well under 256)."""

REPLY_BYTES_SLACK = 1024
"""Reply bytes allowed beyond ``max_tokens`` × :data:`BYTES_PER_TOKEN_MAX`."""

CHUNK_SLACK = 16
"""Chunks allowed beyond one per token (an engine's last flush of text it held back)."""

JSON_ESCAPE_MAX = 6
"""A character of text takes at most this many bytes per byte in the sealed JSON (``\\u0001``)."""

ENTRY_OVERHEAD_BYTES = 512
"""A sealed chunk's bytes besides its text: the sealed box, the JSON fields, the stream's."""

LAST_ENTRY_BYTES = 128 * 1024
"""The most a job's last entry (its final or error record) takes, sealed."""


class Violation(enum.StrEnum):
    """Which bound a worker crossed (the ``kind`` of a flag)."""

    PROMPT_TOKENS = "prompt_tokens"
    COMPLETION_TOKENS = "completion_tokens"
    REPLY_BYTES = "reply_bytes"
    CHUNK_BYTES = "chunk_bytes"
    CHUNKS = "chunks"
    DEADLINE = "deadline"
    SEQUENCE = "sequence"  # a chunk out of order: one missing, repeated or sent ahead
    TOOL_CALLS = "tool_calls"  # a call the request did not allow (backend.tool_checks)


@dataclass(frozen=True)
class Flag:
    """A bound a worker crossed in one turn: what it claimed or sent, and the bound."""

    kind: Violation
    claimed: int
    bound: int


@dataclass(frozen=True)
class Bill:
    """The token counts a turn is billed for, and the bounds the worker's final record crossed."""

    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    flags: tuple[Flag, ...] = ()


@dataclass(frozen=True)
class ReplyBounds:
    """How much reply one turn may get, from its ``max_tokens``."""

    text_bytes: int  # UTF-8 bytes of the reply text, all chunks together
    chunk_bytes: int  # UTF-8 bytes of one chunk's text
    chunks: int  # text chunks
    sealed_bytes: int  # the job's sealed stream entries together, as the reader pulls them
    sealed_entry_bytes: int  # one sealed stream entry

    @classmethod
    def for_max_tokens(cls, max_tokens: int, *, logprobs: int | None = None) -> ReplyBounds:
        """``logprobs``: the alternatives asked per token (None: no log probabilities), whose
        records (one per token, :data:`LOGPROB_RECORD_BYTES` each with each alternative) the
        chunks carry besides their text."""
        text = max_tokens * BYTES_PER_TOKEN_MAX + REPLY_BYTES_SLACK
        chunk = min(text, MAX_CHUNK_CHARS * 4)
        chunks = max_tokens + CHUNK_SLACK + text // MAX_CHUNK_CHARS + 1
        per_token = 0 if logprobs is None else (1 + logprobs) * LOGPROB_RECORD_BYTES
        if logprobs is not None:
            chunks += max_tokens // MAX_LOGPROBS_PER_CHUNK + 1
        records = (max_tokens + COMPLETION_SLACK_TOKENS) * per_token
        return cls(
            text_bytes=text,
            chunk_bytes=chunk,
            chunks=chunks,
            sealed_bytes=JSON_ESCAPE_MAX * text
            + records
            + chunks * ENTRY_OVERHEAD_BYTES
            + LAST_ENTRY_BYTES,
            sealed_entry_bytes=max(
                JSON_ESCAPE_MAX * chunk + MAX_LOGPROBS_PER_CHUNK * per_token + ENTRY_OVERHEAD_BYTES,
                LAST_ENTRY_BYTES,
            ),
        )

    def stream_limits(self, deadline: float | None) -> StreamLimits:
        """What the stream reader accepts for one job of the turn (its chunks and last entry)."""
        return StreamLimits(
            total_bytes=self.sealed_bytes,
            entry_bytes=self.sealed_entry_bytes,
            entries=self.chunks + 1,
            deadline=deadline,
        )


IMAGE_TOKEN_BOUND = 8192
"""The most prompt tokens one image may count (vision models tile a large image into many)."""


TOOLS_PROMPT_TOKENS = 512
"""The chat template's words that introduce the offered functions and say how to call them (the
shipped Hermes template's and the worker's fallback's are under 450 bytes)."""

TOOL_OVERHEAD_TOKENS = 96
"""The JSON around one offered function as a template writes it (``{"type": "function",
"function": {"name": ..., "description": ..., "parameters": ...}}``: 72 bytes)."""

TOOL_CALL_OVERHEAD_TOKENS = 64
"""The text around one call in an assistant message (``<tool_call>{"name": ..., "arguments":
...}</tool_call>`` and its newlines: 52 bytes), or around a tool's result (``<tool_response>``)."""

_HTML_UNSAFE = str.maketrans("", "", "<>&'")


def rendered_json_bytes(text: str) -> int:
    """The most UTF-8 bytes a chat template writes for a JSON text it is given (a function's
    parameters, a call's arguments): the value re-serialised by ``tojson``, with ``", "`` and
    ``": "`` between items, either as UTF-8 (transformers) or ASCII-escaped with ``<>&'`` as
    ``\\u`` escapes (Jinja's); text that does not parse is written as a JSON string."""
    try:
        value = json.loads(text)
    except ValueError:
        value = text
    escaped = json.dumps(value)
    unsafe = len(escaped) - len(escaped.translate(_HTML_UNSAFE))
    return max(len(escaped) + 5 * unsafe, len(json.dumps(value, ensure_ascii=False).encode()))


def _message_tokens(m: ChatMessage) -> int:
    calls = m.tool_calls or ()
    return (
        len(m.content.encode())
        + MESSAGE_OVERHEAD_TOKENS
        + IMAGE_TOKEN_BOUND * len(m.images or ())
        + sum(
            TOOL_CALL_OVERHEAD_TOKENS + len(c.id) + len(c.name) + rendered_json_bytes(c.arguments)
            for c in calls
        )
        + (TOOL_CALL_OVERHEAD_TOKENS + len(m.tool_call_id) if m.tool_call_id else 0)
    )


def tools_token_bound(tools: Tools | None) -> int:
    """An upper bound on the tokens the offered functions add to the prompt (0 with none)."""
    if tools is None:
        return 0
    return TOOLS_PROMPT_TOKENS + sum(
        TOOL_OVERHEAD_TOKENS
        + len(f.name)
        + rendered_json_bytes(json.dumps(f.description))
        + rendered_json_bytes(f.parameters)
        for f in tools.functions
    )


def prompt_token_bound(messages: Sequence[ChatMessage], tools: Tools | None = None) -> int:
    """An upper bound on the prompt's tokens without a tokenizer: byte-level BPE tokens are at
    least one byte each, plus the chat template's tokens around each message and the prompt,
    plus :data:`IMAGE_TOKEN_BOUND` for each image; with ``tools``, the text the worker's chat
    template writes for them (:func:`tools_token_bound`) and for the calls and results in the
    messages."""
    return (
        sum(_message_tokens(m) for m in messages)
        + PROMPT_TEMPLATE_TOKENS
        + tools_token_bound(tools)
    )


LOGPROB_RECORD_BYTES = JSON_ESCAPE_MAX * MAX_TOKEN_CHARS + 4 * MAX_TOKEN_CHARS + 128
"""The most bytes one token's log probability record (or one alternative) takes in a sealed
chunk: its text JSON-escaped, its bytes as a JSON list, the log probability and the keys."""

SEALED_BOX_OVERHEAD = 48
"""Bytes a libsodium sealed box adds to its plaintext (ephemeral key and MAC)."""


def sealed_prompt_bound(sealed_bytes: int) -> int:
    """:func:`prompt_token_bound` from the length of a sealed request alone: its JSON holds every
    message's text and at least 8 bytes more per message (``{"content":"","role":"user"}``),
    so the plaintext's length bounds the sum that function takes."""
    return max(0, sealed_bytes - SEALED_BOX_OVERHEAD) + PROMPT_TEMPLATE_TOKENS


def sealed_text_bound(sealed_bytes: int) -> int:
    """The most reply text bytes a stream entry of ``sealed_bytes`` can carry: JSON holds the
    text at least once, escaped or not, beside 52 bytes or more of a chunk's other fields, and
    the entry adds 17 more (:data:`workers.stream_crypto.ENTRY_OVERHEAD`; the first entry 113),
    so taking :data:`SEALED_BOX_OVERHEAD` off still leaves a bound."""
    return max(0, sealed_bytes - SEALED_BOX_OVERHEAD)


def completion_token_bound(max_tokens: int, delivered_bytes: int, stop: Sequence[str]) -> int:
    """The most completion tokens a reply of ``delivered_bytes`` bytes of text can have cost."""
    longest_stop = max((len(s.encode()) for s in stop), default=0)
    return min(max_tokens, delivered_bytes + COMPLETION_SLACK_TOKENS + longest_stop)


def delivered_floor(delivered_bytes: int, max_tokens: int) -> int:
    """The fewest tokens ``delivered_bytes`` bytes of text can be: what a turn cut off for
    crossing a bound is billed (its prompt is not billed)."""
    return min(max_tokens, -(-delivered_bytes // BYTES_PER_TOKEN_MAX))


def bill(
    final: FinalRecord,
    *,
    messages: Sequence[ChatMessage],
    stop: Sequence[str],
    max_tokens: int,
    context_length: int,
    delivered_bytes: int,
    prompt_bound: int | None = None,
    tools: Tools | None = None,
) -> Bill:
    """The counts to bill for ``final``: each at most its bound (see the module).

    ``prompt_bound``: the prompt's bound when the backend cannot read the messages (a sealed
    turn: :func:`sealed_prompt_bound` of the ciphertext's length); ``tools``: the functions the
    request offered, whose text the worker's template wrote into the prompt."""
    flags: list[Flag] = []

    def bounded(kind: Violation, claimed: int, bound: int) -> int:
        if claimed <= bound:
            return claimed
        flags.append(Flag(kind, claimed, bound))
        return bound

    prompt = bounded(
        Violation.PROMPT_TOKENS,
        final.prompt_tokens,
        min(
            prompt_bound if prompt_bound is not None else prompt_token_bound(messages, tools),
            context_length,
        ),
    )
    completion = bounded(
        Violation.COMPLETION_TOKENS,
        final.completion_tokens,
        completion_token_bound(max_tokens, delivered_bytes, stop),
    )
    return Bill(
        prompt_tokens=prompt,
        cached_prompt_tokens=min(final.cached_prompt_tokens, prompt),
        completion_tokens=completion,
        flags=tuple(flags),
    )
