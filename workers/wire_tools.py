"""The wire contract's tool models (:mod:`workers.wire` re-exports them): the functions a
request offers, a call in an assistant message of the prompt, and the pieces of a reply's calls
as the worker streams them. Light like the wire module: pydantic only. How the engines use them:
:mod:`workers.engines.tools`; how the backend checks a worker's calls: backend/tool_checks.py."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class WireModel(BaseModel):
    """What every wire model is: frozen, strict, no field it does not know."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def drop_none(data: Any, *names: str) -> Any:
    """Fields added after the first wire version are written only when given."""
    if isinstance(data, dict):
        for name in names:
            if data.get(name) is None:
                data.pop(name, None)
    return data


MAX_TOOLS = 64
"""The most functions one request may offer, and the most calls one reply or message holds."""
MAX_TOOL_ARGUMENTS_CHARS = 16_384
"""The longest arguments (JSON text) of one call, and parameters schema of one function."""
TOOL_NAME = r"^[A-Za-z0-9_-]{1,64}$"
TOOL_CALL_ID = r"^[A-Za-z0-9_.:-]{1,128}$"


class ToolCall(WireModel):
    """A call of a function in an assistant message of the prompt: ``arguments`` is its JSON
    object's text, as OpenAI sends it."""

    id: str = Field(pattern=TOOL_CALL_ID)
    name: str = Field(pattern=TOOL_NAME)
    arguments: str = Field(default="{}", max_length=MAX_TOOL_ARGUMENTS_CHARS)


class ToolSpec(WireModel):
    """A function the model may call: ``parameters`` is its JSON schema's text."""

    name: str = Field(pattern=TOOL_NAME)
    description: str = Field(default="", max_length=4096)
    parameters: str = Field(default='{"type":"object"}', max_length=MAX_TOOL_ARGUMENTS_CHARS)


class Tools(WireModel):
    """The functions a request offers and how the reply may call them: ``choice`` "auto" (the
    model decides) or "required" (at least one call; with ``name``, of that function only);
    ``parallel`` False: at most one call."""

    functions: list[ToolSpec] = Field(min_length=1, max_length=MAX_TOOLS)
    choice: Literal["auto", "required"] = "auto"
    name: str | None = Field(default=None, pattern=TOOL_NAME)
    parallel: bool = True

    @model_validator(mode="after")
    def _named_is_offered(self) -> Tools:
        if self.name is not None and (
            self.choice != "required" or self.name not in {f.name for f in self.functions}
        ):
            raise ValueError("a named tool choice is required and among the functions")
        return self


class ToolCallDelta(WireModel):
    """A piece of a reply's call, as OpenAI streams it: the first piece of call ``index``
    names the function, the next ones carry fragments of its arguments' JSON text."""

    index: int = Field(ge=0, lt=MAX_TOOLS)
    name: str | None = Field(default=None, pattern=TOOL_NAME)
    arguments: str = Field(default="", max_length=MAX_TOOL_ARGUMENTS_CHARS)
