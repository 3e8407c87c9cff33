"""What the engine tests (tests/test_engines.py for llama.cpp and the openai engine,
tests/test_vllm.py for vLLM) share: a one-message chat request, and a stream read to its end
with its shape checked (text deltas, then one Usage, last)."""

from __future__ import annotations

from typing import Any

from workers.engines import Engine, GenerationRequest, TextDelta, Usage

__all__ = ["chat", "collect", "stream"]


def chat(text: str, **kwargs: Any) -> GenerationRequest:
    """One user message; 8 tokens at most and greedy unless ``kwargs`` say otherwise."""
    kwargs.setdefault("max_tokens", 8)
    kwargs.setdefault("temperature", 0.0)
    return GenerationRequest(messages=[{"role": "user", "content": text}], **kwargs)


async def stream(engine: Engine, request: GenerationRequest) -> tuple[list[TextDelta], Usage]:
    """Run a request to the end; check the stream's shape (deltas, then one Usage, last)."""
    items = [item async for item in engine.generate(request)]
    assert items, "the stream was empty"
    usage = items[-1]
    assert isinstance(usage, Usage), f"the last item is {usage!r}, not a Usage"
    deltas = items[:-1]
    assert all(isinstance(item, TextDelta) and item.text for item in deltas), deltas
    return deltas, usage  # type: ignore[return-value]


async def collect(engine: Engine, request: GenerationRequest) -> tuple[str, Usage]:
    """:func:`stream`'s text and usage."""
    deltas, usage = await stream(engine, request)
    return "".join(delta.text for delta in deltas), usage
