"""`limoe eval suite`: one export on a list of dataset folders, into one table.

Each folder is evaluated as `limoe eval zeroshot` or `limoe eval retrieval`
would (a CLIP_benchmark folder whose dataset_type.txt says retrieval is a
retrieval set; anything else is classification, in any layout that
`limoe eval zeroshot` reads), with each set's own class names and templates
unless `--templates` is given. A dataset that fails (unreadable folder, no
class names) gets its error in the table and the others still run.

The table has one row per dataset: name, task, path, images, the metrics of
its task (top1, top5, mean_per_class_recall; or image_to_text_R@k and
text_to_image_R@k), seconds and error. It is written as CSV (fractions),
JSON (the rows plus every dataset's full result document) or markdown
(percentages), chosen by the output file's suffix.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Callable

from limoe.files import atomic_path

CLASSIFICATION_METRICS = ("top1", "top5", "mean_per_class_recall")
RETRIEVAL_METRICS = tuple(f"{direction}_R@{k}" for direction in ("image_to_text", "text_to_image")
                          for k in (1, 5, 10))
COLUMNS = ("dataset", "task", "images", *CLASSIFICATION_METRICS, *RETRIEVAL_METRICS, "seconds", "path", "error")
TABLE_FORMATS = (".csv", ".json", ".md")


def dataset_task(path: str, split: str) -> str:
    """'retrieval' for a CLIP_benchmark retrieval folder, else 'zeroshot_classification'."""
    from .benchmark_sets import RETRIEVAL, BenchmarkSetError, is_benchmark_set, open_benchmark_set

    if is_benchmark_set(path, split):
        try:
            if open_benchmark_set(path, split).task == RETRIEVAL:
                return "retrieval"
        except BenchmarkSetError:
            pass  # reported when the set is opened for evaluation
    return "zeroshot_classification"


def dataset_name(path: str, split: str) -> str:
    from .benchmark_sets import BenchmarkSetError, is_benchmark_set, open_benchmark_set

    if is_benchmark_set(path, split):
        try:
            return open_benchmark_set(path, split).name
        except BenchmarkSetError:
            pass
    return Path(path).resolve().name or str(path)


def _unique_names(paths: list[str], split: str) -> list[str]:
    names = [dataset_name(p, split) for p in paths]
    return [name if names.count(name) == 1 else str(path) for name, path in zip(names, paths)]


def _row(name: str, task: str, path: str, doc: dict | None, seconds: float, error: str | None) -> dict:
    row = {column: None for column in COLUMNS}
    row.update(dataset=name, task=task, path=path, seconds=round(seconds, 3), error=error)
    if doc is not None:
        row["images"] = doc["counts"]["images"]
        row.update({k: v for k, v in doc["metrics"].items() if k in row})
    return row


def evaluate_suite(args: argparse.Namespace, documents: dict[str, Callable[[argparse.Namespace], dict]]) -> dict:
    """Run `documents[task](args for one dataset)` for every folder in `args.data`.

    Returns {"rows", "results" (name -> document), "markdown", "model", "split"}.
    """
    rows, results = [], {}
    paths = [str(p) for p in args.data]
    for index, (name, path) in enumerate(zip(_unique_names(paths, args.split), paths), 1):
        task = dataset_task(path, args.split)
        one = argparse.Namespace(**{**vars(args), "data": path, "classnames": None, "class_prompts": None})
        print(f"[{index}/{len(paths)}] {name}: {task} on {path}", file=sys.stderr)
        t0 = time.perf_counter()
        doc = error = None
        try:
            doc = documents[task](one)
            results[name] = doc
        except Exception as exc:  # one broken dataset must not cost the rest of the suite
            error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            print(f"error: {name}: {error}", file=sys.stderr)
        rows.append(_row(name, task, path, doc, time.perf_counter() - t0, error))
    return {"model": str(args.model), "split": args.split, "rows": rows, "results": results,
            "markdown": markdown_table(rows)}


def _used_columns(rows: list[dict]) -> list[str]:
    """The columns some row has a value in (a suite without retrieval has no recall columns)."""
    keep = {"dataset", "task", "images"}
    return [c for c in COLUMNS if c in keep or any(row.get(c) is not None for row in rows)]


def markdown_table(rows: list[dict]) -> str:
    columns = [c for c in _used_columns(rows) if c != "path"]
    numeric = set(CLASSIFICATION_METRICS) | set(RETRIEVAL_METRICS)

    def cell(column, value):
        if value is None:
            return ""
        if column in numeric:
            return f"{100 * value:.2f}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---:" if c in numeric or c in ("images", "seconds") else "---" for c in columns) + "|"]
    lines += ["| " + " | ".join(cell(c, row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n\n(metrics in %)"


def write_suite_outputs(table: dict, path: str | Path) -> Path:
    """Write the table as CSV, JSON or markdown (by suffix), atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_FORMATS:
        raise ValueError(f"{path}: the table is written as .csv, .json or .md")
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            if suffix == ".csv":
                columns = _used_columns(table["rows"])
                writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(table["rows"])
            elif suffix == ".json":
                doc = {k: table[k] for k in ("model", "split", "rows", "results")}
                json.dump(doc, f, indent=2, ensure_ascii=False)
                f.write("\n")
            else:
                f.write(table["markdown"] + "\n")
    return path
