"""What a turn costs, in nanoTON, from the model's prices per one million tokens, and how many
tokens a turn may generate when its client names no limit."""

from __future__ import annotations

from backend.settings import ModelPrice, Settings

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


def default_max_tokens(settings: Settings, price: ModelPrice) -> int:
    """A turn's reply budget when the client names none (the bot, the Mini App, an API call
    without ``max_tokens``): ``COCOON_MAX_TOKENS_DEFAULT``, at most half the model's context,
    so the prompt keeps the other half."""
    return max(1, min(settings.max_tokens_default, price.context_length // 2))


def affordable_completion_tokens(price: ModelPrice, available: int, *, prompt_tokens: int) -> int:
    """The most completion tokens whose worst case (``prompt_tokens`` uncached) ``available``
    covers: the largest ``c`` with ``worst_case_cost(price, prompt_tokens, c) <= available``
    (0 when not even the prompt is covered; the context length when tokens are free)."""
    budget = available * PER - prompt_tokens * price.prompt
    if budget < 0:
        return 0
    if price.completion <= 0:
        return price.context_length
    return min(budget // price.completion, price.context_length)
