"""Labelled images for zero-shot evaluation: class folders, ImageNet layout, WebDataset shards.

`open_labelled_images(path)` looks at what is there:

- CLIP_benchmark's WebDataset layout (`DIR/test/*.tar` + `classnames.txt` +
  `zeroshot_classification_templates.txt`, see eval.benchmark_sets): the
  split's shards, labels from `cls`, class names and templates from the
  folder (`LabelledImages.templates`).
- WebDataset shards (a `.tar`, a brace/glob pattern, or a folder holding
  `*.tar` or `shards/*.tar`): labels from each sample's `cls` field, read by
  `data_pipelines.build_eval_loader`; class names from the caller or a
  `classnames.txt` beside the shards (the data builders write one).
- ImageNet layout (`<dir>/val/<wnid>/*` or `<dir>/<wnid>/*`, wnid = n + 8
  digits), mapped by `data_pipelines.imagenet`: classes are the wnid folders
  in sorted order, named from open_clip's ImageNet names (which are in
  sorted-wnid order); a folder with only some of the 1000 classes is
  classified among its own classes, unless all 1000 class names are given
  (`--classnames imagenet`), which makes it a 1000-way classification with
  the standard labels.
- Any other folder per class, torchvision ImageFolder style. With integer
  folder names (`00000/`, `00001/`, as the emoji builder writes) the folder
  name is the class index into the class names; with named folders, a folder
  matching a class name gets that class, else folders map to class names in
  sorted order. Class names come from the caller, a `classnames.txt` in the
  folder, or the folder names themselves.

Unreadable images are skipped and counted (`skipped`), never fatal.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .prompts import load_classnames

CLASSNAMES_FILE = "classnames.txt"


class DataLayoutError(ValueError):
    pass


class ImageFileDataset(Dataset):
    """(path, label) pairs -> (image tensor or None if unreadable, label)."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                image.load()
                return self.transform(image), label
        except Exception:  # PIL raises many types for bad files; the batch counts it
            return None, label


def collate_skipping_unreadable(items):
    good = [(x, y) for x, y in items if x is not None]
    images = torch.stack([x for x, _ in good]) if good else None
    labels = torch.tensor([y for _, y in good], dtype=torch.long)
    return images, labels, len(items) - len(good)


class LabelledImages:
    """Batches of (images [B,3,H,W], labels [B]) plus class names and what was skipped."""

    def __init__(self, classnames: list[str] | None, description: dict):
        self.classnames = classnames
        self.description = description
        self.skipped: Counter[str] = Counter()
        self.templates: list[str] | None = None  # the data's own prompt templates, if it has them

    @property
    def num_images(self) -> int | None:
        return self.description.get("images")

    def batches(self, batch_size: int, num_workers: int = 0,
                max_images: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError


class FolderImages(LabelledImages):
    def __init__(self, samples: list[tuple[Path, int]], transform, classnames: list[str] | None,
                 description: dict):
        super().__init__(classnames, {**description, "images": len(samples)})
        self.samples = samples
        self.transform = transform

    def batches(self, batch_size, num_workers=0, max_images=None):
        samples = [self.samples[i] for i in sample_indices(len(self.samples), max_images)]
        loader = DataLoader(ImageFileDataset(samples, self.transform), batch_size=batch_size,
                            num_workers=num_workers, collate_fn=collate_skipping_unreadable)
        for images, labels, bad in loader:
            if bad:
                self.skipped["unreadable_image"] += bad
            if images is not None:
                yield images, labels


class ShardImages(LabelledImages):
    def __init__(self, shards, image_size: int, classnames: list[str] | None, description: dict):
        from data_pipelines.shards import count_samples, resolve_shards

        self.shards = resolve_shards(shards)
        super().__init__(classnames, {**description, "shards": len(self.shards),
                                      "images": count_samples(self.shards)})
        self.image_size = image_size

    def batches(self, batch_size, num_workers=0, max_images=None):
        from data_pipelines import build_eval_loader

        loader = build_eval_loader(self.shards, self.image_size, batch_size, num_workers=num_workers)
        try:
            yield from take_images(self._labelled(loader), max_images)
        finally:
            for reason, count in loader.skips.counts.items():
                self.skipped[reason] += count

    def _labelled(self, loader):
        for batch in loader:
            images, labels = batch["images"], batch["labels"]
            unlabelled = labels < 0
            if unlabelled.any():
                self.skipped["missing_label"] += int(unlabelled.sum())
                images, labels = images[~unlabelled], labels[~unlabelled]
            if len(labels):
                yield images, labels


def sample_indices(num_items: int, max_items: int | None, seed: int = 0) -> list[int]:
    """All indices, or a seeded sample of `max_items` of them in order: a spread over
    all classes, not the first classes in folder order."""
    if max_items is None or max_items >= num_items:
        return list(range(num_items))
    keep = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed))[:max_items]
    return sorted(keep.tolist())


def take_images(batches, max_images: int | None):
    """(images, labels) batches, cut off after `max_images` images in all (None: no limit)."""
    seen = 0
    for images, labels in batches:
        if max_images is not None:
            images, labels = images[:max_images - seen], labels[:max_images - seen]
        seen += len(labels)
        yield images, labels
        if max_images is not None and seen >= max_images:
            return


