"""Zero-shot classifier weights from class prompts, as open_clip and CLIP_benchmark build them.

For each class: encode every prompt, L2-normalise each embedding, average,
L2-normalise the average. The classifier is W [D, C] and
logits = 100 * normalize(encode_image(x)) @ W.

Prompts of all classes are flattened and encoded in fixed-size batches
(1000 classes x 80 templates is 80k texts, far more per forward than one
class at a time), and summed per class with `index_add_`, so classes may
have different numbers of prompts.

Building takes a while for big models, so `cached_zeroshot_classifier`
keeps W on disk as safetensors, keyed by the export's weights (size and
mtime of model.safetensors), its config and tokenizer, and every prompt.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from limoe.files import atomic_path

from .encode import evaluating, model_device

CACHE_FORMAT = 1


def build_zeroshot_classifier(model, tokenizer, prompts: Sequence[Sequence[str]], batch_size: int = 1024,
                              device: torch.device | str | None = None, progress: bool = False) -> torch.Tensor:
    """Return W [embed_dim, num_classes] (float32): prompts[c] are class c's prompts."""
    if not prompts:
        raise ValueError("no classes to build a classifier for")
    empty = [c for c, p in enumerate(prompts) if not p]
    if empty:
        raise ValueError(f"classes {empty[:5]} have no prompts")
    device = torch.device(device) if device is not None else model_device(model)
    texts = [p for class_prompts in prompts for p in class_prompts]
    owner = torch.repeat_interleave(torch.arange(len(prompts)),
                                    torch.tensor([len(p) for p in prompts])).to(device)
    sums = None
    bar = tqdm(total=len(texts), unit="prompt", desc="classifier", disable=not progress, leave=False)
    with evaluating(model):
        for start in range(0, len(texts), batch_size):
            tokens = tokenizer(texts[start:start + batch_size]).to(device)
            z = model.encode_text(tokens, normalize=True).float()
            if sums is None:
                sums = torch.zeros(len(prompts), z.shape[1], device=device)
            sums.index_add_(0, owner[start:start + len(z)], z)
            bar.update(len(z))
    bar.close()
    counts = torch.tensor([len(p) for p in prompts], device=device, dtype=torch.float32)
    return F.normalize(sums / counts[:, None], dim=-1).T.contiguous()


def check_prompt_tokens(tokenizer, prompts: Sequence[Sequence[str]]) -> dict:
    """How many prompts the tokenizer cuts at its context length, and how many classes end up
    with exactly the same tokens as another class (their classifier columns are then equal,
    and every image ties between them). Both are silent accuracy losses worth a warning."""
    texts = [p for class_prompts in prompts for p in class_prompts]
    if hasattr(tokenizer, "encode_with_truncation"):
        tokens, dropped = tokenizer.encode_with_truncation(texts)
        truncated = sum(d > 0 for d in dropped)
    else:  # an open_clip-style tokenizer: no truncation report
        tokens, truncated = tokenizer(texts), None
    rows, start, seen = [], 0, {}
    for class_prompts in prompts:
        key = tokens[start:start + len(class_prompts)].numpy().tobytes()
        seen[key] = seen.get(key, 0) + 1
        rows.append(key)
        start += len(class_prompts)
    identical = sum(1 for key in rows if seen[key] > 1)
    return {"prompts": len(texts), "truncated_prompts": truncated, "classes_with_identical_tokens": identical}


def default_cache_dir() -> Path:
    root = os.environ.get("LIMOE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "limoe")
    return Path(root) / "zeroshot"


def classifier_cache_key(export_dir: str | os.PathLike, prompts: Sequence[Sequence[str]]) -> str:
    """sha256 over the export's identity and every prompt.

    The weights file is identified by size and mtime (hashing gigabytes would
    take longer than many builds); config.json and the tokenizer are small
    and hashed by content, since they change what the prompts encode to.
    """
    export_dir = Path(export_dir)
    h = hashlib.sha256(f"limoe-zeroshot-classifier/{CACHE_FORMAT}\n".encode())
    st = (export_dir / "model.safetensors").stat()
    h.update(f"weights {st.st_size} {st.st_mtime_ns}\n".encode())
    for name in ("config.json", "tokenizer.model", "tokenizer.model.json"):
        path = export_dir / name
        h.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"<missing>") + b"\0")
    h.update(json.dumps([list(p) for p in prompts], ensure_ascii=False).encode())
    return h.hexdigest()


def _load_cached(path: Path, key: str, num_classes: int) -> torch.Tensor | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            # The key inside the file guards against a renamed or copied cache entry.
            if (f.metadata() or {}).get("key") != key or "classifier" not in f.keys():
                return None
            w = f.get_tensor("classifier")
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None  # unreadable or truncated: rebuild and overwrite
    return w if w.ndim == 2 and w.shape[1] == num_classes else None


def cached_zeroshot_classifier(model, tokenizer, prompts: Sequence[Sequence[str]], export_dir: str | os.PathLike,
                               cache_dir: str | os.PathLike | None = None, batch_size: int = 1024,
                               device: torch.device | str | None = None,
                               progress: bool = False) -> tuple[torch.Tensor, dict]:
    """Load W from the cache, or build it and store it (temp file, then rename).

    Returns (W on `device`, info) with info = {"cache": "hit"|"miss", "path", "seconds"}.
    """
    device = torch.device(device) if device is not None else model_device(model)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = classifier_cache_key(export_dir, prompts)
    path = cache_dir / f"{key}.safetensors"
    t0 = time.perf_counter()
    if path.is_file():
        w = _load_cached(path, key, len(prompts))
        if w is not None:
            return w.to(device), {"cache": "hit", "path": str(path), "seconds": time.perf_counter() - t0}
    w = build_zeroshot_classifier(model, tokenizer, prompts, batch_size=batch_size, device=device,
                                  progress=progress)
    seconds = time.perf_counter() - t0
    with atomic_path(path) as tmp:
        save_file({"classifier": w.detach().cpu().contiguous()}, tmp,
                  metadata={"key": key, "num_classes": str(len(prompts)), "format": str(CACHE_FORMAT)})
    return w, {"cache": "miss", "path": str(path), "seconds": seconds}
