"""The routes: plain functions, each given the app's `Service` (`ServiceDep`, read
from `request.app.state.service`), and `add_routes`, the table of paths at the end.

Request handlers validate and prepare inputs (tokenizing, image decoding in
the thread pool), then await the `DynamicBatcher`, whose single worker thread
runs the model on coalesced batches.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json
import time
from dataclasses import asdict

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.responses import Response

from ..embedder import average_prompt_embeddings, fill_template, label_probabilities
from .errors import APIError, validation_message
from .schemas import ClassifyRequest, ClassifyResponse, EmbeddingResponse, ImageEmbeddingRequest, \
    TextEmbeddingRequest
from .service import Service, ServiceDep

# -- the API key ------------------------------------------------------------------

bearer = HTTPBearer(auto_error=False, description="needed when the server was started with an API key")


async def require_api_key(service: ServiceDep, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
    api_key = service.settings.api_key
    if api_key is None:
        return
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                       code="missing_api_key", headers=challenge)
    if not hmac.compare_digest(credentials.credentials.encode(), api_key.encode()):
        raise APIError(401, "invalid API key", code="invalid_api_key", headers=challenge)


authorized = [Depends(require_api_key)]

# -- inputs and outputs -------------------------------------------------------------


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


async def read_images(request: Request, service: Service, schema: type[ImageEmbeddingRequest]):
    """Multipart uploads or base64 JSON -> (image bytes, the validated request fields)."""
    content_type = request.headers.get("content-type", "")
    max_items = service.settings.max_items
    if content_type.startswith("multipart/form-data"):
        # The context manager closes the spooled upload files when done.
        async with request.form(max_files=max_items + 1, max_fields=max_items + 100) as form:
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
        encoded = _as_list(body.input)
        service.check_count(encoded, "image", "input")  # before decoding any
        blobs = [_decode_base64_image(text, i) for i, text in enumerate(encoded)]
    service.check_model(body.model)
    service.check_count(blobs, "image", "input")
    return blobs, body


def embedding_list(embeddings: np.ndarray, encoding_format: str, model_id: str, usage: dict) -> JSONResponse:
    if encoding_format == "base64":
        # As OpenAI does: the raw little-endian float32 bytes, base64-encoded.
        rows = [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in embeddings]
    else:
        rows = embeddings.tolist()
    data = [{"object": "embedding", "embedding": row, "index": i} for i, row in enumerate(rows)]
    return JSONResponse({"object": "list", "data": data, "model": model_id, "usage": usage})


# -- the routes (`add_routes` registers them) ---------------------------------------------


async def prometheus_metrics(service: ServiceDep):
    return service.metrics.exposition()


async def create_embeddings(body: TextEmbeddingRequest, service: ServiceDep):
    embedder = service.embedder
    service.check_model(body.model)
    texts = _as_list(body.input)
    service.check_texts(texts, "text", "input")
    if body.dimensions is not None and body.dimensions != embedder.embed_dim:
        raise APIError(400, f"this model's embeddings have {embedder.embed_dim} dimensions; "
                            f"dimensions={body.dimensions} is not supported", param="dimensions",
                       code="invalid_value")
    with service.batcher.incoming():
        tokenized = await service.tokenize(texts)
        pending = service.submit("text", tokenized.tokens)
    embeddings = await service.model_result(pending)
    tokens = sum(tokenized.num_tokens)
    return embedding_list(embeddings, body.encoding_format, service.model_id,
                          {"prompt_tokens": tokens, "total_tokens": tokens, "truncated": len(tokenized.truncated),
                           "truncated_indices": tokenized.truncated})


async def create_image_embeddings(request: Request, service: ServiceDep):
    blobs, body = await read_images(request, service, ImageEmbeddingRequest)
    with service.batcher.incoming():
        pending = service.submit("image", await service.prepare_images(blobs))
    embeddings = await service.model_result(pending)
    return embedding_list(embeddings, body.encoding_format, service.model_id, service.image_usage(len(blobs)))


async def classify(request: Request, service: ServiceDep):
    blobs, body = await read_images(request, service, ClassifyRequest)
    labels, templates = body.labels, body.templates or ["{}"]
    service.check_texts(labels, "label", "labels")
    try:
        prompts = [fill_template(t, label) for label in labels for t in templates]
    except ValueError as e:
        raise APIError(400, str(e), param="templates", code="invalid_value") from None
    max_prompts = service.settings.max_prompts
    if len(prompts) > max_prompts:
        raise APIError(400, f"too many prompts: {len(labels)} labels x {len(templates)} templates > the limit "
                            f"of {max_prompts}", param="labels", code="too_many_items")
    with service.batcher.incoming():
        pixels = await service.prepare_images(blobs)
        tokenized = await service.tokenize(prompts)
        pending_images, pending_prompts = service.submit("image", pixels), service.submit("text", tokenized.tokens)
    image_embeddings = await service.model_result(pending_images)
    classes = average_prompt_embeddings(await service.model_result(pending_prompts), len(labels))
    probs = label_probabilities(image_embeddings, classes, service.embedder.logit_scale)
    top_k = min(body.top_k or len(labels), len(labels))
    data = []
    for i, row in enumerate(probs):
        order = np.argsort(-row, kind="stable")[:top_k]
        ranking = [{"label": labels[j], "probability": float(row[j])} for j in order]
        data.append({"object": "classification", "index": i, **ranking[0], "ranking": ranking})
    usage = service.image_usage(len(blobs))
    usage.update(prompts=len(prompts), prompt_tokens=usage["prompt_tokens"] + sum(tokenized.num_tokens),
                 truncated=len(tokenized.truncated))
    usage["total_tokens"] = usage["prompt_tokens"]
    return JSONResponse({"object": "list", "data": data, "model": service.model_id, "usage": usage})


async def list_models(service: ServiceDep):
    return {"object": "list", "data": [service.model_card()]}


async def get_model(name: str, service: ServiceDep):
    service.check_model(name)
    return service.model_card()


async def health(service: ServiceDep):
    batcher, settings = service.batcher, service.settings
    body = {"status": "ok" if batcher.alive else "stopped", "model": service.model_id,
            "uptime_s": round(time.time() - service.started, 1), "batching": batcher.stats(),
            "limits": {k: v for k, v in asdict(settings).items() if k not in ("api_key", "model_name")}}
    return JSONResponse(body, status_code=200 if batcher.alive else 503)


# Both image routes read their body themselves (JSON or multipart), so their docs are spelled out.
_UPLOADS = {"type": "array", "items": {"type": "string", "format": "binary"}}
IMAGE_BODY_DOCS = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": ImageEmbeddingRequest.model_json_schema()},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "input": _UPLOADS, "model": {"type": "string"},
        "encoding_format": {"type": "string", "enum": ["float", "base64"]}}}},
}}}
CLASSIFY_BODY_DOCS = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": ClassifyRequest.model_json_schema()},
    "multipart/form-data": {"schema": {"type": "object", "required": ["labels"], "properties": {
        "input": _UPLOADS, "labels": {"type": "array", "items": {"type": "string"}},
        "templates": {"type": "array", "items": {"type": "string"}},
        "top_k": {"type": "integer"}, "model": {"type": "string"}}}},
}}}


def add_routes(app: FastAPI) -> None:
    """The routes, in the order of the OpenAPI docs, on the app itself (`include_router` can wrap
    them where `MetricsMiddleware` cannot match a request to its path template before routing)."""
    app.add_api_route("/metrics", prometheus_metrics, methods=["GET"], tags=["service"],
                      summary="Prometheus metrics (text exposition format)", response_class=Response)
    app.add_api_route("/v1/embeddings", create_embeddings, methods=["POST"], response_model=EmbeddingResponse,
                      dependencies=authorized, tags=["embeddings"], summary="Embed texts (OpenAI embeddings API)")
    app.add_api_route("/v1/images/embeddings", create_image_embeddings, methods=["POST"],
                      response_model=EmbeddingResponse, dependencies=authorized, tags=["embeddings"],
                      summary="Embed images (uploads or base64)", openapi_extra=IMAGE_BODY_DOCS)
    app.add_api_route("/v1/classify", classify, methods=["POST"], response_model=ClassifyResponse,
                      dependencies=authorized, tags=["classification"],
                      summary="Zero-shot classification of images over candidate labels",
                      openapi_extra=CLASSIFY_BODY_DOCS)
    app.add_api_route("/v1/models", list_models, methods=["GET"], dependencies=authorized, tags=["models"],
                      summary="The served model and its facts")
    app.add_api_route("/v1/models/{name}", get_model, methods=["GET"], dependencies=authorized, tags=["models"],
                      summary="One model's facts")
    app.add_api_route("/health", health, methods=["GET"], tags=["service"],
                      summary="Liveness, limits and batching counters")
