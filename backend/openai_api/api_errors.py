"""The OpenAI API's error answers: ``{"error": {"message", "type", "code", "param"}}``; the HTTP
status and OpenAI error type of each :class:`~backend.errors.ErrorCode` are in :data:`ERRORS`,
and only there. (:mod:`backend.openai_api.protocol` names them all too.)"""

from __future__ import annotations

from typing import Any, NamedTuple

from pydantic import ValidationError

from backend.errors import CocoonError, ErrorCode


class ErrorAnswer(NamedTuple):
    status: int
    type: str
    code: str | None = None  # OpenAI's name for the code, where it has its own


ERRORS: dict[ErrorCode, ErrorAnswer] = {
    ErrorCode.INVALID_REQUEST: ErrorAnswer(400, "invalid_request_error"),
    ErrorCode.INVALID_JSON: ErrorAnswer(400, "invalid_request_error"),
    ErrorCode.INVALID_API_KEY: ErrorAnswer(401, "invalid_request_error"),
    ErrorCode.BODY_TOO_LARGE: ErrorAnswer(413, "invalid_request_error"),
    ErrorCode.UNKNOWN_MODEL: ErrorAnswer(404, "invalid_request_error", "model_not_found"),
    ErrorCode.INSUFFICIENT_BALANCE: ErrorAnswer(402, "insufficient_quota"),
    ErrorCode.NO_WORKER: ErrorAnswer(503, "server_error"),
    ErrorCode.TIMEOUT: ErrorAnswer(504, "server_error"),
    ErrorCode.CANCELLED: ErrorAnswer(499, "server_error"),
    ErrorCode.WORKER_ERROR: ErrorAnswer(502, "server_error"),
    ErrorCode.WORKER_MISBEHAVED: ErrorAnswer(502, "server_error"),
    ErrorCode.RATE_LIMITED: ErrorAnswer(429, "rate_limit_error", "rate_limit_exceeded"),
    ErrorCode.NOT_FOUND: ErrorAnswer(404, "invalid_request_error"),
}
OTHER_ERROR = ErrorAnswer(500, "server_error")


class ApiError(CocoonError):
    """A refusal at the API's own edge (the key, the body); ``details["param"]`` names the
    field at fault, where one is.

    Details any refusal may carry for this API: ``status`` (an HTTP status other than its
    code's), ``openai_code`` (OpenAI's own code, e.g. ``context_length_exceeded``) and
    ``retry_after`` (seconds, sent as ``Retry-After``)."""


def error_status(error: CocoonError) -> int:
    status = error.details.get("status")
    if isinstance(status, int) and 400 <= status <= 599:
        return status
    return ERRORS.get(error.code, OTHER_ERROR).status


def error_headers(error: CocoonError) -> dict[str, str]:
    """``Retry-After`` for a refusal that says when to come back."""
    retry_after = error.details.get("retry_after")
    if isinstance(retry_after, int | float) and retry_after > 0:
        return {"Retry-After": str(max(1, round(retry_after)))}
    return {}


def error_body(error: CocoonError, *, with_param: bool = True) -> dict[str, Any]:
    """``{"error": {...}}`` for any refusal; a stream's last event carries it without
    ``param``."""
    answer = ERRORS.get(error.code, OTHER_ERROR)
    openai_code = error.details.get("openai_code")
    body: dict[str, Any] = {
        "message": str(error),
        "type": answer.type,
        "code": openai_code if isinstance(openai_code, str) else answer.code or error.code.value,
    }
    if with_param:
        body["param"] = error.details.get("param")
    return {"error": body}


def invalid_request(error: ValidationError) -> ApiError:
    """The first problem pydantic found in the body, and where."""
    first = error.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    return ApiError(ErrorCode.INVALID_REQUEST, f"{param}: {first['msg']}", param=param)
