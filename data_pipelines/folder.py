"""Shards from a folder of images.

Caption mode: every image with a sidecar text file (`x.jpg` + `x.txt`, one
caption per line, several lines = several captions); images without one are
skipped and counted.

Class mode (`classes=True`): a folder per class (`root/<class>/**/image`),
class index = position of the folder name in sorted order; each sample gets
`cls` and the class name (underscores as spaces) as caption, plus any sidecar
captions. `classnames.txt` (one name per line, index order) goes next to
the shards.
"""
from __future__ import annotations

import os
from pathlib import Path

from .writer import Record, ShardSetWriter, WriteSummary

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def list_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def sidecar_captions(image: Path) -> list[str] | None:
    """Lines of `<image stem>.txt`, or None if there is no such file."""
    sidecar = image.with_suffix(".txt")
    if not sidecar.is_file():
        return None
    return [line.strip() for line in sidecar.read_text(encoding="utf-8", errors="replace").splitlines()]


def class_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def class_display_name(folder_name: str) -> str:
    return " ".join(folder_name.replace("_", " ").split())


def build_folder_dataset(
    images_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    classes: bool = False,
    prefix: str | None = None,
    maxcount: int = 10_000,
) -> WriteSummary:
    """Write `<out_dir>/shards/<prefix>-%06d.tar` (+ sizes.json, skipped.json, classnames.txt)."""
    root = Path(images_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    prefix = prefix or root.name or "images"
    with ShardSetWriter(Path(out_dir) / "shards", prefix, maxcount=maxcount) as writer:
        if classes:
            folders = class_folders(root)
            if not folders:
                raise ValueError(f"--classes: no class sub-folders in {root}")
            names = [class_display_name(f) for f in folders]
            for index, (folder, name) in enumerate(zip(folders, names)):
                for image in list_images(root / folder):
                    captions = [name] + (sidecar_captions(image) or [])
                    _write(writer, root, image, captions, label=index)
            writer.add_file("classnames.txt", "\n".join(names) + "\n")
        else:
            for image in list_images(root):
                captions = sidecar_captions(image)
                if captions is None:
                    writer.skip(str(image.relative_to(root)), "no_caption_file", f"no {image.with_suffix('.txt').name}")
                    continue
                _write(writer, root, image, captions)
    return writer.summary


def _write(writer: ShardSetWriter, root: Path, image: Path, captions: list[str], label: int | None = None) -> None:
    relative = image.relative_to(root)
    try:
        data = image.read_bytes()
    except OSError as error:
        writer.skip(str(relative), "unreadable_file", str(error))
        return
    writer.write(Record(str(relative.with_suffix("")), data, captions, label, {"source": str(relative)}))
