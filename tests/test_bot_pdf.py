"""bot/pdf.py on its own: the real pypdf in the real child process, given real and malicious
PDFs. Every outcome comes back as a word, never a hang or a traceback, within the bounds."""

from __future__ import annotations

import asyncio

from bot import pdf
from tests.support import pdfs

MAX = 8000


async def test_the_text_of_every_page_comes_back_in_order() -> None:
    data = pdfs.build([["First page, (with brackets)."], ["Second page."]])
    read = await pdf.pdf_text(data, max_chars=MAX)
    assert read.outcome == "ok" and read.pages == 2
    assert read.text == "First page, (with brackets).\n\nSecond page."


async def test_each_malicious_file_gets_its_outcome() -> None:
    cases = {
        "encrypted": pdfs.with_password(pdfs.build([["secret"]])),
        "unreadable": b"%PDF-1.7\n" + b"\x00garbage" * 1000,
        "empty": pdfs.blank_pages(3),
        "pages": pdfs.blank_pages(pdf.MAX_PAGES + 1),
        "long": pdfs.build([["y" * 100] * 50] * 2),
    }
    for outcome, data in cases.items():
        read = await pdf.pdf_text(data, max_chars=MAX)
        assert read.outcome == outcome and read.text == "", outcome
    assert (await pdf.pdf_text(cases["pages"], max_chars=MAX)).pages == pdf.MAX_PAGES + 1
    assert (await pdf.pdf_text(b"", max_chars=MAX)).outcome == "unreadable"


async def test_bombs_are_refused_within_the_bounds() -> None:
    """A stream that inflates to 200 MB, a page tree that claims 10**7 pages through shared
    kids, and one that contains itself: refused, the child's memory capped."""
    for data in (pdfs.inflating(200), pdfs.page_tree_bomb(7), pdfs.cyclic_page_tree()):
        assert (await pdf.pdf_text(data, max_chars=MAX)).outcome == "unreadable"


async def test_a_reader_that_runs_out_of_time_is_killed() -> None:
    """The timeout path: the child is killed, not left running (the parent waits for it)."""
    read = await pdf.pdf_text(pdfs.build([["late"]]), max_chars=MAX, timeout_s=0.01)
    assert read.outcome == "timeout"


async def test_more_pdfs_at_once_than_readers_all_get_read() -> None:
    data = pdfs.build([["together"]])
    reads = await asyncio.gather(*(pdf.pdf_text(data, max_chars=MAX) for _ in range(5)))
    assert [r.text for r in reads] == ["together"] * 5
