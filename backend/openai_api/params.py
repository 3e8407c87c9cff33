"""What a chat completion request may carry besides messages and the sampling Cocoon honours:
``null`` read as "the default" wherever OpenAI allows it, and every parameter the engines cannot
honour refused with a 400 that names it (never silently ignored).

OpenAI's SDKs send ``null`` for a parameter left ``None`` (openai-python does for ``temperature``,
``top_p``, ``n``, ``stream``...): :func:`drop_nulls` removes those before validation, so the
request model's defaults apply. :func:`refuse_unsupported` then looks at what the request model
does not carry and refuses, by name, each parameter that would change the reply if it were
honoured: the legacy ``functions``, audio, predictions. (``response_format``, the penalties,
``logit_bias``, log probabilities, tools and an assistant prefill are honoured: the request
model carries them; an engine that cannot give log probabilities refuses them, a 400.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from backend.errors import ErrorCode
from backend.openai_api.protocol import ApiError

NULL_MEANS_DEFAULT = frozenset(
    {
        "temperature",
        "top_p",
        "n",
        "stream",
        "stream_options",
        "stop",
        "seed",
        "max_tokens",
        "max_completion_tokens",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "response_format",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "user",
        "metadata",
        "store",
        "service_tier",
        "functions",
        "function_call",
        "modalities",
        "prediction",
        "audio",
        "web_search_options",
        "reasoning_effort",
    }
)
"""Top-level fields whose ``null`` is read as absent."""

NO_EFFECT = frozenset({"user", "metadata", "store", "service_tier", "safety_identifier"})
"""Accepted and not acted on: they do not change the reply (an end-user id, tags, storage of
the completion on OpenAI's side, a billing tier)."""

UNSUPPORTED = "{param} is not supported by this server"


def _refuse(param: str, why: str | None = None) -> ApiError:
    message = UNSUPPORTED.format(param=param) + (f": {why}" if why else "")
    return ApiError(ErrorCode.INVALID_REQUEST, message, param=param)


def drop_nulls(raw: object) -> object:
    """``raw`` with its top-level ``null`` values of :data:`NULL_MEANS_DEFAULT` removed."""
    if not isinstance(raw, Mapping):
        return raw
    return {k: v for k, v in raw.items() if not (v is None and k in NULL_MEANS_DEFAULT)}


def refuse_unsupported(raw: object) -> None:
    """ApiError (400, ``param`` set) for the first parameter of ``raw`` that cannot be honoured.
    ``raw`` is the body after :func:`drop_nulls`; anything not a JSON object is left to the
    request model to refuse."""
    if not isinstance(raw, Mapping):
        return
    _refuse_sampling_extras(raw)
    _refuse_output_shapes(raw)
    messages = raw.get("messages")
    if isinstance(messages, list):
        _refuse_messages(messages)


def _refuse_sampling_extras(raw: Mapping[str, Any]) -> None:
    if "prediction" in raw:
        raise _refuse("prediction")
    if "audio" in raw:
        raise _refuse("audio")
    if raw.get("modalities") not in (None, ["text"]):
        raise _refuse("modalities", 'only ["text"]')
    if "web_search_options" in raw:
        raise _refuse("web_search_options")
    if "reasoning_effort" in raw:
        raise _refuse("reasoning_effort")


def _refuse_output_shapes(raw: Mapping[str, Any]) -> None:
    if raw.get("functions") not in (None, []):
        raise _refuse("functions", "use tools")
    if raw.get("function_call") not in (None, "none", "auto"):
        raise _refuse("function_call")


def _refuse_messages(messages: list[Any]) -> None:
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            continue  # the request model refuses it, by place
        if message.get("role") == "function":
            raise _refuse(f"messages[{index}].role", "'function' messages: use 'tool'")
        for name in ("function_call", "audio"):
            if message.get(name) not in (None, []):
                raise _refuse(f"messages[{index}].{name}")
