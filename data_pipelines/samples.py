"""Parsing one raw shard sample (dict of ext -> bytes) into image, captions, label.

Field conventions (see writer.py): the image under `jpg`/`jpeg`/`png`/`webp`,
all captions as a JSON list under `captions.json`, the first caption also
under `txt` (shards from other tools often only have `txt`), an integer class
under `cls`, free-form metadata under `json`.

A sample that cannot be used is counted in the SkipCounter with the reason
and `None` is returned; the caller just moves on.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

from PIL import Image

from .skips import (
    BAD_CAPTION_JSON,
    BAD_LABEL,
    EMPTY_CAPTION,
    MISSING_CAPTION,
    MISSING_IMAGE,
    TRUNCATED_SAMPLE,
    UNDECODABLE_IMAGE,
    SkipCounter,
)

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
CAPTIONS_FIELD = "captions.json"
CAPTION_FIELD = "txt"
LABEL_FIELD = "cls"
METADATA_FIELD = "json"


@dataclass
class Sample:
    key: str
    image: Image.Image
    captions: list[str] = field(default_factory=list)
    label: int | None = None


class _Reject(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail)
        self.reason = reason


def decode_image(data: bytes) -> Image.Image:
    """Fully decode (not just the header), so truncated files fail here, not in a transform."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _image_bytes(raw: dict) -> bytes:
    for name in IMAGE_FIELDS:
        if name in raw:
            return raw[name]
    raise _Reject(MISSING_IMAGE, "no image field")


def _captions(raw: dict) -> list[str]:
    if CAPTIONS_FIELD in raw:
        try:
            captions = json.loads(raw[CAPTIONS_FIELD])
        except (ValueError, UnicodeDecodeError) as error:
            raise _Reject(BAD_CAPTION_JSON, str(error)) from None
        if isinstance(captions, str):
            captions = [captions]
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise _Reject(BAD_CAPTION_JSON, "captions.json is not a list of strings")
    elif CAPTION_FIELD in raw:
        captions = [raw[CAPTION_FIELD].decode("utf-8", errors="replace")]
    else:
        raise _Reject(MISSING_CAPTION, "no captions.json or txt field")
    captions = [" ".join(c.split()) for c in captions]
    captions = [c for c in captions if c]
    if not captions:
        raise _Reject(EMPTY_CAPTION, "all captions are blank")
    return captions


def _label(raw: dict) -> int | None:
    if LABEL_FIELD not in raw:
        return None
    try:
        return int(raw[LABEL_FIELD].decode("ascii").strip())
    except (ValueError, UnicodeDecodeError):
        raise _Reject(BAD_LABEL, repr(raw[LABEL_FIELD][:20])) from None


def parse_sample(raw: dict, skips: SkipCounter, need_captions: bool = True, decode: bool = True) -> Sample | None:
    """Return a Sample, or None (counted in `skips`) if the sample is unusable.

    With `need_captions=False` (classification evaluation) a sample without
    captions is kept with an empty caption list. With `decode=False` the image
    is not decoded (`Sample.image` is None), for caption-only readers.
    """
    key = raw.get("__key__", "?")
    where = f"{key} in {raw.get('__url__', '?')}"
    try:
        data = _image_bytes(raw)
        try:
            captions = _captions(raw)
        except _Reject:
            if need_captions:
                raise
            captions = []
        label = _label(raw)
        image = None
        if decode:
            try:
                image = decode_image(data)
            except Exception as error:  # PIL raises many types for bad bytes
                raise _Reject(UNDECODABLE_IMAGE, f"{type(error).__name__}: {error}") from None
    except _Reject as reject:
        # The sample at the point a tar broke off is incomplete; say so rather than blaming its fields.
        reason = TRUNCATED_SAMPLE if raw.get("__truncated__") else reject.reason
        skips.add(reason, f"{where}: {reject}")
        return None
    return Sample(key=key, image=image, captions=captions, label=label)
