"""ImageNet-1k validation folders: recognising them and naming their classes.

The standard class index of ImageNet-1k is the position of the WordNet id
(wnid, e.g. n01440764) in sorted order; open_clip's IMAGENET_CLASSNAMES
lists readable names in that same order. So for a folder-per-wnid layout
(`val/n01440764/*.JPEG`, as made by the usual valprep script):

    class index i  <->  i-th sorted wnid folder  <->  IMAGENET_CLASSNAMES[i]

`imagenet_wnids.json` ships the 1000 standard wnids in sorted order, made by
`python -m data_pipelines.imagenet --write-wnids` from the list that timm
(an open_clip dependency) ships in `timm/data/_info/imagenet_synsets.txt`.
It lets us check a folder really is ImageNet-1k and also name a subset of its
classes (e.g. a 10-class Imagenette-style folder): the subset's labels are
positions in its own sorted wnid list, its names come from the standard list.
Folders with wnids outside the standard 1000 need a classnames file (one name
per line, in sorted-wnid order).
"""
from __future__ import annotations

import json
import os
import re
import sys
from functools import lru_cache
from pathlib import Path

from .folder import list_images
from .writer import Record, ShardSetWriter, WriteSummary

WNID_PATTERN = re.compile(r"^n\d{8}$")
WNIDS_FILE = Path(__file__).with_name("imagenet_wnids.json")


@lru_cache(maxsize=1)
def standard_wnids() -> list[str]:
    """The 1000 ImageNet-1k wnids in class-index (sorted) order."""
    wnids = json.loads(WNIDS_FILE.read_text())
    assert len(wnids) == 1000 and wnids == sorted(wnids), "imagenet_wnids.json is damaged"
    return wnids


def standard_classnames() -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def wnid_folders(folder: str | os.PathLike) -> list[str]:
    """Sorted wnid-named sub-folders of `folder`."""
    return sorted(p.name for p in Path(folder).iterdir() if p.is_dir() and WNID_PATTERN.match(p.name))


def find_imagenet_val_dir(root: str | os.PathLike) -> Path:
    """`root` itself if it holds wnid folders, else `root/val`; raises if neither does."""
    root = Path(root)
    for candidate in (root, root / "val"):
        if candidate.is_dir() and wnid_folders(candidate):
            return candidate
    raise FileNotFoundError(
        f"{root} does not look like an ImageNet validation folder: expected wnid-named class folders "
        f"(val/n01440764/*.JPEG) in it or in {root / 'val'}"
    )


def imagenet_classes(val_dir: str | os.PathLike, classnames_file: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """[(wnid, class name)] in class-index order for a folder-per-wnid layout."""
    wnids = wnid_folders(val_dir)
    if classnames_file is not None:
        names = [line.strip() for line in Path(classnames_file).read_text().splitlines() if line.strip()]
        if len(names) != len(wnids):
            raise ValueError(f"{classnames_file} has {len(names)} names for {len(wnids)} wnid folders in {val_dir}")
        return list(zip(wnids, names))
    standard = {wnid: i for i, wnid in enumerate(standard_wnids())}
    unknown = [w for w in wnids if w not in standard]
    if unknown:
        raise ValueError(
            f"{val_dir}: {len(unknown)} folder(s) are not ImageNet-1k wnids (e.g. {unknown[:3]}); "
            "pass a classnames file (one name per line, in sorted folder order)"
        )
    names = standard_classnames()
    if len(wnids) != 1000:
        print(f"note: {val_dir} has {len(wnids)} of the 1000 ImageNet classes; labels index this subset",
              file=sys.stderr)
    return [(wnid, names[standard[wnid]]) for wnid in wnids]


def build_imagenet_shards(
    val_dir: str | os.PathLike, out_dir: str | os.PathLike, classnames_file: str | os.PathLike | None = None,
    prefix: str = "imagenet-val", maxcount: int = 5_000,
) -> WriteSummary:
    """Labelled shards (cls = class index, caption = class name) + classnames.txt, for build_eval_loader."""
    val_dir = find_imagenet_val_dir(val_dir)
    classes = imagenet_classes(val_dir, classnames_file)
    with ShardSetWriter(Path(out_dir) / "shards", prefix, maxcount=maxcount) as writer:
        for index, (wnid, name) in enumerate(classes):
            for image in list_images(val_dir / wnid):
                writer.write(Record(f"{wnid}/{image.stem}", image.read_bytes(), [name], index, {"wnid": wnid}))
        writer.add_file("classnames.txt", "\n".join(name for _, name in classes) + "\n")
    return writer.summary


def _write_wnids_from_timm() -> None:
    import timm

    source = Path(timm.__file__).parent / "data" / "_info" / "imagenet_synsets.txt"
    wnids = source.read_text().split()
    if len(wnids) != 1000 or wnids != sorted(wnids) or not all(WNID_PATTERN.match(w) for w in wnids):
        raise SystemExit(f"{source} is not the sorted list of 1000 wnids")
    WNIDS_FILE.write_text(json.dumps(wnids, indent=0) + "\n")
    print(f"wrote {WNIDS_FILE} from {source}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-wnids"]:
        _write_wnids_from_timm()
    else:
        print("usage: python -m data_pipelines.imagenet --write-wnids", file=sys.stderr)
        sys.exit(2)
