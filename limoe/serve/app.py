"""The HTTP service: an OpenAI-compatible text embeddings endpoint plus image embeddings and
zero-shot classification, over one `Embedder`.

    POST /v1/embeddings          texts  (OpenAI embeddings API; the `openai` client works unchanged)
    POST /v1/images/embeddings   images (multipart uploads or base64 in JSON), same response shape
    POST /v1/classify            images + candidate labels -> labels ranked with probabilities
    GET  /v1/models, /v1/models/{id}, /health, /metrics (Prometheus), /docs (OpenAPI)

`create_app` builds the app's `Service` (service.py: embedder, batcher,
settings, metrics) into `app.state.service`, then adds the routes
(routes.py), the middleware and the error handlers (errors.py).
"""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import HTTPException

from ..embedder import Embedder
from .errors import error_response, install_error_handlers
from .metrics import MetricsMiddleware
from .routes import add_routes
from .schemas import ErrorResponse
from .service import Service
from .settings import ServeSettings

log = logging.getLogger("limoe.serve")


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than the limit of {limit:,} bytes")


class BodySizeLimit:
    """ASGI middleware: refuse bodies over `max_bytes`, by Content-Length up front, or
    while streaming (chunked uploads have no Content-Length)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = error_response(413, BodyTooLarge(self.max_bytes).detail, code="request_too_large")
            return await response(scope, receive, send)
        received = 0

        async def receive_limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)  # an HTTPException: FastAPI passes it to our handler
            return message

        await self.app(scope, receive_limited, send)


@asynccontextmanager
async def lifespan(app: FastAPI):
    """The batching worker runs while the app does."""
    service: Service = app.state.service
    service.batcher.start()
    log.info("serving %s (%s), embedding size %d", service.model_id, service.embedder.model_dir,
             service.embedder.embed_dim)
    try:
        yield
    finally:
        service.batcher.stop()


def create_app(embedder: Embedder, settings: ServeSettings | None = None) -> FastAPI:
    """The service over `embedder`; the batching worker starts and stops with the app's lifespan."""
    service = Service.build(embedder, settings or ServeSettings())
    app = FastAPI(
        title="limoe embedding service",
        version="1",
        summary=f"Text and image embeddings and zero-shot classification with {service.model_id}.",
        lifespan=lifespan,
        responses={400: {"model": ErrorResponse}},
    )
    app.state.service = service
    app.add_middleware(BodySizeLimit, max_bytes=service.settings.max_request_bytes)
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)  # outside BodySizeLimit: its 413s count too
    install_error_handlers(app)
    add_routes(app)
    return app
