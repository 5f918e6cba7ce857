"""Service limits and batching knobs (no FastAPI import: the CLI reads the defaults from here)."""
from __future__ import annotations

from dataclasses import dataclass

from ..embedder import DEFAULT_MAX_IMAGE_ASPECT_RATIO, DEFAULT_MAX_IMAGE_PIXELS

API_KEY_ENV = "LIMOE_API_KEY"


@dataclass
class ServeSettings:
    model_name: str | None = None  # the id clients send as `model`; default: the config's name
    api_key: str | None = None  # if set, every /v1 request needs "Authorization: Bearer <key>"
    max_batch_size: int = 32  # items per coalesced model batch
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    queue_size: int = 256  # requests waiting for the model; beyond this the answer is 503
    max_items: int = 256  # texts or images (or labels) per request
    max_prompts: int = 1024  # labels x templates per classify request
    max_request_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_image_aspect_ratio: float = DEFAULT_MAX_IMAGE_ASPECT_RATIO  # long side / short side
    torch_threads: int | None = None  # intra-op threads of the model worker (default: torch's own choice)
