"""Logging of the operator's processes (``cocoon web``, ``up``, ``bot``, ``ton watcher``).

``setup_logging(settings)`` once in each process's entry point: text lines, or one JSON object
per line with ``COCOON_LOG_JSON=true`` (python-json-logger), at ``COCOON_LOG_LEVEL``. Every
record carries the ids bound in its context (``turn_id``, ``job_id``, ``update_id``; see
:mod:`workers.logcontext`): ``bind(turn_id=...)`` where an id becomes known.

What is never logged: prompt or reply text, conversation context, keys, tokens, mnemonics.
Log ids, counts, amounts, durations and error class names instead.
"""

from __future__ import annotations

import logging
from typing import TextIO
from urllib.parse import urlsplit, urlunsplit

from backend.settings import Settings
from workers.logcontext import CONTEXT_FIELDS, ContextFilter, bind, bound, configure, current

__all__ = [
    "CONTEXT_FIELDS",
    "ContextFilter",
    "bind",
    "bound",
    "current",
    "redact_url",
    "setup_logging",
]


def setup_logging(settings: Settings, *, stream: TextIO | None = None) -> None:
    """Configure this process's logging from the settings (call once, in ``main``)."""
    level = str(getattr(settings, "log_level", "INFO") or "INFO").upper()
    if level not in logging.getLevelNamesMapping():
        level = "INFO"
    configure(level, json_lines=bool(getattr(settings, "log_json", False)), stream=stream)


def redact_url(url: str) -> str:
    """``url`` with its password, if it has one, shown as ``***`` (a database or Redis URL in a
    log line or a message)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
