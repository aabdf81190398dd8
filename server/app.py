"""The FastAPI application: routes, middlewares and error handlers around one AsyncEngine."""

from __future__ import annotations

import asyncio

import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI
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


def create_app(engine, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    model_name = settings.served_model_name or engine.model_name
    metrics = ServerMetrics(engine, _engine_info(engine, model_name))
    lifecycle = Lifecycle(settings.shutdown_grace_period)
    serving = OpenAIServing(engine, model_name, metrics, lifecycle, settings.queue_retry_after)
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

    # Added innermost first: the access log wraps everything, auth runs before the body is read.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_body_size)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(AccessLogMiddleware, metrics=metrics)
    return app
