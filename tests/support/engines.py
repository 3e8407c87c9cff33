"""What the engine tests (tests/test_engines.py for llama.cpp and the openai engine,
tests/test_vllm.py for vLLM) share: a one-message chat request, a stream read to its end with
its shape checked (text deltas, then one Usage, last), and the checks every engine passes."""

from __future__ import annotations

from typing import Any

from workers.engines import Engine, GenerationRequest, TextDelta, Usage

__all__ = ["assert_ends_its_turn", "assert_stop_string_cuts", "chat", "collect", "stream"]


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


async def assert_ends_its_turn(engine: Engine) -> None:
    """Asked to say hello, with room for much more, the model ends its turn by itself (and the
    chat template's end marker is not in the text)."""
    text, usage = await collect(engine, chat("Say hello.", max_tokens=200))
    assert text.strip()
    assert usage.finish_reason == "stop"
    assert 0 < usage.completion_tokens < 200
    assert "<|im_end|>" not in text


async def assert_stop_string_cuts(engine: Engine, max_tokens: int) -> None:
    """A stop string (the reply's third word) cuts the greedy reply just before it."""
    question = "List three fruits, one per line."
    full, _ = await collect(engine, chat(question, max_tokens=max_tokens))
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    cut, usage = await collect(engine, chat(question, max_tokens=max_tokens, stop=(stop,)))
    assert cut == full[: full.index(stop)]
    assert usage.finish_reason == "stop"
