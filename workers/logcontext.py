"""Ids that every log record carries: the turn, the job, the Telegram update being handled.

A context variable per id, set with :func:`bind` where the id becomes known; a
:class:`ContextFilter` on the handlers copies them onto each record (``record.turn_id``, ...),
so that JSON log lines have them as fields and text lines can print them. asyncio copies the
context into every task it creates, so ids bound in a request's task follow its log calls and
the background work it starts, and never leak into other requests.

Stdlib only: the worker node imports it (``backend.logs`` builds on it for the operator's
processes). Log records carry ids, counts and durations, never prompt or reply text.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
from collections.abc import Iterator
from typing import Any, TextIO

__all__ = ["CONTEXT_FIELDS", "ContextFilter", "bind", "bound", "configure", "current"]

CONTEXT_FIELDS = ("turn_id", "job_id", "update_id")

_VARS: dict[str, contextvars.ContextVar[str | None]] = {
    name: contextvars.ContextVar(f"cocoon_{name}", default=None) for name in CONTEXT_FIELDS
}

HANDLER_NAME = "cocoon"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(context)s: %(message)s"


def _check(fields: dict[str, object]) -> None:
    unknown = set(fields) - set(_VARS)
    if unknown:
        raise ValueError(f"unknown log context fields: {sorted(unknown)}")


def bind(**fields: object) -> None:
    """Set ids for the rest of the current context (the current task and the tasks it starts).

    ``None`` clears an id. Use it where an id becomes known in a request's own task.
    """
    _check(fields)
    for name, value in fields.items():
        _VARS[name].set(None if value is None else str(value))


@contextlib.contextmanager
def bound(**fields: object) -> Iterator[None]:
    """Set ids for a block, and restore the previous ones after it."""
    _check(fields)
    tokens = [
        (_VARS[name], _VARS[name].set(None if value is None else str(value)))
        for name, value in fields.items()
    ]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def current() -> dict[str, str]:
    """The ids set in this context."""
    return {name: value for name, var in _VARS.items() if (value := var.get()) is not None}


class ContextFilter(logging.Filter):
    """Puts the context's ids on every record (an id given with ``extra=`` wins), and a
    ``context`` string (`` [turn_id=… job_id=…]`` or empty) for text formats."""

    def filter(self, record: logging.LogRecord) -> bool:
        shown = []
        for name, var in _VARS.items():
            value = getattr(record, name, None)
            if value is None:
                value = var.get()
                setattr(record, name, value)
            if value is not None:
                shown.append(f"{name}={value}")
        record.context = f" [{' '.join(shown)}]" if shown else ""
        return True


class _JsonContextFormatter(logging.Formatter):
    """Stands in when python-json-logger is missing (the worker image may not have it)."""

    def format(self, record: logging.LogRecord) -> str:
        import json

        payload: dict[str, object] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            if (value := getattr(record, name, None)) is not None:
                payload[name] = value
        if record.exc_info:
            payload["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False)


def json_formatter() -> logging.Formatter:
    """One JSON object per line: time, level, logger, message, and the context's ids."""
    try:
        from pythonjsonlogger.json import JsonFormatter  # python-json-logger >= 3.1
    except ImportError:  # not installed
        return _JsonContextFormatter()

    class _Formatter(JsonFormatter):
        def add_fields(
            self, log_record: dict[str, Any], record: logging.LogRecord, message: dict[str, Any]
        ) -> None:
            super().add_fields(log_record, record, message)
            for name in CONTEXT_FIELDS:
                value = getattr(record, name, None)
                if value is None:
                    log_record.pop(name, None)
                else:
                    log_record[name] = value
            log_record.pop("context", None)

    return _Formatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
    )


def configure(
    level: str | int = "INFO", *, json_lines: bool = False, stream: TextIO | None = None
) -> None:
    """Configure the root logger of this process: one handler, the context filter, text or JSON.

    Calling it again replaces the handler it added before (other handlers stay).
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(json_formatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    handler.set_name(HANDLER_NAME)
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == HANDLER_NAME:
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
