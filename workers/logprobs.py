"""An engine's log probabilities as the wire carries them: within :mod:`workers.wire`'s bounds
(a token's text and bytes cut to ``MAX_TOKEN_CHARS`` each, ``-inf`` and anything lower sent as
``MIN_LOGPROB``, at most the alternatives the request asked for), whatever the engine gave."""

from __future__ import annotations

import math
from collections.abc import Iterable

from workers.engines.base import TokenLogprob as EngineLogprob
from workers.engines.base import TopToken
from workers.wire import MAX_TOKEN_CHARS, MIN_LOGPROB, TokenLogprob, TopLogprob


def _value(logprob: float) -> float:
    if math.isnan(logprob) or logprob < MIN_LOGPROB:
        return MIN_LOGPROB
    return min(logprob, 0.0)


def _top(token: TopToken) -> TopLogprob:
    return TopLogprob(
        token=token.token[:MAX_TOKEN_CHARS],
        logprob=_value(token.logprob),
        bytes=[b & 0xFF for b in token.bytes[:MAX_TOKEN_CHARS]],
    )


def to_wire(tokens: Iterable[EngineLogprob], top: int) -> list[TokenLogprob]:
    """``tokens`` as wire records, each with at most ``top`` alternatives."""
    records = []
    for token in tokens:
        head = _top(token)
        alternatives = [_top(t) for t in token.top[:top]]
        records.append(TokenLogprob(**head.model_dump(), top_logprobs=alternatives))
    return records
