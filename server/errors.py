"""Errors in the OpenAI shape: every error body is {"error": {"message", "type", "param", "code"}}.

Handlers registered here replace FastAPI's defaults (422 for validation, a
bare {"detail": ...} for 404/405/500), so a client never has to parse two
formats.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from dspark_serve.engine import EngineDeadError, QueueFullError, RequestError, SamplingParamsError

log = logging.getLogger(__name__)

# OpenAI's error `type` for each status we send.
_TYPE_FOR_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "server_error",
    503: "server_error",
    504: "timeout_error",
}


class APIError(Exception):
    """An error answer: HTTP status plus the OpenAI error fields (and optional headers)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPE_FOR_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class BodyTooLarge(Exception):
    """Raised while reading a request body that grows past the size limit (no Content-Length)."""

    def __init__(self, limit: int):
        super().__init__(f"the request body is larger than the limit of {limit} bytes")
        self.limit = limit


def body_too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than the limit of {limit} bytes", code="request_too_large")


def _is_type_mismatch(err: dict) -> bool:
    t = err.get("type", "")
    return t.endswith("_type") or t in ("none_required", "literal_error")


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _field_path(loc: list) -> str:
    # pydantic names union branches inside `loc` ("stop.list[constrained-str].3"); a client knows fields only.
    kept = [loc[0]] + [p for p in loc[1:] if isinstance(p, int) or not ("[" in p or "-" in p or p in _TYPE_TAGS)]
    return ".".join(str(p) for p in kept)


def from_validation_errors(errors: list[dict]) -> APIError:
    """A pydantic / FastAPI validation failure -> 400, naming the first offending field."""
    err = errors[0] if errors else {"msg": "invalid request", "loc": (), "type": ""}
    if err.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {err.get('msg')}", code="invalid_json")
    loc = [p for p in err.get("loc", ()) if p != "body"]  # FastAPI prefixes body fields with "body"
    if not loc:
        return APIError(400, f"invalid request body: {err.get('msg')}", code="invalid_request")
    # A union field reports one error per branch; the branch whose type matched says what is wrong
    # (`stop` with 17 strings: "at most 16 items", not the str branch's "should be a valid string").
    same_field = [e for e in errors if [p for p in e.get("loc", ()) if p != "body"][:1] == loc[:1]]
    err = next((e for e in same_field if not _is_type_mismatch(e)), err)
    loc = [p for p in err.get("loc", ()) if p != "body"]
    # Top-level field name as `param`.
    return APIError(400, f"{_field_path(loc)}: {err.get('msg')}", param=str(loc[0]), code="invalid_value")


def from_engine_error(exc: Exception, retry_after: int = 1) -> APIError:
    """Map what the engine raises to an HTTP answer."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, SamplingParamsError):
        return APIError(400, str(exc), param=exc.param, code="invalid_value")
    if isinstance(exc, RequestError):
        return APIError(400, str(exc), param=exc.param, code=exc.code or "invalid_value")
    if isinstance(exc, QueueFullError):
        return APIError(
            429, f"the server is busy ({exc}); retry later",
            code="queue_full", headers={"Retry-After": str(retry_after)},
        )
    if isinstance(exc, EngineDeadError):
        # Why it died is the engine's internal story (exception text): the log has it.
        log.warning("engine not running: %s", exc)
        return APIError(503, "the engine is not running (see the server log)", code="engine_unavailable")
    # The details go to the log only: exception text can hold paths and internals.
    log.error("unexpected error: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return APIError(500, "internal server error (see the server log)", code="internal_error")


def _answer(request: Request, err: APIError) -> JSONResponse:
    rec = request.scope.get("state", {}).get("access")  # the access log line says why
    if rec is not None:
        rec.error = err.message
    return err.response()


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return _answer(request, exc)

    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _answer(request, from_validation_errors(list(exc.errors())))

    async def on_pydantic_error(request: Request, exc: ValidationError) -> JSONResponse:
        return _answer(request, from_validation_errors(exc.errors(include_url=False)))

    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            err = APIError(404, f"no route for {request.method} {request.url.path}", code="not_found")
        elif exc.status_code == 405:
            err = APIError(405, f"method {request.method} is not allowed on {request.url.path}", code="method_not_allowed")
        else:
            err = APIError(exc.status_code, str(exc.detail))
        err.headers.update(exc.headers or {})  # e.g. Allow on a 405
        return _answer(request, err)

    async def on_body_too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return _answer(request, body_too_large(exc.limit))

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return _answer(request, APIError(500, "internal server error", code="internal_error"))

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(ValidationError, on_pydantic_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(BodyTooLarge, on_body_too_large)
    app.add_exception_handler(Exception, on_unexpected)
