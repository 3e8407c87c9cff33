"""The OpenAI API's tool shapes: the functions a request offers, how it chooses among them, and
a call of one (in an assistant message of the prompt, or in a reply). Bounded: at most
:data:`MAX_TOOLS` tools, names of OpenAI's alphabet, parameters and arguments at most
:data:`MAX_TOOL_SCHEMA_CHARS` characters of JSON. What Cocoon does with them:
:mod:`backend.openai_api.tools`."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_TOOLS = 64
MAX_TOOL_SCHEMA_CHARS = 16_384
TOOL_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=TOOL_NAME)
    arguments: str = Field(default="{}", max_length=MAX_TOOL_SCHEMA_CHARS)


class ToolCall(BaseModel):
    """A call of a function, in an assistant message (the prompt) or a reply."""

    model_config = ConfigDict(extra="ignore")
    id: str = Field(max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall


class Function(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = Field(default=None, max_length=4096)
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _bounded(cls, parameters: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(parameters)) > MAX_TOOL_SCHEMA_CHARS:
            raise ValueError(f"parameters over {MAX_TOOL_SCHEMA_CHARS} characters of JSON")
        return parameters


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: Function


class NamedFunction(BaseModel):
    name: str = Field(pattern=TOOL_NAME)


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: NamedFunction
