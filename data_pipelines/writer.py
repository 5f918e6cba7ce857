"""Writing image-caption records into WebDataset tar shards.

One sample per record, fields (webdataset splits the extension at the first
dot of the file name, so a key never contains a dot):

    <key>.jpg | .png | .webp   the original image bytes when already JPEG/PNG/WebP, else re-encoded PNG
    <key>.captions.json        all captions, a JSON list of strings
    <key>.txt                  the first caption (for tools that only read txt)
    <key>.cls                  integer label, if any
    <key>.label.txt            string label, if the label is a string
    <key>.json                 free-form metadata dict, if any

Next to the shards: `sizes.json` (open_clip's {shard_name: count} mapping
plus a "total" entry) and `skipped.json` (inputs left out, with reasons).

Everything is written into a hidden temporary folder next to the output
folder and renamed into place only once complete, so an interrupted build
never leaves a half-written data set that looks finished.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import webdataset as wds
from PIL import Image

from limoe.files import replace_directory

SIZES_FILE = "sizes.json"
SKIPPED_FILE = "skipped.json"
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
MAX_KEY_LENGTH = 80  # ustar names are limited to 100 characters, and the extension needs room
MAX_LISTED_SKIPS = 1000

logger = logging.getLogger("limoe.data")


@dataclass
class Record:
    """One input sample. `source_id` (a path, an emoji code point...) becomes the shard key."""

    source_id: str
    image: bytes | Image.Image
    captions: list[str] = field(default_factory=list)
    label: int | str | None = None
    metadata: dict | None = None


@dataclass
class WriteSummary:
    out_dir: Path
    shards: dict[str, int]  # shard file name -> samples
    skipped: Counter

    @property
    def total(self) -> int:
        return sum(self.shards.values())

    def __str__(self) -> str:
        text = f"wrote {self.total} samples in {len(self.shards)} shard(s) to {self.out_dir}"
        if self.skipped:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in self.skipped.most_common())
            text += f"; skipped {sum(self.skipped.values())} input(s) ({reasons}), see {SKIPPED_FILE}"
        return text


def sanitize_key(source_id: str) -> str:
    """A tar-safe sample key: letters, digits, '_' and '-' only; long ids get a hash suffix."""
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", str(source_id)).strip("_-") or "sample"
    if len(key) > MAX_KEY_LENGTH:
        digest = hashlib.sha1(str(source_id).encode()).hexdigest()[:10]
        key = f"{key[: MAX_KEY_LENGTH - 11]}_{digest}"
    return key


def encode_image(image: bytes | Image.Image) -> tuple[str, bytes]:
    """(extension, bytes): original bytes if JPEG/PNG/WebP, else PNG. Raises if not decodable."""
    if isinstance(image, Image.Image):
        decoded, data = image, None
    else:
        data = bytes(image)
        decoded = Image.open(io.BytesIO(data))
        decoded.load()  # a full decode catches truncated files now rather than at training time
        if decoded.format in KEPT_FORMATS:
            return KEPT_FORMATS[decoded.format], data
    if decoded.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
        decoded = decoded.convert("RGBA" if "A" in decoded.getbands() else "RGB")
    buffer = io.BytesIO()
    decoded.save(buffer, format="PNG")
    return "png", buffer.getvalue()


def clean_captions(captions: Iterable[str]) -> list[str]:
    """Collapse whitespace, drop blanks and exact duplicates, keep order."""
    seen, result = set(), []
    for caption in captions:
        caption = " ".join(str(caption).split())
        if caption and caption not in seen:
            seen.add(caption)
            result.append(caption)
    return result


class ShardSetWriter:
    """Writes records to `<out_dir>/<prefix>-%06d.tar`, atomically as a whole folder.

    with ShardSetWriter("data/emoji/shards", "emoji-google") as writer:
        writer.write(Record("1f600", png_bytes, ["grinning face"]))
        writer.skip("1f601", "missing_image")
    print(writer.summary)

    Leaving the `with` block normally commits (renames the temporary folder
    onto `out_dir`, replacing an older build); an exception discards it.
    Records need at least one caption or a label, else they are skipped.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prefix: str,
        maxcount: int = 10_000,
        maxsize: float = 512e6,
        require_captions: bool = False,
    ):
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.require_captions = require_captions
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = Path(tempfile.mkdtemp(dir=self.out_dir.parent, prefix=f".{self.out_dir.name}.partial-"))
        # mtime fixed so the same inputs give byte-identical shards.
        self._writer = wds.ShardWriter(
            str(self.tmp_dir / f"{prefix}-%06d.tar"), maxcount=maxcount, maxsize=maxsize, verbose=0, mtime=0
        )
        self._counts: Counter[str] = Counter()
        self._keys: set[str] = set()
        self._skips: list[dict] = []
        self.skipped: Counter[str] = Counter()
        self.summary: WriteSummary | None = None

    # ---- writing --------------------------------------------------------------

    def unique_key(self, source_id: str) -> str:
        key = base = sanitize_key(source_id)
        n = 1
        while key in self._keys:
            key = f"{base}_{n}"
            n += 1
        self._keys.add(key)
        return key

    def skip(self, source_id: str, reason: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        if len(self._skips) < MAX_LISTED_SKIPS:
            self._skips.append({"source": str(source_id), "reason": reason, "detail": detail})

    def write(self, record: Record) -> str | None:
        """Write one record; returns its key, or None if it was skipped (and counted)."""
        captions = clean_captions(record.captions)
        if not captions and (self.require_captions or record.label is None):
            self.skip(record.source_id, "no_caption")
            return None
        try:
            ext, image_bytes = encode_image(record.image)
        except Exception as error:  # PIL raises many types for bad bytes
            self.skip(record.source_id, "undecodable_image", f"{type(error).__name__}: {error}")
            return None
        key = self.unique_key(record.source_id)
        sample = {"__key__": key, ext: image_bytes}
        if captions:
            sample["captions.json"] = json.dumps(captions, ensure_ascii=False).encode()
            sample["txt"] = captions[0].encode()
        if isinstance(record.label, int):
            sample["cls"] = str(record.label).encode()
        elif record.label is not None:
            sample["label.txt"] = str(record.label).encode()
        if record.metadata:
            sample["json"] = json.dumps(record.metadata, ensure_ascii=False, sort_keys=True).encode()
        self._writer.write(sample)
        self._counts[os.path.basename(self._writer.fname)] += 1
        return key

    def add_file(self, name: str, content: str | bytes) -> None:
        """An extra file committed with the shards (e.g. classnames.txt)."""
        data = content.encode() if isinstance(content, str) else content
        (self.tmp_dir / name).write_bytes(data)

    # ---- finishing ------------------------------------------------------------

    def commit(self) -> WriteSummary:
        self._writer.close()
        for shard in self.tmp_dir.glob("*.tar"):
            if shard.name not in self._counts:  # ShardWriter opens its first shard eagerly
                shard.unlink()
        if not self._counts:
            reasons = dict(self.skipped) or "no inputs"
            self.abort()
            raise ValueError(f"no samples to write to {self.out_dir} (skipped: {reasons})")
        shards = dict(sorted(self._counts.items()))
        sizes = {**shards, "total": sum(shards.values())}
        self.add_file(SIZES_FILE, json.dumps(sizes, indent=1) + "\n")
        skipped = {"total": sum(self.skipped.values()), "reasons": dict(self.skipped), "items": self._skips}
        self.add_file(SKIPPED_FILE, json.dumps(skipped, indent=1) + "\n")
        replace_directory(self.tmp_dir, self.out_dir)
        self.summary = WriteSummary(self.out_dir, shards, Counter(self.skipped))
        logger.info("%s", self.summary)
        return self.summary

    def abort(self) -> None:
        try:
            self._writer.close()
        except Exception:
            pass
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> "ShardSetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_shards(
    records: Iterable[Record], out_dir: str | os.PathLike, prefix: str, maxcount: int = 10_000, maxsize: float = 512e6
) -> WriteSummary:
    """Write all records and commit; see ShardSetWriter."""
    with ShardSetWriter(out_dir, prefix, maxcount=maxcount, maxsize=maxsize) as writer:
        for record in records:
            writer.write(record)
    return writer.summary
