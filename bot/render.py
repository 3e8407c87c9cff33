"""Model Markdown to Telegram HTML, safely, and long replies split into messages.

Everything is HTML-escaped first; tags are only ever added in matched pairs (a fenced code
block, inline code, ``**bold**``, ``*italic*``/``_italic_`` on one line, ``[text](https://...)``
links, ``> `` quotes as a blockquote, a pipe table as aligned monospace columns). An unbalanced
``*`` simply stays a ``*``: a send never fails because of the model's Markdown.
"""

from __future__ import annotations

import html
import re

MAX_MESSAGE = 4096
"""Telegram's limit on a message's text (after entities are parsed)."""
SPLIT_AT = 3800
"""Where a long reply is cut: room for the footer and for closing a code fence."""

_FENCE = re.compile(r"^\s*```")
_INLINE_CODE = re.compile(r"`([^`\n]+)`")
_BOLD = re.compile(r"\*\*(?=\S)([^*\n]+?)(?<=\S)\*\*")
_BOLD_UNDERSCORE = re.compile(r"(?<![\w_])__(?=\S)([^_\n]+?)(?<=\S)__(?![\w_])")
_ITALIC_STAR = re.compile(r"(?<![\w*])\*(?=\S)([^*\n]+?)(?<=\S)\*(?![\w*])")
_ITALIC_UNDERSCORE = re.compile(r"(?<![\w_])_(?=\S)([^_\n]+?)(?<=\S)_(?![\w_])")
_STRIKE = re.compile(r"~~(?=\S)([^~\n]+?)(?<=\S)~~")
_LINK = re.compile(r"\[([^\]\n]+)\]\((https?://[^\s)]+)\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.+)$")
_QUOTE = re.compile(r"^\s{0,3}> ?")
_TABLE_ROW = re.compile(r"^\s*\|.*\|\s*$")
_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$")


def text_length(text: str) -> int:
    """Length as Telegram counts it (UTF-16 code units)."""
    return len(text.encode("utf-16-le")) // 2


def _inline(line: str) -> str:
    """One line outside code blocks: escaped, then paired markers turned into tags."""
    codes: list[str] = []

    def keep_code(match: re.Match[str]) -> str:
        codes.append(f"<code>{html.escape(match.group(1), quote=False)}</code>")
        return f"\x00{len(codes) - 1}\x00"

    line = _INLINE_CODE.sub(keep_code, line)
    links: list[str] = []

    def keep_link(match: re.Match[str]) -> str:
        label = html.escape(match.group(1), quote=False)
        url = html.escape(match.group(2), quote=True)
        links.append(f'<a href="{url}">{label}</a>')
        return f"\x01{len(links) - 1}\x01"

    line = _LINK.sub(keep_link, line)
    heading = _HEADING.match(line)
    text = html.escape(heading.group(2) if heading else line, quote=False)
    text = _BOLD.sub(r"<b>\1</b>", text)
    text = _BOLD_UNDERSCORE.sub(r"<b>\1</b>", text)
    text = _ITALIC_STAR.sub(r"<i>\1</i>", text)
    text = _ITALIC_UNDERSCORE.sub(r"<i>\1</i>", text)
    text = _STRIKE.sub(r"<s>\1</s>", text)
    if heading:
        text = f"<b>{text}</b>"
    text = re.sub("\x01(\\d+)\x01", lambda m: links[int(m.group(1))], text)
    return re.sub("\x00(\\d+)\x00", lambda m: codes[int(m.group(1))], text)


