"""What a turn costs, in nanoTON, from the model's prices per one million tokens."""

from __future__ import annotations

from backend.settings import ModelPrice

PER = 1_000_000


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def turn_cost(
    price: ModelPrice, *, prompt_tokens: int, cached_prompt_tokens: int, completion_tokens: int
) -> int:
    """The cost of one turn: one rounding, up, over the exact total (never per token)."""
    if min(prompt_tokens, cached_prompt_tokens, completion_tokens) < 0:
        raise ValueError("token counts cannot be negative")
    cached = min(cached_prompt_tokens, prompt_tokens)
    cached_price = price.cached_prompt if price.cached_prompt is not None else price.prompt
    exact = (
        (prompt_tokens - cached) * price.prompt
        + cached * cached_price
        + completion_tokens * price.completion
    )
    return _ceil_div(exact, PER)


def worst_case_cost(price: ModelPrice, *, prompt_tokens: int, max_tokens: int) -> int:
    """The most a turn can cost: the whole prompt uncached and every allowed token generated."""
    return turn_cost(
        price, prompt_tokens=prompt_tokens, cached_prompt_tokens=0, completion_tokens=max_tokens
    )
