"""Plain ASGI middlewares: access log + error counting, API key check, request body size limit.

Plain ASGI rather than Starlette's BaseHTTPMiddleware, which would buffer
and re-wrap streaming responses and interfere with disconnect detection.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError, BodyTooLarge, body_too_large
from .metrics import ServerMetrics

access_log = logging.getLogger("dspark.access")

# Open without an API key: probes and scrapers have no credentials.
OPEN_PATHS = frozenset({"/health", "/metrics", "/version"})


@dataclass
class AccessRecord:
    """What one request did; handlers fill it in, the access log writes it out."""

    request_id: str
    model: str | None = None
    stream: bool | None = None
    n: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    user: str | None = None
    error: str | None = None
    # An error reported inside an already-started 200 stream (counted like an error status).
    stream_error_status: int | None = None


def access_record(request: Request) -> AccessRecord:
    state = request.scope.setdefault("state", {})
    rec = state.get("access")
    if rec is None:  # app used without AccessLogMiddleware (unit tests)
        rec = state["access"] = AccessRecord(uuid.uuid4().hex)
    return rec


async def _answer(scope: Scope, receive: Receive, send: Send, err: APIError) -> None:
    rec = scope.get("state", {}).get("access")
    if rec is not None:
        rec.error = err.message
    await err.response()(scope, receive, send)


class AccessLogMiddleware:
    """Outermost layer: assigns the request id, counts errors, writes one JSON line per request."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        rec = AccessRecord(uuid.uuid4().hex)
        scope.setdefault("state", {})["access"] = rec
        status: int | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append("X-Request-Id", rec.request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            status = status or 499
            raise
        except Exception:
            status = 500 if status is None else status
            raise
        finally:
            self._finish(scope, rec, status or 500, time.monotonic() - start)

    def _finish(self, scope: Scope, rec: AccessRecord, status: int, latency: float) -> None:
        error_status = rec.stream_error_status or (status if status >= 400 else None)
        if error_status is not None:
            self.metrics.count_error(error_status)
        line = {"request_id": rec.request_id, "method": scope["method"], "path": scope["path"], "status": status}
        line.update({k: v for k, v in asdict(rec).items() if v is not None and k != "request_id"})
        line["latency_s"] = round(latency, 4)
        client = scope.get("client")
        if client:
            line["client"] = f"{client[0]}:{client[1]}"
        access_log.info(json.dumps(line, ensure_ascii=False))


class ApiKeyMiddleware:
    """`Authorization: Bearer <key>` on everything but OPEN_PATHS; constant-time comparison."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS and not self._authorized(scope):
            err = APIError(401, "invalid or missing API key (send `Authorization: Bearer <key>`)",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            await _answer(scope, receive, send, err)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        value = Headers(scope=scope).get("authorization", "")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(token.strip().encode(), self.key)


class BodySizeLimitMiddleware:
    """413 for bodies over `max_bytes`: from Content-Length up front, else while the body streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _answer(scope, receive, send, body_too_large(self.max_bytes))
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)  # the app's error handler answers 413
            return message

        await self.app(scope, limited_receive, send)