def _quote(lines: list[str]) -> str:
    """``> `` lines as one blockquote (their Markdown inside rendered)."""
    body = "\n".join(_inline(_QUOTE.sub("", line, count=1)) for line in lines)
    return f"<blockquote>{body}</blockquote>"


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _table(lines: list[str]) -> str:
    """A pipe table as aligned monospace columns (Telegram has no tables); its separator row
    becomes a rule."""
    rows = [_cells(line) for line in lines if not _TABLE_RULE.match(line)]
    width = max(len(row) for row in rows)
    rows = [row + [""] * (width - len(row)) for row in rows]
    sizes = [max(text_length(row[i]) for row in rows) for i in range(width)]
    shown = [
        " | ".join(cell.ljust(sizes[i]) for i, cell in enumerate(row)).rstrip() for row in rows
    ]
    if len(shown) > 1:
        shown.insert(1, "-+-".join("-" * size for size in sizes))
    return "<pre>" + html.escape("\n".join(shown), quote=False) + "</pre>"


def _blocks(lines: list[str]) -> list[str]:
    """Lines outside code: quotes and tables grouped, the rest line by line."""
    out: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        kind = "quote" if _QUOTE.match(line) else "table" if _TABLE_ROW.match(line) else None
        if kind is None:
            out.append(_inline(line))
            index += 1
            continue
        pattern = _QUOTE if kind == "quote" else _TABLE_ROW
        end = index
        while end < len(lines) and pattern.match(lines[end]):
            end += 1
        group = lines[index:end]
        if kind == "table" and not (len(group) >= 2 and _TABLE_RULE.match(group[1])):
            out.extend(_inline(item) for item in group)  # pipes, but not a table
        else:
            out.append(_quote(group) if kind == "quote" else _table(group))
        index = end
    return out


def markdown_to_html(text: str) -> str:
    """Telegram HTML for a model's Markdown; always well formed."""
    out: list[str] = []
    code: list[str] | None = None
    language = ""
    plain: list[str] = []
    for line in text.split("\n"):
        if code is None and not _FENCE.match(line):
            plain.append(line)
            continue
        out.extend(_blocks(plain))
        plain = []
        if _FENCE.match(line):
            if code is None:
                code = []
                language = re.sub(r"[^\w+-]", "", line.strip()[3:])[:20]
            else:
                body = html.escape("\n".join(code), quote=False)
                attr = f' class="language-{language}"' if language else ""
                out.append(f"<pre><code{attr}>{body}</code></pre>")
                code = None
            continue
        if code is not None:
            code.append(line)
    out.extend(_blocks(plain))
    if code is not None:  # an unclosed fence: close it
        body = html.escape("\n".join(code), quote=False)
        out.append(f"<pre><code>{body}</code></pre>")
    return "\n".join(out)


def _hard_split(line: str, size: int) -> list[str]:
    parts = []
    while text_length(line) > size:
        cut = size
        while text_length(line[:cut]) > size:
            cut -= 1
        space = line.rfind(" ", size // 2, cut)
        cut = space + 1 if space > 0 else cut
        parts.append(line[:cut])
        line = line[cut:]
    parts.append(line)
    return parts


def split_markdown(text: str, size: int = SPLIT_AT) -> list[str]:
    """Cut a long reply at line breaks into pieces of at most ``size`` characters each, each
    a valid Markdown document on its own (a code fence cut in two is closed and reopened)."""
    pieces: list[str] = []
    current: list[str] = []
    length = 0
    fence: str | None = None
    lines: list[str] = []
    for line in text.split("\n"):
        lines.extend(_hard_split(line, size - 10))
    for line in lines:
        extra = text_length(line) + 1
        if current and length + extra + 4 > size:
            if fence is not None:
                current.append("```")
            pieces.append("\n".join(current))
            current = [fence] if fence is not None else []
            length = sum(text_length(x) + 1 for x in current)
        current.append(line)
        length += extra
        if _FENCE.match(line):
            fence = None if fence is not None else line.strip()
    if current:
        pieces.append("\n".join(current))
    return [piece for piece in pieces if piece.strip()] or [text[:size]]


def plain_preview(text: str, size: int = SPLIT_AT) -> str:
    """The reply so far for a draft or an edit: plain text, the tail when it is too long."""
    if text_length(text) <= size:
        return text
    tail = text[-(size - 2) :]
    while text_length(tail) > size - 2:
        tail = tail[1:]
    return "…" + tail
