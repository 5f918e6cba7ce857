"""Tiny datasets in CLIP_benchmark's WebDataset layout, written by hand (no clip_benchmark needed).

Same files as clip_benchmark.webdataset_builder writes: DIR/test/{0..N-1}.tar with
`s0000000`-keyed samples (image under webp/png/jpg, `cls` or newline-joined `txt`),
DIR/test/nshards.txt, classnames.txt, zeroshot_classification_templates.txt, and
dataset_type.txt for retrieval sets.
"""
import io
from pathlib import Path

import webdataset as wds
from PIL import Image


def image_bytes(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    options = {"webp": dict(format="webp", lossless=True), "png": dict(format="png"), "jpg": dict(format="jpeg")}
    image.save(buffer, **options[fmt])
    return buffer.getvalue()


def _write_split(root: Path, samples: list[dict], per_shard: int, split: str) -> None:
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    shards = [samples[i:i + per_shard] for i in range(0, len(samples), per_shard)]
    for number, shard in enumerate(shards):
        with wds.TarWriter(str(folder / f"{number}.tar")) as sink:
            for sample in shard:
                sink.write(sample)
    (folder / "nshards.txt").write_text(f"{len(shards)}\n")


def write_classification_set(root, images: list[tuple[Image.Image, int]], classnames: list[str],
                             templates: list[str] | None, per_shard: int = 4, fmt: str = "webp",
                             split: str = "test") -> Path:
    root = Path(root)
    samples = [{"__key__": f"s{i:07d}", fmt: image_bytes(image, fmt), "cls": label}
               for i, (image, label) in enumerate(images)]
    _write_split(root, samples, per_shard, split)
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    if templates is not None:
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    return root


def write_retrieval_set(root, images: list[tuple[Image.Image, list[str]]], per_shard: int = 4, fmt: str = "webp",
                        split: str = "test") -> Path:
    root = Path(root)
    samples = [{"__key__": f"s{i:07d}", fmt: image_bytes(image, fmt), "txt": "\n".join(captions)}
               for i, (image, captions) in enumerate(images)]
    _write_split(root, samples, per_shard, split)
    (root / "dataset_type.txt").write_text("retrieval\n")
    return root
