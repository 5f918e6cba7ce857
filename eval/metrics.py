"""Classification metrics from logits: top-1, top-5 and mean per-class recall.

Everything is derived from the rank of the true class in each row of
logits, so a whole evaluation only keeps two integers per image.

Ties count against the prediction: the rank of the true class is the number
of *other* classes scoring at least as high. A model that gives every class
the same score therefore scores 0, not whatever class index order would
give (torch.topk's order among equal values is unspecified).

Mean per-class recall (CLIP_benchmark's `mean_per_class_recall`, sklearn's
balanced accuracy) is the top-1 accuracy of each class that has images,
averaged over those classes, so a big class cannot hide a failing small one.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Sequence

import torch

from limoe.files import atomic_path


def true_class_rank(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Rank (0 = best) of each row's true class; ties with other classes rank it lower."""
    labels = labels.to(logits.device).long()
    true_score = logits.gather(1, labels[:, None])
    rank = (logits >= true_score).sum(1) - 1
    # A NaN score compares false with everything; it must not rank first.
    return torch.where(true_score[:, 0].isnan(), logits.shape[1], rank)


def topk_accuracy(ranks: torch.Tensor, k: int) -> float:
    return (ranks < k).float().mean().item() if len(ranks) else float("nan")


class ClassificationMeter:
    """Accumulates (true-class rank, label) over batches; `compute` gives the metrics."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.ranks: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits of shape {tuple(logits.shape)}, expected [B, {self.num_classes}]")
        labels = labels.long()
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels outside 0..{self.num_classes - 1}")
        self.ranks.append(true_class_rank(logits, labels).cpu())
        self.labels.append(labels.cpu())

    @property
    def count(self) -> int:
        return sum(len(r) for r in self.ranks)

    def compute(self, classnames: Sequence[str] | None = None) -> dict:
        """{"top1", "top5" (only with >= 5 classes), "mean_per_class_recall", "images",
        "classes_with_images", "per_class": [{"class", "name", "images", "top1", ("top5")}]}"""
        ranks = torch.cat(self.ranks) if self.ranks else torch.zeros(0, dtype=torch.long)
        labels = torch.cat(self.labels) if self.labels else torch.zeros(0, dtype=torch.long)
        has_top5 = self.num_classes >= 5
        images = torch.bincount(labels, minlength=self.num_classes)
        hits1 = torch.bincount(labels[ranks < 1], minlength=self.num_classes)
        hits5 = torch.bincount(labels[ranks < 5], minlength=self.num_classes)
        present = images > 0
        recall = hits1[present].float() / images[present].float()
        out = {
            "images": len(ranks),
            "classes": self.num_classes,
            "classes_with_images": int(present.sum()),
            "top1": topk_accuracy(ranks, 1),
        }
        if has_top5:
            out["top5"] = topk_accuracy(ranks, 5)
        out["mean_per_class_recall"] = recall.mean().item() if len(recall) else float("nan")
        per_class = []
        for c in range(self.num_classes):
            n = int(images[c])
            row = {"class": c, "name": classnames[c] if classnames is not None else str(c), "images": n,
                   "top1": hits1[c].item() / n if n else None}
            if has_top5:
                row["top5"] = hits5[c].item() / n if n else None
            per_class.append(row)
        out["per_class"] = per_class
        return out


def write_per_class_csv(per_class: list[dict], path: str | os.PathLike) -> Path:
    """One row per class: class index, name, image count, top-1 (and top-5) accuracy."""
    path = Path(path)
    fields = ["class", "name", "images", "top1"] + (["top5"] if per_class and "top5" in per_class[0] else [])
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in per_class:
            writer.writerow({k: ("" if row[k] is None else row[k]) for k in fields})
    return path
