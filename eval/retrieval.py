"""Image-text retrieval: recall@k in both directions, in bounded memory.

One image may have several captions (COCO / Flickr style: `captions.json`
in our shards). Image-to-text: an image is a hit at k if any of its captions
ranks in the top k texts. Text-to-image: a caption is a hit at k if its
image ranks in the top k images. As in CLIP_benchmark, recall@k is the mean
hit rate over queries.

The full similarity matrix for 100k images x 500k captions would be 200 GB,
so scores are computed for a chunk of queries at a time, sized to keep at
most `max_scores` floats alive. Ties count against the query (the rank is
the number of non-matching candidates scoring at least as high as the best
match), so a constant model scores 0, not an artefact of index order.
"""
from __future__ import annotations

import time
from typing import Iterable, Sequence

import torch
from tqdm import tqdm

from .encode import evaluating, model_device

DEFAULT_KS = (1, 5, 10)


def _chunk_rows(num_cols: int, max_scores: int) -> int:
    return max(1, max_scores // max(1, num_cols))


def image_to_text_ranks(image_features: torch.Tensor, text_features: torch.Tensor, text_image: torch.Tensor,
                        max_scores: int = 1 << 24) -> torch.Tensor:
    """For each image, the rank (0 = best) of its best-scoring caption among all texts.

    text_image[j] is the index of the image caption j describes. Images
    without captions get rank -1 (callers leave them out).
    """
    num_images = image_features.shape[0]
    text_image = text_image.to(image_features.device)
    ranks = torch.full((num_images,), -1, dtype=torch.long)
    step = _chunk_rows(text_features.shape[0], max_scores)
    for start in range(0, num_images, step):
        ids = torch.arange(start, min(start + step, num_images), device=image_features.device)
        scores = image_features[ids] @ text_features.T  # [b, T]
        positive = text_image[None, :] == ids[:, None]
        best = scores.masked_fill(~positive, float("-inf")).max(1, keepdim=True).values
        rank = ((scores >= best) & ~positive).sum(1)
        has_caption = positive.any(1)
        ranks[start:start + len(ids)] = torch.where(has_caption, rank, -1).cpu()
    return ranks


def text_to_image_ranks(image_features: torch.Tensor, text_features: torch.Tensor, text_image: torch.Tensor,
                        max_scores: int = 1 << 24) -> torch.Tensor:
    """For each caption, the rank (0 = best) of its image among all images."""
    num_texts = text_features.shape[0]
    text_image = text_image.to(text_features.device).long()
    ranks = torch.empty(num_texts, dtype=torch.long)
    step = _chunk_rows(image_features.shape[0], max_scores)
    for start in range(0, num_texts, step):
        end = min(start + step, num_texts)
        scores = text_features[start:end] @ image_features.T  # [b, N]
        target = text_image[start:end]
        true_score = scores.gather(1, target[:, None])
        ranks[start:end] = ((scores >= true_score).sum(1) - 1).cpu()
    return ranks


def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor, text_image: torch.Tensor,
                     ks: Sequence[int] = DEFAULT_KS, max_scores: int = 1 << 24) -> dict:
    """recall@k both ways from L2-normalised features. text_image[j] = image of caption j."""
    text_image = torch.as_tensor(text_image, dtype=torch.long)
    if len(text_image) != text_features.shape[0]:
        raise ValueError(f"{len(text_image)} caption->image indices for {text_features.shape[0]} captions")
    if len(text_image) and (text_image.min() < 0 or text_image.max() >= image_features.shape[0]):
        raise ValueError("caption->image index outside the images")
    i2t = image_to_text_ranks(image_features, text_features, text_image, max_scores)
    i2t = i2t[i2t >= 0]
    t2i = text_to_image_ranks(image_features, text_features, text_image, max_scores)
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = (i2t < k).float().mean().item() if len(i2t) else float("nan")
    for k in ks:
        out[f"text_to_image_R@{k}"] = (t2i < k).float().mean().item() if len(t2i) else float("nan")
    return out


def caption_batches(eval_batches: Iterable[dict]):
    """(images, caption lists) from `data_pipelines.build_eval_loader` batches."""
    for batch in eval_batches:
        yield batch["images"], batch["captions"]


def encode_caption_pairs(model, tokenizer, batches: Iterable, device: torch.device | str | None = None,
                         max_images: int | None = None, text_batch_size: int = 1024,
                         progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode (images [B,3,H,W], captions: list of lists of str) batches.

    Returns (image_features [N, D], text_features [T, D], text_image [T]), all
    L2-normalised, features on `device`.
    """
    device = torch.device(device) if device is not None else model_device(model)
    image_features, captions, text_image = [], [], []
    seen = 0
    bar = tqdm(total=max_images, unit="img", desc="images", disable=not progress, leave=False)
    with evaluating(model):
        for images, caption_lists in batches:
            if max_images is not None:
                images, caption_lists = images[:max_images - seen], caption_lists[:max_images - seen]
            image_features.append(model.encode_image(images.to(device), normalize=True).float())
            for i, caps in enumerate(caption_lists):
                captions.extend(caps)
                text_image.extend([seen + i] * len(caps))
            seen += len(images)
            bar.update(len(images))
            if max_images is not None and seen >= max_images:
                break
        bar.close()
        text_features = []
        for start in tqdm(range(0, len(captions), text_batch_size), desc="captions", disable=not progress,
                          leave=False):
            tokens = tokenizer(captions[start:start + text_batch_size]).to(device)
            text_features.append(model.encode_text(tokens, normalize=True).float())
    if not image_features:
        raise ValueError("no image-caption pairs to evaluate")
    return (torch.cat(image_features), torch.cat(text_features),
            torch.tensor(text_image, dtype=torch.long))


def evaluate_retrieval(model, tokenizer, batches: Iterable, device: torch.device | str | None = None,
                       max_images: int | None = None, ks: Sequence[int] = DEFAULT_KS,
                       max_scores: int = 1 << 24, progress: bool = False) -> dict:
    """Encode caption pairs and compute recall@k both ways, with counts and timing."""
    t0 = time.perf_counter()
    img, txt, text_image = encode_caption_pairs(model, tokenizer, batches, device=device, max_images=max_images,
                                                progress=progress)
    t_encode = time.perf_counter() - t0
    metrics = retrieval_recall(img, txt, text_image, ks=ks, max_scores=max_scores)
    return {
        "metrics": metrics,
        "counts": {"images": img.shape[0], "captions": txt.shape[0]},
        "timing": {"encode_seconds": t_encode, "rank_seconds": time.perf_counter() - t0 - t_encode,
                   "images_per_second": img.shape[0] / t_encode if t_encode > 0 else None},
    }
