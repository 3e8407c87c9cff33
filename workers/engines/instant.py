"""The instant engine: NO MODEL. For benchmarks and tests of the job queue only.

It "answers" by echoing the words of the last user message back as deltas, as fast as the event
loop allows (or with ``token_delay`` seconds between words). A "token" here is a
whitespace-separated word: ``prompt_tokens`` counts the words of all messages,
``completion_tokens`` the words echoed. Use it to measure the queue, dispatch, sealing and
streaming path without a model's cost; never register a worker running it for real users.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from workers.engines.base import (
    Engine,
    EngineError,
    FinishReason,
    GenerationRequest,
    RequestRefused,
    TextDelta,
    Usage,
)


class InstantEngine(Engine):
    """Echo engine for benchmarks and tests of the queue (no model, no inference).

    Options: ``token_delay`` (seconds to wait before each word; default 0: just yield to the
    event loop), ``max_concurrency`` (default 1024).
    """

    name = "instant"
    version = "1"

    def __init__(
        self, model: str, *, token_delay: float = 0.0, max_concurrency: int = 1024
    ) -> None:
        if token_delay < 0:
            raise ValueError(f"token_delay must not be negative, got {token_delay}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self.model = model
        self.token_delay = token_delay
        self.max_concurrency = max_concurrency
        self._started = False
        self._closed = False

    async def start(self) -> None:
        if self._closed:
            raise EngineError("the instant engine was closed; create a new one")
        self._started = True

    async def close(self) -> None:
        self._closed = True
        self._started = False

    def attested_config(self) -> dict[str, Any]:
        return {"token_delay": self.token_delay}

    def count_prompt_tokens(
        self, messages: list[dict[str, str]], *, chat_template: bool = True
    ) -> int:
        return sum(len(m["content"].split()) for m in messages)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TextDelta | Usage]:
        if not self._started:
            raise EngineError("the instant engine is not started (await engine.start() first)")
        if request.logprobs is not None:
            raise RequestRefused("logprobs: the instant engine has no model to give them")
        prompt_tokens = self.count_prompt_tokens(request.messages)
        last_user = next(
            (m["content"] for m in reversed(request.messages) if m["role"] == "user"), ""
        )
        words = last_user.split()
        echoed = words[: request.max_tokens]
        for index, word in enumerate(echoed):
            # Sleeping (even for 0 s) yields to the loop, so consumers can cancel between words.
            await asyncio.sleep(self.token_delay)
            if self._closed or request.stop_requested():
                yield Usage(prompt_tokens, 0, index, "cancelled")
                return
            yield TextDelta(word if index == 0 else " " + word)
        finish: FinishReason = "length" if len(words) > request.max_tokens else "stop"
        yield Usage(prompt_tokens, 0, len(echoed), finish)