def _looks_like_shards(path: str) -> bool:
    if any(ch in path for ch in "{*?[") or "::" in path or path.endswith(".tar"):
        return True
    p = Path(path)
    return p.is_dir() and (any(p.glob("*.tar")) or any((p / "shards").glob("*.tar")))


def _shard_classnames(path: str) -> list[str] | None:
    """classnames.txt beside the shards (or in the folder / its shards/ subfolder)."""
    p = Path(path.split("::")[0])
    candidates = [p / CLASSNAMES_FILE, p / "shards" / CLASSNAMES_FILE] if p.is_dir() else []
    candidates.append(p.parent / CLASSNAMES_FILE)
    for c in candidates:
        if c.is_file():
            return load_classnames(c)
    return None


def _imagenet_layout(val_dir: Path, classnames: list[str] | None) -> tuple[list[str], list[int], list[str]]:
    """(wnid folders, their labels, class names) via data_pipelines.imagenet's mapping."""
    from data_pipelines.imagenet import imagenet_classes, standard_wnids, wnid_folders

    wnids = wnid_folders(val_dir)
    if classnames is None:
        names_file = val_dir / CLASSNAMES_FILE
        pairs = imagenet_classes(val_dir, names_file if names_file.is_file() else None)
        return wnids, list(range(len(wnids))), [name for _, name in pairs]
    standard = {w: i for i, w in enumerate(standard_wnids())}
    if len(classnames) == len(standard) and all(w in standard for w in wnids):
        # All 1000 names given for a subset of the folders: a 1000-way classifier, standard labels.
        return wnids, [standard[w] for w in wnids], classnames
    if len(classnames) == len(wnids):
        return wnids, list(range(len(wnids))), classnames
    raise DataLayoutError(f"{val_dir}: {len(wnids)} wnid folders but {len(classnames)} class names "
                          f"(give one per folder in sorted order, or all {len(standard)})")


def open_benchmark_images(path: str | os.PathLike, image_size: int, classnames: Sequence[str] | None = None,
                          split: str = "test") -> ShardImages:
    """A CLIP_benchmark classification folder as labelled images, with its class names and templates."""
    from .benchmark_sets import CLASSIFICATION, open_benchmark_set

    benchmark_set = open_benchmark_set(path, split)
    if benchmark_set.task != CLASSIFICATION:
        raise DataLayoutError(f"{benchmark_set.root}: a retrieval set (dataset_type.txt); use `limoe eval retrieval`")
    names = list(classnames) if classnames is not None else benchmark_set.classnames
    data = ShardImages(benchmark_set.shards, image_size, names, benchmark_set.description())
    data.templates = benchmark_set.templates
    return data


def open_labelled_images(path: str | os.PathLike, transform, image_size: int,
                         classnames: Sequence[str] | None = None, split: str = "test") -> LabelledImages:
    """Open a labelled image set (see the module docstring for the layouts); `split` is the
    split folder of a CLIP_benchmark layout."""
    from data_pipelines.folder import class_display_name, class_folders, list_images
    from data_pipelines.imagenet import find_imagenet_val_dir

    from .benchmark_sets import is_benchmark_set

    spec = str(path)
    classnames = list(classnames) if classnames is not None else None
    if is_benchmark_set(spec, split):
        return open_benchmark_images(spec, image_size, classnames, split)
    if _looks_like_shards(spec):
        names = classnames if classnames is not None else _shard_classnames(spec)
        return ShardImages(spec, image_size, names, {"layout": "webdataset", "path": spec})

    root = Path(spec)
    if not root.is_dir():
        raise DataLayoutError(f"{root}: not a folder, a .tar shard or a shard pattern")
    try:
        val_dir = find_imagenet_val_dir(root)
    except FileNotFoundError:
        val_dir = None
    if val_dir is not None:
        folders, labels, classnames = _imagenet_layout(val_dir, classnames)
        root, layout = val_dir, "imagenet"
    else:
        folders = class_folders(root)
        if not folders:
            raise DataLayoutError(f"{root}: no class folders (expected one subfolder per class)")
        names_file = root / CLASSNAMES_FILE
        if classnames is None and names_file.is_file():
            classnames = load_classnames(names_file)
        if all(name.isdigit() for name in folders):
            if classnames is None:
                raise DataLayoutError(f"{root}: class folders are numbered; give class names "
                                      f"(--classnames FILE or {names_file})")
            labels = [int(name) for name in folders]
            too_big = [name for name, label in zip(folders, labels) if label >= len(classnames)]
            if too_big:
                raise DataLayoutError(f"{root}: folders {too_big[:5]} are past the {len(classnames)} class names")
            layout = "numbered_folders"
        else:
            if classnames is None:
                classnames = [class_display_name(name) for name in folders]
                labels = list(range(len(folders)))
            elif all(name in classnames for name in folders):
                labels = [classnames.index(name) for name in folders]
            elif len(classnames) == len(folders):
                labels = list(range(len(folders)))  # sorted folder order, as torchvision's ImageFolder
            else:
                raise DataLayoutError(f"{root}: {len(folders)} class folders do not match the "
                                      f"{len(classnames)} class names (by name or by count)")
            layout = "named_folders"
    samples = [(image, label) for name, label in zip(folders, labels) for image in list_images(root / name)]
    if not samples:
        raise DataLayoutError(f"{root}: no image files in the class folders")
    return FolderImages(samples, transform, classnames,
                        {"layout": layout, "path": str(root), "class_folders": len(folders)})
