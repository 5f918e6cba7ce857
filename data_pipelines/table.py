"""Shards from a table (CSV, TSV, or parquet if pyarrow is installed) of local image paths and captions.

Relative image paths are resolved against `image_root` (default: the table's
folder). A caption cell may hold several captions split by `caption_sep`.
Rows whose image file is missing are skipped and counted.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Iterator

from .writer import Record, ShardSetWriter, WriteSummary


def read_rows(table: Path) -> Iterator[dict]:
    suffix = table.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise RuntimeError(
                f"{table}: reading parquet needs pyarrow (pip install pyarrow), or convert the table to CSV"
            ) from None
        yield from pq.read_table(table).to_pylist()
        return
    with open(table, newline="", encoding="utf-8") as f:
        yield from csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")


def _label(value):
    if value is None or str(value).strip() == "":
        return None
    text = str(value).strip()
    return int(text) if text.lstrip("-").isdigit() else text


def build_table_dataset(
    table: str | os.PathLike,
    image_col: str,
    caption_col: str,
    out_dir: str | os.PathLike,
    label_col: str | None = None,
    caption_sep: str | None = None,
    image_root: str | os.PathLike | None = None,
    prefix: str | None = None,
    maxcount: int = 10_000,
) -> WriteSummary:
    """Write `<out_dir>/shards/<prefix>-%06d.tar` (+ sizes.json, skipped.json)."""
    table = Path(table)
    if not table.is_file():
        raise FileNotFoundError(f"table {table} does not exist")
    root = Path(image_root) if image_root else table.parent
    prefix = prefix or table.stem
    with ShardSetWriter(Path(out_dir) / "shards", prefix, maxcount=maxcount) as writer:
        for row_number, row in enumerate(read_rows(table), start=1):
            if row_number == 1:
                wanted = [c for c in (image_col, caption_col, label_col) if c]
                missing = [c for c in wanted if c not in row]
                if missing:
                    raise ValueError(f"{table}: no column(s) {missing}; columns are {list(row)}")
            image_path = str(row[image_col] or "").strip()
            source = image_path or f"row {row_number}"
            path = Path(image_path) if os.path.isabs(image_path) else root / image_path
            if not image_path or not path.is_file():
                writer.skip(source, "missing_image_file", f"row {row_number}: {path}")
                continue
            cell = str(row[caption_col] or "")
            captions = cell.split(caption_sep) if caption_sep else [cell]
            label = _label(row[label_col]) if label_col else None
            writer.write(Record(os.path.splitext(image_path)[0], path.read_bytes(), captions, label,
                                {"source": image_path, "row": row_number}))
    return writer.summary
