"""The FastAPI application: routes, middlewares and error handlers around one AsyncEngine."""

from __future__ import annotations

import asyncio

import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from .errors import APIError, install_error_handlers
from .lifecycle import Lifecycle
from .metrics import CONTENT_TYPE, ServerMetrics
from .middleware import AccessLogMiddleware, ApiKeyMiddleware, BodySizeLimitMiddleware
from .serving import OpenAIServing

try:
    __version__ = version("dspark-serve")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"


@dataclass
class ServerSettings:
    """What the HTTP layer needs to know (the engine has its own EngineConfig)."""

    served_model_name: str | None = None  # default: the engine's model name
    api_key: str | None = None
    max_request_body_size: int = 8 << 20
    shutdown_grace_period: float = 30.0
    queue_retry_after: int = 1  # Retry-After seconds on a 429
    max_prompt_tokens: int | None = None  # None: the context length
    max_output_tokens: int | None = None  # None: the context length
    max_n: int = 8
    request_timeout: float | None = None  # seconds; None: no limit
    allowed_origins: list[str] = field(default_factory=list)  # CORS; empty: off
    chat_template: str | None = None  # overrides the model's (the template text)
    reasoning_parser: str | None = None  # server/reasoning.py: qwen3, deepseek_r1
    generation_config: str = "auto"  # auto: the model's generation_config.json sampling defaults; vllm: ours

    def __post_init__(self):
        from .protocol import MAX_N

        for name in ("max_prompt_tokens", "max_output_tokens"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be at least 1")
        if not 1 <= self.max_n <= MAX_N:
            raise ValueError(f"max_n must be in [1, {MAX_N}]")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError("request_timeout must be positive")
        from .reasoning import PARSERS

        if self.reasoning_parser is not None and self.reasoning_parser not in PARSERS:
            raise ValueError(f"reasoning_parser must be one of {', '.join(PARSERS)}")
        if self.generation_config not in ("auto", "vllm"):
            raise ValueError("generation_config must be auto or vllm")


def _engine_info(engine, model_name: str) -> dict[str, str]:
    """Labels of dspark_model_info: what runs, and how."""
    return {
        "model": model_name,
        "dtype": engine.dtype,
        "device": engine.device,
        "max_model_len": str(engine.max_model_len),
        "speculative_method": engine.speculative_method,
        "version": __version__,
    }


_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
    }},
}
_ERROR_STATUSES = {"400": "invalid request", "401": "missing or wrong API key", "404": "unknown model",
                   "413": "request body too large", "429": "queue full (Retry-After)",
                   "500": "internal error", "503": "shutting down or engine unavailable",
                   "504": "request timeout (--request-timeout)"}


def _install_openapi(app: FastAPI) -> None:
    """/openapi.json with the request bodies and error answers of the generation routes.

    Those routes parse their bodies themselves (strict pydantic, OpenAI-shaped errors), so
    FastAPI cannot see the models; they are added here from the same pydantic classes."""
    from fastapi.openapi.utils import get_openapi

    from . import protocol as P

    bodies = {"/v1/chat/completions": P.ChatCompletionRequest, "/v1/completions": P.CompletionRequest}

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        schemas["Error"] = _ERROR_SCHEMA
        for path, model in bodies.items():
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
            op = doc["paths"][path]["post"]
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
            op["responses"] = {"200": {"description": "the completion (JSON), or a stream of chunks (SSE)",
                                       "content": {"application/json": {"schema": {"type": "object"}},
                                                   "text/event-stream": {"schema": {"type": "string"}}}}}
            for status, what in _ERROR_STATUSES.items():
                op["responses"][status] = {"description": what, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Error"}}}}
        app.openapi_schema = doc
        return doc

    app.openapi = openapi


def create_app(engine, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    model_name = settings.served_model_name or engine.model_name
    metrics = ServerMetrics(engine, _engine_info(engine, model_name))
    lifecycle = Lifecycle(settings.shutdown_grace_period)
    metrics.watch_server(lifecycle)
    serving = OpenAIServing(engine, model_name, metrics, lifecycle, settings)
    started = int(time.time())

    app = FastAPI(title="dspark-serve", version=__version__, description="OpenAI-compatible inference server")
    app.state.engine = engine
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.lifecycle = lifecycle
    install_error_handlers(app)

    app.add_api_route("/v1/chat/completions", serving.chat, methods=["POST"])
    app.add_api_route("/v1/completions", serving.completions, methods=["POST"])

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": started, "owned_by": "dspark",
                "root": model_name, "max_model_len": engine.max_model_len}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict:
        if model_id != model_name:
            raise APIError(404, f"the model `{model_id}` does not exist", param="model", code="model_not_found")
        return model_card()

    @app.get("/health")
    async def health() -> Response:
        # 503 while draining or after an engine failure, so load balancers stop sending traffic.
        if lifecycle.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if getattr(engine, "dead", None):
            return JSONResponse({"status": "engine_dead", "detail": str(engine.dead)}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/dspark/calibration")
    async def calibration() -> dict:
        # Reliability data of the drafter's confidences: temperatures, ECE per position before/after
        # calibration, and per-bin confidence vs accuracy (for reliability diagrams).
        report_fn = getattr(engine, "calibration_report", None)
        report = await asyncio.to_thread(report_fn) if report_fn is not None else None
        if report is None:
            raise APIError(404, "speculative decoding is off: no drafter confidences to calibrate",
                           code="speculation_off")
        return report

    @app.get("/version")
    async def server_version() -> dict:
        return {"version": __version__, "model": model_name}

    _install_openapi(app)

    # Added innermost first: the access log wraps everything, auth runs before the body is read.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_body_size)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    if settings.allowed_origins:  # outside the key check: a CORS preflight carries no credentials
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], expose_headers=["X-Request-Id"])
    app.add_middleware(AccessLogMiddleware, metrics=metrics)
    return app
