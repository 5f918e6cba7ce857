"""The state the routes share: one `Service` per app, built by `create_app`, kept at
`app.state.service` and handed to each route by the `ServiceDep` dependency.

Besides the embedder, batcher, settings and metrics it holds the request
checks and model calls that several routes make, each raising an `APIError`
with the status, code and message the client sees.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import torch
from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from ..embedder import Embedder, ImageError
from .batcher import DynamicBatcher, QueueFull
from .errors import INTERNAL_ERROR, APIError
from .metrics import ServiceMetrics
from .settings import ServeSettings

INLINE_TOKENIZE_CHARS = 20_000  # smaller requests are tokenized on the event loop


@dataclass
class Service:
    embedder: Embedder
    settings: ServeSettings
    batcher: DynamicBatcher
    metrics: ServiceMetrics
    model_id: str  # what clients send as `model`
    info: dict  # embedder.info(), for /v1/models
    created: int  # the export's mtime, OpenAI's `created`
    started: float  # time.time() when built, for /health's uptime

    @classmethod
    def build(cls, embedder: Embedder, settings: ServeSettings) -> Service:
        embedder.max_image_pixels = settings.max_image_pixels  # the app owns the embedder from here on
        embedder.max_image_aspect_ratio = settings.max_image_aspect_ratio
        metrics = ServiceMetrics()
        batcher = DynamicBatcher({"text": embedder.encode_tokens, "image": embedder.encode_pixels},
                                 max_batch_size=settings.max_batch_size, max_wait_ms=settings.max_wait_ms,
                                 queue_size=settings.queue_size, forward_passes=lambda: embedder.forward_passes,
                                 torch_threads=settings.torch_threads, on_batch=metrics.observe_batch)
        metrics.queue_depth.set_function(batcher.queue.qsize)
        return cls(embedder, settings, batcher, metrics, model_id=settings.model_name or embedder.config.name,
                   info=embedder.info(),
                   created=int(embedder.model_dir.joinpath("model.safetensors").stat().st_mtime),
                   started=time.time())

    # -- request checks -------------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_id:
            raise APIError(404, f"model '{name}' is not served here; this server serves '{self.model_id}'",
                           param="model", code="model_not_found")

    def check_count(self, items: list, what: str, param: str) -> None:
        limit = self.settings.max_items
        if not items:
            raise APIError(400, f"{param} is empty: give at least one {what}", param=param, code="empty_input")
        if len(items) > limit:
            raise APIError(400, f"too many {what}s: {len(items)} > the limit of {limit} per request",
                           param=param, code="too_many_items")

    def check_texts(self, texts: list[str], what: str, param: str) -> None:
        """`check_count`, and no text (an input, a label) may be blank."""
        self.check_count(texts, what, param)
        blank = next((i for i, text in enumerate(texts) if not text.strip()), None)
        if blank is not None:
            raise APIError(400, f"{param}[{blank}] is an empty string", param=param, code="empty_input")

    # -- preparing inputs and running the model -----------------------------------------

    async def tokenize(self, texts: list[str]):
        if sum(map(len, texts)) < INLINE_TOKENIZE_CHARS:
            return self.embedder.tokenize(texts)  # microseconds: cheaper than a hop to the thread pool
        return await run_in_threadpool(self.embedder.tokenize, texts)

    async def prepare_images(self, blobs: list[bytes]) -> torch.Tensor:
        try:
            return await run_in_threadpool(self.embedder.prepare_images, blobs)
        except ImageError as e:
            raise APIError(400, str(e), param=f"input[{e.index}]", code=e.code) from None

    def submit(self, kind: str, inputs: torch.Tensor) -> asyncio.Future:
        """Queue prepared inputs for the model worker; await the result outside `batcher.incoming()`."""
        try:
            return asyncio.wrap_future(self.batcher.submit(kind, inputs))
        except QueueFull:
            raise APIError(503, f"the server is busy ({self.settings.queue_size} requests queued); retry shortly",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except RuntimeError as e:  # shutting down
            raise APIError(503, str(e), code="unavailable") from None

    @staticmethod
    async def model_result(pending: asyncio.Future) -> np.ndarray:
        try:
            return await pending
        except Exception:  # the model failed (logged by the batcher): answer 500, keep the connection
            raise APIError(500, INTERNAL_ERROR, code="internal_error") from None

    # -- answers ----------------------------------------------------------------------

    def image_usage(self, n: int) -> dict:
        tokens = n * self.embedder.config.num_patches
        return {"prompt_tokens": tokens, "total_tokens": tokens, "images": n}

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "limoe",
                "embedding_dim": self.embedder.embed_dim, "modalities": ["text", "image"],
                "context_length": self.embedder.context_length, "image_size": self.embedder.config.image_size,
                "details": self.info}


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]
