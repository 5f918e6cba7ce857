"""CLIP_benchmark's WebDataset layout, read as it is.

The standard zero-shot sets (CIFAR, ImageNet and its variants, VTAB, COCO and
Flickr captions, ...) are published, and written by CLIP_benchmark's own
converter (`clip_benchmark.webdataset_builder`), as one folder per dataset:

    wds_cifar10/
        test/0.tar 1.tar ... nshards.txt      one folder per split
        classnames.txt                        class names, one per line, in `cls` order
        zeroshot_classification_templates.txt prompt templates, one per line, with {c}
        dataset_type.txt                      "retrieval" or "multilabel"; absent = classification

Samples hold the image under `webp`, `png`, `jpg` or `jpeg`, and either the
class index under `cls` or, in retrieval sets, all captions of the image in
`txt`, one per line. `open_benchmark_set` finds the split's shards (`nshards.txt`
names `0.tar` ... `N-1.tar`, else every `*.tar`), the class names and the
templates; `eval.datasets.open_labelled_images` reads classification sets with
it, `benchmark_caption_loader` gives retrieval batches with every caption line.
The path may also be the split folder itself (`wds_cifar10/test`).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from data_pipelines.loader import (EvalStream, ShardLoader, eval_batches, eval_samples, read_shards,
                                   with_skip_reports)
from data_pipelines.samples import CAPTION_FIELD, CAPTIONS_FIELD
from data_pipelines.shards import split_shards, worker_info
from data_pipelines.skips import SkipCounter
from limoe.transforms import image_transform

from .prompts import load_classnames, load_templates

DEFAULT_SPLIT = "test"
NSHARDS_FILE = "nshards.txt"
TYPE_FILE = "dataset_type.txt"
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
CLASSIFICATION = "zeroshot_classification"
RETRIEVAL = "zeroshot_retrieval"
NAME_PREFIX = "wds_"  # the published folders are called wds_<dataset>


class BenchmarkSetError(ValueError):
    pass


@dataclass
class BenchmarkSet:
    root: Path
    split: str
    task: str  # CLASSIFICATION or RETRIEVAL
    shards: list[str]
    classnames: list[str] | None
    templates: list[str] | None

    @property
    def name(self) -> str:
        """The dataset's name: its folder's, without the `wds_` prefix of the published sets."""
        name = self.root.resolve().name
        return name[len(NAME_PREFIX):] if name.startswith(NAME_PREFIX) and len(name) > len(NAME_PREFIX) else name

    def description(self) -> dict:
        return {"layout": "clip_benchmark", "path": str(self.root), "split": self.split,
                "dataset": self.name, "shards": len(self.shards)}


def _split_folder(root: Path, split: str) -> Path | None:
    folder = root / split
    if folder.is_dir() and ((folder / NSHARDS_FILE).is_file() or any(folder.glob("*.tar"))):
        return folder
    return None


def _locate(path: str | os.PathLike, split: str) -> tuple[Path, str] | None:
    """(dataset root, split) if `path` is a CLIP_benchmark dataset folder or one of its split folders."""
    p = Path(path)
    if not p.is_dir():
        return None
    if _split_folder(p, split) is not None:
        return p, split
    metadata = (TYPE_FILE, CLASSNAMES_FILE, TEMPLATES_FILE)
    if (p / NSHARDS_FILE).is_file() and any((p.parent / name).is_file() for name in metadata):
        return p.parent, p.name
    return None


def is_benchmark_set(path: str | os.PathLike, split: str = DEFAULT_SPLIT) -> bool:
    return _locate(path, split) is not None


def _shard_number(path: Path) -> tuple[int, str]:
    digits = re.fullmatch(r"\d+", path.stem)
    return (int(path.stem) if digits else -1, path.name)


def _split_shards(folder: Path) -> list[str]:
    nshards_file = folder / NSHARDS_FILE
    if nshards_file.is_file():
        text = nshards_file.read_text(encoding="utf-8").strip()
        if not text.isdigit() or int(text) < 1:
            raise BenchmarkSetError(f"{nshards_file}: expected a positive number of shards, found {text[:40]!r}")
        shards = [folder / f"{i}.tar" for i in range(int(text))]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise BenchmarkSetError(f"{folder}: {nshards_file.name} lists {len(shards)} shards but "
                                    f"{len(missing)} are missing ({', '.join(missing[:5])})")
    else:
        shards = sorted(folder.glob("*.tar"), key=_shard_number)  # 2.tar before 10.tar
    return [str(s) for s in shards]


def _dataset_type(root: Path) -> str:
    type_file = root / TYPE_FILE
    kind = type_file.read_text(encoding="utf-8").strip().lower() if type_file.is_file() else "classification"
    if kind == "retrieval":
        return RETRIEVAL
    if kind == "classification":
        return CLASSIFICATION
    raise BenchmarkSetError(f"{type_file}: dataset type {kind!r} is not supported "
                            "(classification or retrieval; multilabel sets are not)")


def open_benchmark_set(path: str | os.PathLike, split: str = DEFAULT_SPLIT) -> BenchmarkSet:
    """The shards, task, class names and templates of a CLIP_benchmark dataset folder."""
    located = _locate(path, split)
    if located is None:
        raise BenchmarkSetError(f"{path}: not a CLIP_benchmark dataset folder (expected {split}/*.tar "
                                f"or {split}/{NSHARDS_FILE})")
    root, split = located
    task = _dataset_type(root)
    classnames = templates = None
    if task == CLASSIFICATION:
        if (root / CLASSNAMES_FILE).is_file():
            classnames = load_classnames(root / CLASSNAMES_FILE)
        if (root / TEMPLATES_FILE).is_file():
            templates = load_templates(root / TEMPLATES_FILE)
    return BenchmarkSet(root=root, split=split, task=task, shards=_split_shards(root / split),
                        classnames=classnames, templates=templates)


# ---- retrieval batches --------------------------------------------------------------


def caption_lines_as_list(raws):
    """CLIP_benchmark's retrieval samples keep all captions in `txt`, one per line: give them
    to the sample parser as the JSON caption list it reads (`captions.json`)."""
    for raw in raws:
        if CAPTION_FIELD in raw and CAPTIONS_FIELD not in raw:
            lines = raw.pop(CAPTION_FIELD).decode("utf-8", errors="replace").splitlines()
            raw[CAPTIONS_FIELD] = json.dumps(lines).encode("utf-8")
        yield raw


class CaptionLinesStream(EvalStream):
    """data_pipelines' evaluation stream with each sample's caption lines as its captions."""

    def __iter__(self):
        worker, num_workers = worker_info()
        shards = split_shards(self.shards, self.rank, self.world_size, worker, num_workers)
        skips = SkipCounter()
        return iter(wds.DataPipeline(
            lambda: ({"url": url} for url in shards),
            lambda urls: caption_lines_as_list(read_shards(urls, skips)),
            lambda raws: eval_samples(raws, skips, self.transform, self.require_captions),
            lambda samples: eval_batches(samples, self.batch_size, self.tokenizer),
            lambda batches: with_skip_reports(batches, skips),
        ))


def benchmark_caption_loader(benchmark_set: BenchmarkSet, image_size: int, batch_size: int,
                             num_workers: int = 0) -> ShardLoader:
    """`build_eval_loader`-style batches (images, caption lists, ...) of a retrieval set,
    every caption line of a sample kept; skips counted in `loader.skips`."""
    if benchmark_set.task != RETRIEVAL:
        raise BenchmarkSetError(f"{benchmark_set.root}: a classification set, not a retrieval set "
                                f"(no {TYPE_FILE} saying retrieval); use `limoe eval zeroshot`")
    stream = CaptionLinesStream(benchmark_set.shards, None, image_transform(image_size, train=False), batch_size,
                                rank=0, world_size=1, require_captions=True)
    return ShardLoader(stream, num_workers, num_batches=None, num_samples=None)
