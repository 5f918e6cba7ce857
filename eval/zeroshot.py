"""Zero-shot classification: the function the training loop, the demo and the CLI call.

    result = evaluate_zeroshot(model, preprocess, tokenizer, "data/zeroshot/name",
                               classnames=None, templates="simple", max_images=500)
    result["top1"], result["top5"], result["mean_per_class_recall"]

The model may be in the middle of training: it is put in eval mode for the
evaluation and given back in the mode it was in.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Iterable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from .classifier import build_zeroshot_classifier, check_prompt_tokens
from .datasets import LabelledImages, open_labelled_images, sample_indices, take_images
from .encode import evaluating, model_device
from .metrics import ClassificationMeter
from .prompts import Template, class_prompts, load_classnames, load_templates, template_text

logger = logging.getLogger("limoe.eval")
LOGIT_SCALE = 100.0  # open_clip / CLIP_benchmark: logits = 100 * image @ W, whatever the learned scale


def warn_about_prompts(check: dict) -> None:
    if check.get("truncated_prompts"):
        logger.warning("%d of %d prompts are longer than the tokenizer's context length and were cut",
                       check["truncated_prompts"], check["prompts"])
    if check.get("classes_with_identical_tokens"):
        logger.warning("%d classes have exactly the same prompt tokens as another class (cut class names?): "
                       "they cannot be told apart", check["classes_with_identical_tokens"])


def default_templates(templates, data) -> str | Sequence[Template]:
    """The templates asked for; else the data's own (LabelledImages.templates); else "openai"."""
    if templates is not None:
        return templates
    return getattr(data, "templates", None) or "openai"


def _image_batches(data, preprocess, image_size, classnames, batch_size, num_workers, max_images):
    """(batches, classnames, LabelledImages or None) for any accepted kind of `data`."""
    if isinstance(data, (str, os.PathLike)):
        data = open_labelled_images(data, preprocess, image_size, classnames)
    if isinstance(data, LabelledImages):
        return data.batches(batch_size, num_workers, max_images), data.classnames, data
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        if max_images is not None and max_images < len(data):
            data = Subset(data, sample_indices(len(data), max_images))
        return DataLoader(data, batch_size=batch_size, num_workers=num_workers), classnames, None
    return take_images(_as_pairs(data), max_images), classnames, None  # an iterable of batches


def _as_pairs(batches: Iterable):
    for batch in batches:
        yield (batch["images"], batch["labels"]) if isinstance(batch, dict) else batch


def evaluate_zeroshot(model, preprocess, tokenizer, data, classnames: str | Sequence[str] | None = None,
                      templates: str | Sequence[Template] | None = None, batch_size: int = 64,
                      max_images: int | None = None, device: torch.device | str | None = None,
                      num_workers: int = 0, classifier: torch.Tensor | None = None,
                      prompts: Sequence[Sequence[str]] | None = None, text_batch_size: int = 1024,
                      progress: bool = False) -> dict:
    """Zero-shot top-1 / top-5 / mean per-class recall of `model` on labelled images.

    data: a folder or shard spec (see eval.datasets), a LabelledImages, a
      map-style Dataset of (image tensor, label), or an iterable of
      (images, labels) batches or of `build_eval_loader` dict batches.
    classnames: "imagenet", a file, a list; None takes them from the data.
    templates: "openai", "simple", a file or a list; None: the data's own
      templates (a CLIP_benchmark folder's zeroshot_classification_templates.txt),
      else "openai". Ignored if `prompts` (per-class prompt lists) or a prebuilt
      `classifier` [D, C] is given.
    max_images: evaluate on at most this many images (a seeded sample of
      folder data and datasets, the first ones of a stream), for quick
      periodic evaluation during training.

    Returns metrics, counts (images, classes, skipped per reason) and timing.
    """
    device = torch.device(device) if device is not None else model_device(model)
    if isinstance(classnames, (str, os.PathLike)):
        classnames = load_classnames(classnames)
    image_size = model.config.image_size if hasattr(model, "config") else None
    batches, classnames, source = _image_batches(data, preprocess, image_size, classnames, batch_size,
                                                 num_workers, max_images)
    if classnames is None and classifier is None:
        raise ValueError("no class names: pass classnames= (the data has no classnames.txt)")
    template_list = prompt_check = None
    t0 = time.perf_counter()
    if classifier is None:
        if prompts is None:
            template_list = load_templates(default_templates(templates, source))
            prompts = class_prompts(classnames, template_list)
        prompt_check = check_prompt_tokens(tokenizer, prompts)
        warn_about_prompts(prompt_check)
        classifier = build_zeroshot_classifier(model, tokenizer, prompts, batch_size=text_batch_size,
                                               device=device, progress=progress)
    classifier = classifier.to(device)
    classifier_seconds = time.perf_counter() - t0
    num_classes = classifier.shape[1]
    if classnames is not None and len(classnames) != num_classes:
        raise ValueError(f"{len(classnames)} class names for a classifier of {num_classes} classes")

    meter = ClassificationMeter(num_classes)
    total = max_images if max_images is not None else (source.num_images if source is not None else None)
    t1 = time.perf_counter()
    with evaluating(model), tqdm(total=total, unit="img", desc="zero-shot", disable=not progress) as bar:
        for images, labels in batches:
            if len(labels) and int(labels.max()) >= num_classes:
                raise ValueError(f"label {int(labels.max())} in the data, but only {num_classes} classes: "
                                 "do the class names belong to this data?")
            features = model.encode_image(images.to(device), normalize=True).float()
            meter.update(LOGIT_SCALE * features @ classifier, labels)
            bar.update(len(labels))
    eval_seconds = time.perf_counter() - t1
    metrics = meter.compute(classnames)
    per_class = metrics.pop("per_class")
    result = {
        **metrics,
        "skipped": dict(source.skipped) if source is not None else {},
        "classifier_seconds": classifier_seconds,
        "eval_seconds": eval_seconds,
        "images_per_second": metrics["images"] / eval_seconds if eval_seconds > 0 else None,
        "templates": [template_text(t) for t in template_list] if template_list is not None else None,
        "prompt_check": prompt_check,
        "per_class": per_class,
    }
    if source is not None:
        result["data"] = source.description
    return result
