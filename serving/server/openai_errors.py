"""Errors in OpenAI's shape, for every HTTP answer that is not a success:

  {"error": {"message": str, "type": str, "param": str | null, "code": str | null}}

`param` names the offending request field, `code` says what kind of problem it is (OpenAI's codes
where OpenAI has one: `context_length_exceeded`, `invalid_api_key`, `model_not_found`, ...).
FastAPI's own answers (an unknown route, a method a route does not take, an invalid body) are
turned into this shape too, instead of FastAPI's `{"detail": ...}`.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import Request

INVALID_REQUEST = "invalid_request_error"

# What kind of problem a pydantic error type is, in OpenAI's codes; any other type: invalid_value.
_VALIDATION_CODES = {
    "missing": "missing_required_parameter",
    "extra_forbidden": "unknown_parameter",
    "json_invalid": "invalid_json",
    "model_attributes_type": "invalid_json",
}


def error_response(
    status: int, message: str, param: str | None, kind: str, code: str | None = None, headers=None
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def validation_code(pydantic_type: str) -> str:
    if pydantic_type in _VALIDATION_CODES:
        return _VALIDATION_CODES[pydantic_type]
    return "invalid_type" if pydantic_type.endswith(("_type", "_parsing")) else "invalid_value"


async def http_exception(request: Request, exc: HTTPException) -> JSONResponse:
    """404 (no such route), 405 (the route does not take this method) and any other HTTPException."""
    if exc.status_code == 404:
        message, code = f"no route {request.method} {request.url.path}", "unknown_url"
    elif exc.status_code == 405:
        allowed = next((v for k, v in (exc.headers or {}).items() if k.lower() == "allow"), "")
        message, code = f"{request.url.path} does not take {request.method} (allowed: {allowed})", "method_not_allowed"
    else:
        message, code = str(exc.detail), None
    return error_response(exc.status_code, message, None, INVALID_REQUEST, code, headers=exc.headers)
