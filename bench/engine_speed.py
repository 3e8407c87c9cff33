"""Measure an engine: load time, resident memory after load, and generation speed.

    .venv/bin/python -m bench.engine_speed                      # llama-cpp, SmolLM2-135M
    .venv/bin/python -m bench.engine_speed --engine instant --tokens 128
    .venv/bin/python -m bench.engine_speed --concurrency 4      # 4 requests at once

Reports, per run: time to first token, completion tokens, decode speed (tokens/s after the
first token) and end-to-end tokens/s. Generation is greedy with no stop, so the model writes
until ``--tokens`` (unless it ends its turn first; the prompt asks for a long text).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from workers.engines import DEFAULT_MODEL, GenerationRequest, TextDelta, Usage, create_engine

PROMPT = "Write a long, detailed essay about the history of sailing ships."


def rss_mib() -> float:
    """Resident set size of this process now, in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def one_run(
    engine_name: str, engine: object, tokens: int, prompt: str
) -> tuple[float, float, Usage]:
    request = GenerationRequest(
        messages=[{"role": "user", "content": prompt}], max_tokens=tokens, temperature=0.0
    )
    started = time.perf_counter()
    first: float | None = None
    usage: Usage | None = None
    async for item in engine.generate(request):  # type: ignore[attr-defined]
        if isinstance(item, TextDelta) and first is None:
            first = time.perf_counter()
        elif isinstance(item, Usage):
            usage = item
    ended = time.perf_counter()
    assert usage is not None, f"{engine_name} gave no usage"
    return (first or ended) - started, ended - started, usage


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="llama-cpp")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="llama-cpp n_threads")
    parser.add_argument(
        "--prompt-filler",
        type=int,
        default=0,
        help="prepend this many words of filler text to the prompt (measures prompt speed)",
    )
    args = parser.parse_args()

    filler = " ".join(f"word{i % 100}" for i in range(args.prompt_filler))
    prompt = f"{filler}\n\n{PROMPT}" if filler else PROMPT
    options = {"n_threads": args.threads} if args.engine == "llama-cpp" and args.threads else {}
    before = rss_mib()
    engine = create_engine(args.engine, args.model, **options)
    started = time.perf_counter()
    await engine.start()
    load = time.perf_counter() - started
    print(f"engine {engine.name} {engine.version}, model {engine.model}")
    threads = getattr(engine, "n_threads", None)
    print(f"load {load:.2f} s; RSS {before:.0f} MiB before, {rss_mib():.0f} MiB after load", end="")
    print(f"; n_threads {threads}" if threads else "")
    try:
        for run in range(1, args.runs + 1):
            if args.prompt_filler:  # change the prompt's start: no prefix-cache hit
                prompt = f"run {run} " + prompt
            started = time.perf_counter()
            results = await asyncio.gather(
                *(
                    one_run(args.engine, engine, args.tokens, prompt)
                    for _ in range(args.concurrency)
                )
            )
            wall = time.perf_counter() - started
            total = sum(usage.completion_tokens for _, _, usage in results)
            for first, elapsed, usage in results:
                decode = (usage.completion_tokens - 1) / max(elapsed - first, 1e-9)
                fresh = usage.prompt_tokens - usage.cached_prompt_tokens
                print(
                    f"run {run}: prompt {usage.prompt_tokens} tok "
                    f"(cached {usage.cached_prompt_tokens}), first token {first * 1000:.0f} ms "
                    f"({fresh / first:.0f} prompt tok/s), "
                    f"{usage.completion_tokens} tok ({usage.finish_reason}) in {elapsed:.2f} s: "
                    f"decode {decode:.1f} tok/s, end-to-end {usage.completion_tokens / elapsed:.1f}"
                    " tok/s"
                )
            if args.concurrency > 1:
                print(f"run {run}: {total} tokens in {wall:.2f} s = {total / wall:.1f} tok/s total")
        print(f"RSS after generation {rss_mib():.0f} MiB")
    finally:
        await engine.close()


if __name__ == "__main__":
    asyncio.run(main())
