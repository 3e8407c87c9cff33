"""PDFs for the bot's document tests, written here byte by byte (a real PDF 1.4 file with a
correct cross-reference table, text in Helvetica) or by pypdf's own writer (many pages, a
password), and the malicious ones: garbage, a claimed page count of a million, a stream that
inflates to hundreds of megabytes."""

from __future__ import annotations

import io
import zlib

import pypdf


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def _file(objects: list[bytes], header: bytes) -> bytes:
    """``header``, then ``objects`` numbered from 1 (the first is the catalog), a correct
    cross-reference table and the trailer."""
    out = io.BytesIO()
    out.write(header)
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(f"{number} 0 obj\n".encode() + body + b"\nendobj\n")
    xref = out.tell()
    out.write(f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode())
    for offset in offsets:
        out.write(f"{offset:010d} 00000 n \n".encode())
    out.write(
        f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    )
    return out.getvalue()


def build(pages: list[list[str]], *, page_count: int | None = None, extra: bytes = b"") -> bytes:
    """A PDF whose pages show ``pages`` (lines of text each). ``page_count`` overrides the page
    tree's /Count (a lie a malicious file tells); ``extra`` is one more stream object's body."""
    objects: list[bytes] = []
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(len(pages)))
    count = len(pages) if page_count is None else page_count
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {count} >>".encode())
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    for i, lines in enumerate(pages):
        ops = ["BT", "/F1 11 Tf", "14 TL", "72 720 Td"]
        for line in lines:
            ops.append(f"({_escape(line)}) Tj T*")
        ops.append("ET")
        content = "\n".join(ops).encode("latin-1")
        if extra and i == 0:
            content = extra
        page = (
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            f"/Resources << /Font << /F1 3 0 R >> >> /Contents {5 + 2 * i} 0 R >>"
        ).encode()
        objects.append(page)
        if extra and i == 0:
            objects.append(
                f"<< /Length {len(content)} /Filter /FlateDecode >>\nstream\n".encode()
                + content
                + b"\nendstream"
            )
        else:
            objects.append(
                f"<< /Length {len(content)} >>\nstream\n".encode() + content + b"\nendstream"
            )
    return _file(objects, b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")


def blank_pages(count: int) -> bytes:
    """A real file of ``count`` blank pages (pypdf's writer)."""
    writer = pypdf.PdfWriter()
    for _ in range(count):
        writer.add_blank_page(width=612, height=792)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def with_password(data: bytes, password: str = "secret") -> bytes:
    """``data`` encrypted (RC4-128, which pypdf writes without extra libraries)."""
    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(data)))
    writer.encrypt(user_password=password, owner_password=password, algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def inflating(megabytes: int) -> bytes:
    """One page whose content stream is small but inflates to ``megabytes`` MB of text ops."""
    ops = b"BT /F1 11 Tf 72 720 Td (x) Tj ET\n" * (megabytes * 1024 * 1024 // 34)
    return build([["bomb"]], extra=zlib.compress(ops, 9))


def page_tree_bomb(levels: int = 7, fanout: int = 10) -> bytes:
    """A tiny file whose page tree claims ``fanout ** levels`` pages: each node lists the next
    one ``fanout`` times (a DAG, which a reader that trusts it walks forever)."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>"]
    for level in range(levels):
        child = 3 + level
        kids = " ".join([f"{child} 0 R"] * fanout)
        objects.append(
            f"<< /Type /Pages /Kids [{kids}] /Count {fanout ** (levels - level)} >>".encode()
        )
    objects.append(b"<< /Type /Page /MediaBox [0 0 612 792] >>")
    return _file(objects, b"%PDF-1.4\n")


def cyclic_page_tree() -> bytes:
    """A page tree that lists itself among its kids."""
    return page_tree_bomb(levels=1, fanout=1).replace(b"/Kids [3 0 R]", b"/Kids [2 0 R 3 0 R]")
