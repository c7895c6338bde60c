"""OpenAI-shaped errors: every failure the server reports is `{"error": {message, type, param, code}}`.

Handlers registered by `install_error_handlers` turn FastAPI's 422 validation errors into 400s
that name the offending field, route misses into 404/405, and any unexpected exception into a
500 that never carries a traceback (the traceback goes to the server log).
"""
from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
NOT_FOUND = "not_found_error"
UNAVAILABLE = "service_unavailable_error"
SERVER_ERROR = "server_error"


class APIError(Exception):
    """An error with its HTTP status; raised anywhere in a handler, rendered by the app."""

    def __init__(self, status: int, message: str, *, type: str = INVALID_REQUEST, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def unavailable(message: str, code: str) -> APIError:
    return APIError(503, message, type=UNAVAILABLE, code=code, headers={"Retry-After": "1"})


def format_loc(loc) -> str | None:
    """('messages', 0, 'content') -> 'messages[0].content'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or None


def validation_error(errors: list[dict], strip_body: bool = True) -> APIError:
    """Turn pydantic's error list into one 400 naming the first offending field."""
    if not errors:
        return bad_request("invalid request body")
    e = errors[0]
    loc = list(e.get("loc", ()))
    if strip_body and loc and loc[0] == "body":
        loc = loc[1:]
    kind = e.get("type", "")
    msg = str(e.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    if kind == "json_invalid":
        detail = (e.get("ctx") or {}).get("error", "")
        return bad_request(f"malformed JSON in the request body{': ' + str(detail) if detail else ''}",
                           code="invalid_json")
    param = format_loc(loc)
    if param is None:
        if kind in ("model_attributes_type", "dict_type", "missing"):
            return bad_request("the request body must be a JSON object, sent with Content-Type: application/json",
                               code="invalid_json")
        return bad_request(f"invalid request body: {msg}")
    if kind == "missing":
        return bad_request(f"missing required parameter '{param}'", param=param, code="missing_required_parameter")
    if kind == "extra_forbidden":
        return bad_request(f"unknown parameter '{param}'", param=param, code="unknown_parameter")
    return bad_request(f"invalid value for '{param}': {msg}", param=param,
                       code="invalid_type" if kind.endswith("_type") or "parsing" in kind else "invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        return validation_error(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            err = APIError(404, "no such endpoint", type=NOT_FOUND, code="not_found")
        elif exc.status_code == 405:
            err = APIError(405, "method not allowed for this endpoint", code="method_not_allowed")
        elif exc.status_code == 400:  # e.g. Starlette's own body-parsing errors
            err = bad_request(str(exc.detail), code="invalid_json")
        else:
            err = APIError(exc.status_code, str(exc.detail),
                           type=SERVER_ERROR if exc.status_code >= 500 else INVALID_REQUEST)
        return JSONResponse(err.body(), status_code=err.status, headers=getattr(exc, "headers", None))

    @app.exception_handler(json.JSONDecodeError)
    async def _json(_: Request, exc: json.JSONDecodeError):
        return bad_request(f"malformed JSON in the request body: {exc}", code="invalid_json").response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal server error (details are in the server log)", SERVER_ERROR,
                                       code="internal_error"), status_code=500)
