"""The HTTP service: an OpenAI-compatible text embeddings endpoint plus image embeddings and
zero-shot classification, over one `Embedder`.

    POST /v1/embeddings          texts  (OpenAI embeddings API; the `openai` client works unchanged)
    POST /v1/images/embeddings   images (multipart uploads or base64 in JSON), same response shape
    POST /v1/classify            images + candidate labels -> labels ranked with probabilities
    GET  /v1/models, /v1/models/{id}, /health, /metrics (Prometheus), /docs (OpenAPI)

Request handlers validate and prepare inputs (tokenizing, image decoding in
the thread pool), then await the `DynamicBatcher`, whose single worker thread
runs the model on coalesced batches.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import asdict

import numpy as np
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import HTTPException
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from ..embedder import Embedder, ImageError, average_prompt_embeddings, fill_template, label_probabilities
from .batcher import DynamicBatcher, QueueFull
from .errors import INTERNAL_ERROR, APIError, error_response, install_error_handlers, validation_message
from .metrics import ServiceMetrics, install_metrics
from .settings import ServeSettings
from .schemas import ClassifyRequest, ClassifyResponse, EmbeddingResponse, ErrorResponse, \
    ImageEmbeddingRequest, TextEmbeddingRequest

log = logging.getLogger("limoe.serve")
INLINE_TOKENIZE_CHARS = 20_000  # smaller requests are tokenized on the event loop


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


# -- input helpers ------------------------------------------------------------------


def _as_list(value) -> list:
    return [value] if isinstance(value, str) else list(value)


def _decode_base64_image(text: str, index: int) -> bytes:
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or ";base64" not in header:
            raise APIError(400, f"input[{index}]: a data URL must be 'data:<type>;base64,<data>'",
                           param=f"input[{index}]", code="invalid_base64")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"input[{index}] is not valid base64 ({e})", param=f"input[{index}]",
                       code="invalid_base64") from e


def _embedding_data(embeddings: np.ndarray, encoding_format: str) -> list[dict]:
    if encoding_format == "base64":
        # As OpenAI does: the raw little-endian float32 bytes, base64-encoded.
        rows = [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in embeddings]
    else:
        rows = embeddings.tolist()
    return [{"object": "embedding", "embedding": row, "index": i} for i, row in enumerate(rows)]


def create_app(embedder: Embedder, settings: ServeSettings | None = None) -> FastAPI:
    """The service over `embedder`; the batching worker starts and stops with the app's lifespan."""
    settings = settings or ServeSettings()
    embedder.max_image_pixels = settings.max_image_pixels  # the app owns the embedder from here on
    embedder.max_image_aspect_ratio = settings.max_image_aspect_ratio
    model_id = settings.model_name or embedder.config.name
    info = embedder.info()
    created = int(embedder.model_dir.joinpath("model.safetensors").stat().st_mtime)
    metrics = ServiceMetrics()
    batcher = DynamicBatcher({"text": embedder.encode_tokens, "image": embedder.encode_pixels},
                             max_batch_size=settings.max_batch_size, max_wait_ms=settings.max_wait_ms,
                             queue_size=settings.queue_size, forward_passes=lambda: embedder.forward_passes,
                             torch_threads=settings.torch_threads, on_batch=metrics.observe_batch)
    metrics.queue_depth.set_function(batcher.queue.qsize)
    started = time.time()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        log.info("serving %s (%s), embedding size %d", model_id, embedder.model_dir, embedder.embed_dim)
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(
        title="limoe embedding service",
        version="1",
        summary=f"Text and image embeddings and zero-shot classification with {model_id}.",
        lifespan=lifespan,
        responses={400: {"model": ErrorResponse}},
    )
    app.state.embedder, app.state.batcher, app.state.settings = embedder, batcher, settings
    app.state.metrics = metrics
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    install_metrics(app, metrics)  # outside BodySizeLimit, so its 413s are counted too
    install_error_handlers(app)

    bearer = HTTPBearer(auto_error=False, description="needed when the server was started with an API key")

    async def require_api_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
        if settings.api_key is None:
            return
        challenge = {"WWW-Authenticate": "Bearer"}
        if credentials is None:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="missing_api_key", headers=challenge)
        if not hmac.compare_digest(credentials.credentials.encode(), settings.api_key.encode()):
            raise APIError(401, "invalid API key", code="invalid_api_key", headers=challenge)

    authorized = [Depends(require_api_key)]

    # -- shared checks --------------------------------------------------------------

    def check_model(name: str | None) -> None:
        if name is not None and name != model_id:
            raise APIError(404, f"model '{name}' is not served here; this server serves '{model_id}'",
                           param="model", code="model_not_found")

    def check_count(items: list, what: str, param: str, limit: int | None = None) -> None:
        limit = limit or settings.max_items
        if not items:
            raise APIError(400, f"{param} is empty: give at least one {what}", param=param, code="empty_input")
        if len(items) > limit:
            raise APIError(400, f"too many {what}s: {len(items)} > the limit of {limit} per request",
                           param=param, code="too_many_items")

    def submit(kind: str, inputs: torch.Tensor) -> asyncio.Future:
        """Queue prepared inputs for the model worker; await the result outside `batcher.incoming()`."""
        try:
            return asyncio.wrap_future(batcher.submit(kind, inputs))
        except QueueFull:
            raise APIError(503, f"the server is busy ({settings.queue_size} requests queued); retry shortly",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except RuntimeError as e:  # shutting down
            raise APIError(503, str(e), code="unavailable") from None

    async def model_result(pending: asyncio.Future) -> np.ndarray:
        try:
            return await pending
        except Exception:  # the model failed (logged by the batcher): answer 500, keep the connection
            raise APIError(500, INTERNAL_ERROR, code="internal_error") from None

    async def tokenize(texts: list[str]):
        if sum(map(len, texts)) < INLINE_TOKENIZE_CHARS:
            return embedder.tokenize(texts)  # microseconds: cheaper than a hop to the thread pool
        return await run_in_threadpool(embedder.tokenize, texts)

    async def read_images(request: Request, schema: type[ImageEmbeddingRequest]):
        """Multipart uploads or base64 JSON -> (image bytes, the validated request fields)."""
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            # The context manager closes the spooled upload files when done.
            async with request.form(max_files=settings.max_items + 1, max_fields=settings.max_items + 100) as form:
                blobs = [await value.read() for _, value in form.multi_items() if isinstance(value, UploadFile)]
                fields = {key: form.getlist(key) if key in ("labels", "templates") else form.get(key)
                          for key in form.keys() if not isinstance(form.get(key), UploadFile)}
            fields.pop("input", None)
        elif content_type.startswith("application/json"):
            try:
                fields = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise APIError(400, f"request body is not valid JSON ({e})", code="invalid_json") from e
            if not isinstance(fields, dict):
                raise APIError(400, "the JSON body must be an object", code="invalid_value")
            blobs = None
        else:
            raise APIError(415, "send images as multipart/form-data file uploads or as base64 strings in an "
                                f"application/json body (got content-type '{content_type or 'none'}')",
                           code="unsupported_media_type")
        try:
            body = schema.model_validate(fields)
        except ValidationError as e:
            message, param, code = validation_message(e.errors()[0])
            raise APIError(400, message, param=param, code=code) from None
        if blobs is None:
            if body.input is None:
                raise APIError(400, "no images: upload files (multipart/form-data) or give base64 images in "
                                    "'input'", param="input", code="empty_input")
            check_count(_as_list(body.input), "image", "input")
            blobs = [_decode_base64_image(text, i) for i, text in enumerate(_as_list(body.input))]
        check_model(body.model)
        check_count(blobs, "image", "input")
        return blobs, body

    async def prepare_images(blobs: list[bytes]) -> torch.Tensor:
        try:
            return await run_in_threadpool(embedder.prepare_images, blobs)
        except ImageError as e:
            raise APIError(400, str(e), param=f"input[{e.index}]", code=e.code) from None

    def image_usage(n: int) -> dict:
        tokens = n * embedder.config.num_patches
        return {"prompt_tokens": tokens, "total_tokens": tokens, "images": n}

    # -- routes ------------------------------------------------------------------

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, dependencies=authorized, tags=["embeddings"],
              summary="Embed texts (OpenAI embeddings API)")
    async def create_embeddings(body: TextEmbeddingRequest):
        check_model(body.model)
        texts = _as_list(body.input)
        check_count(texts, "text", "input")
        empty = next((i for i, t in enumerate(texts) if not t.strip()), None)
        if empty is not None:
            raise APIError(400, f"input[{empty}] is an empty string", param="input", code="empty_input")
        if body.dimensions is not None and body.dimensions != embedder.embed_dim:
            raise APIError(400, f"this model's embeddings have {embedder.embed_dim} dimensions; "
                                f"dimensions={body.dimensions} is not supported", param="dimensions",
                           code="invalid_value")
        with batcher.incoming():
            tokenized = await tokenize(texts)
            pending = submit("text", tokenized.tokens)
        embeddings = await model_result(pending)
        tokens = sum(tokenized.num_tokens)
        return JSONResponse({
            "object": "list",
            "data": _embedding_data(embeddings, body.encoding_format),
            "model": model_id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "truncated": len(tokenized.truncated),
                      "truncated_indices": tokenized.truncated},
        })

    image_body_docs = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": ImageEmbeddingRequest.model_json_schema()},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "input": {"type": "array", "items": {"type": "string", "format": "binary"}},
            "model": {"type": "string"}, "encoding_format": {"type": "string", "enum": ["float", "base64"]}}}},
    }}}
    classify_body_docs = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": ClassifyRequest.model_json_schema()},
        "multipart/form-data": {"schema": {"type": "object", "required": ["labels"], "properties": {
            "input": {"type": "array", "items": {"type": "string", "format": "binary"}},
            "labels": {"type": "array", "items": {"type": "string"}},
            "templates": {"type": "array", "items": {"type": "string"}},
            "top_k": {"type": "integer"}, "model": {"type": "string"}}}},
    }}}

    @app.post("/v1/images/embeddings", response_model=EmbeddingResponse, dependencies=authorized,
              tags=["embeddings"], summary="Embed images (uploads or base64)", openapi_extra=image_body_docs)
    async def create_image_embeddings(request: Request):
        blobs, body = await read_images(request, ImageEmbeddingRequest)
        with batcher.incoming():
            pending = submit("image", await prepare_images(blobs))
        embeddings = await model_result(pending)
        return JSONResponse({
            "object": "list",
            "data": _embedding_data(embeddings, body.encoding_format),
            "model": model_id,
            "usage": image_usage(len(blobs)),
        })

    @app.post("/v1/classify", response_model=ClassifyResponse, dependencies=authorized, tags=["classification"],
              summary="Zero-shot classification of images over candidate labels", openapi_extra=classify_body_docs)
    async def classify(request: Request):
        blobs, body = await read_images(request, ClassifyRequest)
        labels, templates = body.labels, body.templates or ["{}"]
        check_count(labels, "label", "labels")
        empty = next((i for i, label in enumerate(labels) if not label.strip()), None)
        if empty is not None:
            raise APIError(400, f"labels[{empty}] is an empty string", param="labels", code="empty_input")
        try:
            prompts = [fill_template(t, label) for label in labels for t in templates]
        except ValueError as e:
            raise APIError(400, str(e), param="templates", code="invalid_value") from None
        if len(prompts) > settings.max_prompts:
            raise APIError(400, f"too many prompts: {len(labels)} labels x {len(templates)} templates > the limit "
                                f"of {settings.max_prompts}", param="labels", code="too_many_items")
        with batcher.incoming():
            pixels = await prepare_images(blobs)
            tokenized = await tokenize(prompts)
            pending_images, pending_prompts = submit("image", pixels), submit("text", tokenized.tokens)
        image_embeddings = await model_result(pending_images)
        classes = average_prompt_embeddings(await model_result(pending_prompts), len(labels))
        probs = label_probabilities(image_embeddings, classes, embedder.logit_scale)
        top_k = min(body.top_k or len(labels), len(labels))
        data = []
        for i, row in enumerate(probs):
            order = np.argsort(-row, kind="stable")[:top_k]
            ranking = [{"label": labels[j], "probability": float(row[j])} for j in order]
            data.append({"object": "classification", "index": i, **ranking[0], "ranking": ranking})
        usage = image_usage(len(blobs))
        usage.update(prompts=len(prompts), prompt_tokens=usage["prompt_tokens"] + sum(tokenized.num_tokens),
                     truncated=len(tokenized.truncated))
        usage["total_tokens"] = usage["prompt_tokens"]
        return JSONResponse({"object": "list", "data": data, "model": model_id, "usage": usage})

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "limoe",
                "embedding_dim": embedder.embed_dim, "modalities": ["text", "image"],
                "context_length": embedder.context_length, "image_size": embedder.config.image_size,
                "details": info}

    @app.get("/v1/models", dependencies=authorized, tags=["models"], summary="The served model and its facts")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name}", dependencies=authorized, tags=["models"], summary="One model's facts")
    async def get_model(name: str):
        check_model(name)
        return model_card()

    @app.get("/health", tags=["service"], summary="Liveness, limits and batching counters")
    async def health():
        body = {"status": "ok" if batcher.alive else "stopped", "model": model_id,
                "uptime_s": round(time.time() - started, 1), "batching": batcher.stats(),
                "limits": {k: v for k, v in asdict(settings).items() if k not in ("api_key", "model_name")}}
        return JSONResponse(body, status_code=200 if batcher.alive else 503)

    return app
