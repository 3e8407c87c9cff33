"""A PDF's text for the prompt, read with pypdf in a child process whose work is bounded.

A PDF from a chat is untrusted input: a page tree of millions of pages, a stream that inflates to
gigabytes, a content stream that takes minutes to walk, an encrypted file, garbage. So the bot
never parses one in its own process. :func:`pdf_text` hands the bytes to ``python -m bot.pdf``
on stdin (nothing is written to disk) and reads one JSON line back. The child runs under an
address-space and CPU-time limit (``setrlimit``); the parent kills it at ``timeout_s``; at most
:data:`CONCURRENT` run at once. The child reads at most ``max_pages`` pages and stops extracting
as soon as the text passes ``max_chars``. The result says what happened, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import sys
import weakref
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger("cocoon.bot.pdf")

MAX_PDF_BYTES = 8 * 1024 * 1024
"""The largest PDF the bot downloads and reads."""
MAX_PAGES = 200
"""A PDF with more pages is refused (its text would not fit a message anyway)."""
TIMEOUT_S = 20.0
"""Wall-clock time the child gets, parsing and extraction together."""
CPU_S = 15
"""CPU seconds the child may use (RLIMIT_CPU)."""
MEMORY_BYTES = 768 * 1024 * 1024
"""The child's address space (RLIMIT_AS): an inflating stream fails instead of eating RAM."""
CONCURRENT = 2
"""PDFs read at once in one bot process; more wait their turn."""

Outcome = Literal["ok", "encrypted", "pages", "long", "empty", "unreadable", "timeout"]


@dataclass(frozen=True)
class PdfText:
    outcome: Outcome
    text: str = ""
    pages: int = 0


_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


def _slot() -> asyncio.Semaphore:
    """This event loop's semaphore of :data:`CONCURRENT` readers."""
    loop = asyncio.get_running_loop()
    if loop not in _slots:
        _slots[loop] = asyncio.Semaphore(CONCURRENT)
    return _slots[loop]


async def pdf_text(
    data: bytes,
    *,
    max_chars: int,
    max_pages: int = MAX_PAGES,
    timeout_s: float = TIMEOUT_S,
) -> PdfText:
    """The text of the PDF ``data``, or why there is none to read."""
    async with _slot():
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot.pdf",
            str(max_chars),
            str(max_pages),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            cwd=_package_root(),
        )
        try:
            async with asyncio.timeout(timeout_s):
                out, _err = await process.communicate(data)
        except TimeoutError:
            return PdfText("timeout")
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
    try:
        answer = json.loads(out.decode("utf-8"))
        outcome = answer["outcome"]
        text, pages = str(answer.get("text", "")), int(answer.get("pages", 0))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        # Killed by its limits (memory, CPU) or crashed: the file is the cause.
        log.info("a PDF's reader ended with code %s", process.returncode)
        return PdfText("unreadable")
    if outcome not in {"ok", "encrypted", "pages", "long", "empty", "unreadable"}:
        return PdfText("unreadable")
    return PdfText(outcome, text[: max_chars + 1], pages)


def _package_root() -> str:
    """The folder that holds the ``bot`` package (the child's working directory)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------ the child


def _limit_self() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_S, CPU_S))


def read(data: bytes, max_chars: int, max_pages: int) -> dict[str, object]:
    """What the child answers for ``data`` (in-process; the child is its only caller)."""
    import pypdf
    from pypdf.errors import DependencyError, FileNotDecryptedError, PyPdfError

    logging.disable(logging.CRITICAL)  # pypdf warns about every oddity of a broken file
    try:
        reader = pypdf.PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            try:
                if not reader.decrypt(""):
                    return {"outcome": "encrypted"}
            except (DependencyError, NotImplementedError, PyPdfError):
                return {"outcome": "encrypted"}
        pages = len(reader.pages)
        if pages > max_pages:
            return {"outcome": "pages", "pages": pages}
        parts: list[str] = []
        size = 0
        for page in reader.pages:
            part = (page.extract_text() or "").strip()
            if part:
                parts.append(part)
                size += len(part) + 2
            if size > max_chars:
                return {"outcome": "long", "pages": pages}
        text = "\n\n".join(parts)
        if not text.strip():
            return {"outcome": "empty", "pages": pages}
        return {"outcome": "ok", "text": text, "pages": pages}
    except FileNotDecryptedError:
        return {"outcome": "encrypted"}
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        return {"outcome": "unreadable"}
    except (RecursionError, MemoryError, OverflowError, ZeroDivisionError, AssertionError):
        return {"outcome": "unreadable"}


def main() -> None:
    _limit_self()
    max_chars, max_pages = int(sys.argv[1]), int(sys.argv[2])
    data = sys.stdin.buffer.read(MAX_PDF_BYTES + 1)
    if len(data) > MAX_PDF_BYTES:
        answer: dict[str, object] = {"outcome": "unreadable"}
    else:
        answer = read(data, max_chars, max_pages)
    sys.stdout.write(json.dumps(answer))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
