"""Embedder: embed texts and images and classify images zero-shot with a limoe export.

    from limoe import Embedder
    emb = Embedder("runs/demo/export")
    z_txt = emb.embed_texts(["a red heart", "a dog"])           # float32 [2, D], unit rows
    z_img = emb.embed_images(["heart.png", pil_image, png_bytes])
    probs = emb.classify(["heart.png"], ["heart", "dog", "star"])  # float32 [1, 3], rows sum to 1

The export is opened with `limoe.load` (safetensors + JSON + SentencePiece:
nothing is unpickled). Routing is dropless, so an item's embedding does not
depend on what else is in its batch; the HTTP service relies on that to
coalesce concurrent requests.

Images are decoded defensively, since the service feeds it bytes from the
network: only common raster formats are opened, and the pixel count and the
aspect ratio are checked from the header before the pixels are decoded. The
pixel count bounds the decode (decompression bombs); the aspect ratio bounds
the resize, whose intermediate is image_size x (image_size x aspect ratio)
pixels (a 662-byte 1 x 300,000 PNG otherwise took 4-7 s and 1.7 GB).
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .checkpoint import read_config
from .factory import load
from .transforms import to_rgb

# 4096 x 4096: far above any model's input size, and 64 MiB of RGBA at most per image.
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
# Longest side / shortest side. With the pixel limit this bounds a side at sqrt(pixels x ratio)
# (40,960 by default), and the resize (short side -> image_size) at 100 x image_size^2 pixels.
DEFAULT_MAX_IMAGE_ASPECT_RATIO = 100.0
# Raster formats decoded in-process by Pillow; others (EPS runs Ghostscript, ...) are refused.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")
PLACEHOLDERS = ("{c}", "{}")  # where a prompt template takes the label (or class name): the first one it holds
# Characters of a text that are tokenized. The model reads context_length tokens (16-77): a SentencePiece
# piece is at most 16 characters, so only texts that open with thousands of blank characters could
# tokenize differently. Tokenizing all of a 16 MiB text took 2.6 s and +360 MB (a Python int per piece).
MAX_TOKENIZED_CHARS = 16_384

ImageSource = Union[Image.Image, str, os.PathLike, bytes, bytearray, memoryview]


class ImageError(ValueError):
    """An image that cannot be embedded. `code` is "invalid_image", "image_too_large" or
    "extreme_aspect_ratio"; `index` is its position in the request, when known."""

    def __init__(self, message: str, code: str = "invalid_image", index: int | None = None):
        super().__init__(message)
        self.code = code
        self.index = index


def _check_size(size: tuple[int, int], max_pixels: int, max_aspect_ratio: float) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ImageError(f"image is {width}x{height}: it has no pixels")
    if width * height > max_pixels:
        raise ImageError(f"image is {width}x{height} = {width * height:,} pixels, more than the limit of "
                         f"{max_pixels:,}", code="image_too_large")
    ratio = max(width, height) / min(width, height)
    if ratio > max_aspect_ratio:
        raise ImageError(f"image is {width}x{height}, an aspect ratio of {ratio:,.0f}:1, more than the limit of "
                         f"{max_aspect_ratio:g}:1", code="extreme_aspect_ratio")


def load_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               max_aspect_ratio: float = DEFAULT_MAX_IMAGE_ASPECT_RATIO) -> Image.Image:
    """Decode `source` (a PIL image, a file path or encoded bytes) to an RGB image.

    Raises ImageError for anything that is not a readable PNG/JPEG/GIF/WEBP/BMP/TIFF
    of at most `max_pixels` pixels whose long side is at most `max_aspect_ratio` times
    its short side, TypeError for other Python types.
    """
    if isinstance(source, Image.Image):
        _check_size(source.size, max_pixels, max_aspect_ratio)
        return to_rgb(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ImageError(f"{path}: cannot read ({e.strerror or e})") from e
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        raise TypeError(f"an image must be a PIL image, a path or bytes, not {type(source).__name__}")
    if not data:
        raise ImageError("image is empty (0 bytes)")
    try:
        # open() reads only the header: the size is known before any pixel is decoded.
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow's own guard (error above 2x Image.MAX_IMAGE_PIXELS; the warning if a caller made it an error).
        raise ImageError(f"image is too large to decode safely ({e})", code="image_too_large") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"not a readable image (supported formats: {', '.join(IMAGE_FORMATS)})") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # Pillow plugins raise all of these on bad headers
        raise ImageError(f"cannot read image header ({e})") from e
    _check_size(image.size, max_pixels, max_aspect_ratio)
    try:
        image.load()
        return to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image is too large to decode safely ({e})", code="image_too_large") from e
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
        raise ImageError(f"cannot decode {image.format} image ({e})") from e


def fill_template(template: str, label: str) -> str:
    """`template` with its placeholder replaced by `label` (str.replace, not str.format: a template
    may hold other braces)."""
    for placeholder in PLACEHOLDERS:
        if placeholder in template:
            return template.replace(placeholder, label)
    raise ValueError(f"template {template!r} has no '{{}}' placeholder for the label")


def average_prompt_embeddings(prompt_embeddings: np.ndarray, num_labels: int) -> np.ndarray:
    """[num_labels * T, D] unit prompt embeddings (label-major) -> [num_labels, D] unit class embeddings.

    open_clip's zero-shot recipe: mean of the normalised prompt embeddings, renormalised.
    """
    mean = prompt_embeddings.reshape(num_labels, -1, prompt_embeddings.shape[-1]).mean(1)
    return (mean / np.linalg.norm(mean, axis=-1, keepdims=True)).astype(np.float32)


def label_probabilities(image_embeddings: np.ndarray, class_embeddings: np.ndarray,
                        logit_scale: float) -> np.ndarray:
    """Softmax over labels of logit_scale * cosine similarity: [N, D] x [L, D] -> [N, L] float32."""
    logits = logit_scale * image_embeddings.astype(np.float64) @ class_embeddings.astype(np.float64).T
    logits -= logits.max(-1, keepdims=True)
    probs = np.exp(logits)
    return (probs / probs.sum(-1, keepdims=True)).astype(np.float32)


@dataclass
class TokenizedTexts:
    tokens: torch.Tensor  # [N, context_length]
    num_tokens: list[int]  # tokens fed to the model per text (pieces kept + end token)
    truncated: list[int]  # indices of texts cut to the context length


class Embedder:
    """Embeds with a `limoe.save` export on one process (no distributed setup).

    Rows are L2-normalised float32 NumPy arrays. `batch_size` bounds the items
    per forward pass. Not meant to be called from several threads at once
    (the HTTP service runs it on one worker thread).
    """

    def __init__(self, model_dir: str | os.PathLike, device: str | torch.device = "cpu", batch_size: int = 64,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 max_image_aspect_ratio: float = DEFAULT_MAX_IMAGE_ASPECT_RATIO):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model_dir = Path(model_dir)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_image_pixels = max_image_pixels
        self.max_image_aspect_ratio = max_image_aspect_ratio
        self.model, self.preprocess, self.tokenizer = load(self.model_dir, device=self.device)
        _, self.metadata = read_config(self.model_dir)
        self.config = self.model.config
        # Dropless routing: an item's embedding must not depend on its batch neighbours.
        self.model.set_eval_routing(dropless=True)
        self.forward_passes = 0  # model calls made so far (the service reports it)

    # -- model facts ----------------------------------------------------------

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def context_length(self) -> int:
        return self.tokenizer.context_length

    @property
    def logit_scale(self) -> float:
        """The learned temperature (exp'd, clamped like training): the scale of classify's logits."""
        return float(self.model.logit_scale.detach().exp().clamp(max=self.config.logit_scale_max))

    def info(self) -> dict:
        from .flops import count_parameters

        c = self.config
        return {
            "name": c.name,
            "model_dir": str(self.model_dir),
            "embedding_dim": c.embed_dim,
            "image_size": c.image_size,
            "patch_size": c.patch_size,
            "context_length": self.context_length,
            "vocab_size": self.tokenizer.vocab_size,
            "width": c.width,
            "depth": c.depth,
            "num_experts": c.moe.num_experts,
            "experts_per_token": c.moe.k if c.moe.num_experts else 0,
            "moe_layers": c.moe.moe_layers(c.depth),
            "parameters": count_parameters(self.model),
            "logit_scale": self.logit_scale,
            "device": str(self.device),
        }

    # -- steps (the service runs these separately: preparation in a thread pool, encoding batched) --

    def tokenize(self, texts: Sequence[str]) -> TokenizedTexts:
        """Tokens of each text's first MAX_TOKENIZED_CHARS characters, cut to the context length."""
        texts = list(texts)
        tokens, dropped = self.tokenizer.encode_with_truncation([t[:MAX_TOKENIZED_CHARS] for t in texts])
        num_tokens = [int(n) for n in (tokens != self.tokenizer.pad_id).sum(-1)]
        truncated = [i for i, (t, d) in enumerate(zip(texts, dropped)) if d > 0 or len(t) > MAX_TOKENIZED_CHARS]
        return TokenizedTexts(tokens, num_tokens, truncated)

    def prepare_images(self, images: Sequence[ImageSource]) -> torch.Tensor:
        """Decode and preprocess to [N, 3, S, S]; ImageError carries the failing image's index."""
        pixels = []
        for i, source in enumerate(images):
            try:
                pixels.append(self.preprocess(load_image(source, self.max_image_pixels, self.max_image_aspect_ratio)))
            except ImageError as e:
                raise ImageError(f"image {i}: {e}", code=e.code, index=i) from e
        if not pixels:
            s = self.config.image_size
            return torch.empty(0, 3, s, s)
        return torch.stack(pixels)

    @torch.inference_mode()
    def _encode(self, encode, inputs: torch.Tensor) -> np.ndarray:
        out = np.empty((len(inputs), self.embed_dim), dtype=np.float32)
        for start in range(0, len(inputs), self.batch_size):
            batch = inputs[start:start + self.batch_size].to(self.device)
            out[start:start + len(batch)] = encode(batch, normalize=True).float().cpu().numpy()
            self.forward_passes += 1
        return out

    def encode_tokens(self, tokens: torch.Tensor) -> np.ndarray:
        return self._encode(self.model.encode_text, tokens)

    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        return self._encode(self.model.encode_image, pixels)

    # -- the API ----------------------------------------------------------------

    def embed_texts(self, texts: str | Sequence[str]) -> np.ndarray:
        """[N, D] unit embeddings; texts longer than the context are truncated (see `tokenize`)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"texts[{bad}] is {type(texts[bad]).__name__}, not str")
        return self.encode_tokens(self.tokenize(texts).tokens)

    def embed_images(self, images: ImageSource | Sequence[ImageSource]) -> np.ndarray:
        """[N, D] unit embeddings of PIL images, file paths or encoded image bytes."""
        if isinstance(images, (Image.Image, str, os.PathLike, bytes, bytearray, memoryview)):
            images = [images]
        return self.encode_pixels(self.prepare_images(list(images)))

    def class_embeddings(self, labels: Sequence[str], templates: Sequence[str] | None = None) -> np.ndarray:
        """[L, D]: per label, the renormalised mean of its prompts' embeddings.
        Without templates the prompt is the label itself."""
        labels = list(labels)
        if not labels:
            raise ValueError("no labels to classify with")
        templates = list(templates) if templates else ["{}"]
        prompts = [fill_template(t, label) for label in labels for t in templates]
        return average_prompt_embeddings(self.embed_texts(prompts), len(labels))

    def classify(self, images: ImageSource | Sequence[ImageSource], labels: Sequence[str],
                 templates: Sequence[str] | None = None) -> np.ndarray:
        """[N, L] float32 probabilities over `labels` (columns in the order given).

        Softmax of the model's learned logit scale times cosine similarity;
        `templates` like "a photo of a {}." are averaged per label as in open_clip.
        """
        classes = self.class_embeddings(labels, templates)
        return label_probabilities(self.embed_images(images), classes, self.logit_scale)
