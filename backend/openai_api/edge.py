"""What every answer of the OpenAI-compatible API carries, whatever route (or no route) answers:
an ``x-request-id``, CORS for browser clients, and OpenAI's JSON error shape for aiohttp's own
refusals (404, 405, 413), which would otherwise be text/plain.

Applies to ``/v1/...`` and ``/health``; the Mini App, onboarding and the rest answer in their
own shapes. The one body limit of the API is :data:`~backend.openai_api.protocol.MAX_BODY_BYTES`
(4 MiB): the web application's ``client_max_size`` is set to it, and a larger body is a 413.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

from backend import appkeys
from backend.errors import CocoonError, ErrorCode
from backend.openai_api import protocol as p

REQUEST_ID = web.RequestKey("cocoon_request_id", str)
REQUEST_ID_HEADER = "X-Request-Id"
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

API_PREFIXES = ("/v1/", "/health")
ALLOWED_METHODS = "GET, POST, OPTIONS"
ALLOWED_HEADERS = (
    "Authorization, Content-Type, Idempotency-Key, X-Request-Id, OpenAI-Organization, "
    "OpenAI-Project, X-Stainless-Arch, X-Stainless-Lang, X-Stainless-OS, "
    "X-Stainless-Package-Version, X-Stainless-Runtime, X-Stainless-Runtime-Version, "
    "X-Stainless-Retry-Count, X-Stainless-Timeout"
)
EXPOSED_HEADERS = "X-Request-Id, X-Cocoon-Cost-Nanoton, Retry-After, Idempotent-Replayed"

_STATUS_CODES = {
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.INVALID_REQUEST,
    413: ErrorCode.BODY_TOO_LARGE,
}


ONBOARDING_PREFIX = "/v1/workers/"  # worker onboarding answers in its own shape


def is_api(request: web.Request) -> bool:
    path = request.path
    if path.startswith(ONBOARDING_PREFIX):
        return False
    return path == "/v1" or path.startswith(API_PREFIXES)


def request_id(request: web.Request) -> str:
    """The request's id: the client's ``X-Request-Id`` when it is a sane one, else a new one."""
    known = request.get(REQUEST_ID)
    if known is None:
        offered = request.headers.get(REQUEST_ID_HEADER, "")
        known = offered if _CLIENT_REQUEST_ID.match(offered) else f"req_{uuid.uuid4().hex}"
        request[REQUEST_ID] = known
    return known


def _cors_headers(request: web.Request) -> dict[str, str]:
    origin = request.headers.get(hdrs.ORIGIN)
    allowed = request.app[appkeys.SETTINGS].api_cors_origins
    if origin is None or not allowed:
        return {}
    if "*" in allowed:
        return {"Access-Control-Allow-Origin": "*"}
    if origin in allowed:
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    return {}


def http_error(error: web.HTTPException, method: str) -> CocoonError:
    """aiohttp's refusal as a Cocoon error with the same status."""
    code = _STATUS_CODES.get(error.status, ErrorCode.INVALID_REQUEST)
    if error.status == 404:
        message = "no such endpoint; see GET /v1/models and POST /v1/chat/completions"
    elif error.status == 405:
        message = f"{method} is not allowed here (allowed: {error.headers.get('Allow', '')})"
    elif error.status == 413:
        message = f"the request body is over {p.MAX_BODY_BYTES} bytes"
    else:
        message = error.reason or code.value
    return p.ApiError(code, message, status=error.status)


@web.middleware
async def api_edge(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """CORS preflight, and aiohttp's 404/405/413 as OpenAI-shaped JSON, on the API's paths."""
    if not is_api(request):
        return await handler(request)
    request_id(request)
    preflight = hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
    if request.method == hdrs.METH_OPTIONS and preflight:
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Methods": ALLOWED_METHODS,
                "Access-Control-Allow-Headers": ALLOWED_HEADERS,
                "Access-Control-Max-Age": "600",
            },
        )
    try:
        return await handler(request)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        refusal = http_error(error, request.method)
        headers = {"Allow": error.headers["Allow"]} if "Allow" in error.headers else None
        return web.json_response(p.error_body(refusal), status=error.status, headers=headers)


async def _stamp(request: web.Request, response: web.StreamResponse) -> None:
    """Before any API answer's headers go out (streams too): its id and CORS headers."""
    if not is_api(request):
        return
    response.headers[REQUEST_ID_HEADER] = request_id(request)
    for name, value in _cors_headers(request).items():
        response.headers[name] = value
    if "Access-Control-Allow-Origin" in response.headers:
        response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS


def setup(app: web.Application) -> None:
    app.middlewares.append(api_edge)
    app.on_response_prepare.append(_stamp)
