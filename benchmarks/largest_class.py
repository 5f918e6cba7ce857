"""How much of a coarse-level zero-shot top-1 is the largest class?

Subcategory and category top-1 count every image once, so the largest class weighs most: on
Twemoji `country-flag` holds 259 of the 1,911 images (13.6 %) and `people and body` 386 (20.2 %).
For each trained run (a folder with `export/`, as `benchmarks/quality.py` and `limoe demo` write
them) and each coarse granularity, this splits top-1 into the recall of the largest class and
top-1 on all the other images, with the demo's prompts, per run and as the mean over the seeds
of each variant (a run folder named `<variant>-seed<s>`).

    python benchmarks/largest_class.py --data data/emoji-twitter \\
        runs/quality/runs/limoe-e8e-bpe-seed{0,1,2} runs/quality/runs/open_clip-seed{0,1,2}

Prints a markdown table and writes JSON (--out). Evaluation only: about 10 s per run on 2 cores.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from name_errors import check_runs, report_runs, run_parser, runs_by_variant  # noqa: E402

COARSE = ("subcategory", "category")


def split_largest(per_class: list[dict]) -> dict:
    """{largest, images, largest_top1, others_top1, top1} from eval.zeroshot's per-class rows
    (`name`, `images`, `top1`); ties go to the first class."""
    largest = max(per_class, key=lambda row: row["images"])
    others = [row for row in per_class if row is not largest]
    n_others = sum(row["images"] for row in others)
    n_all = n_others + largest["images"]
    hits_others = sum(row["top1"] * row["images"] for row in others)
    return {"largest": largest["name"], "images": largest["images"], "largest_top1": largest["top1"],
            "others_top1": hits_others / n_others if n_others else 0.0,
            "top1": (hits_others + largest["top1"] * largest["images"]) / n_all}


def measure(export: Path, data: Path) -> dict[str, dict]:
    import limoe
    from launch.demo import zeroshot_at

    model, preprocess, tokenizer = limoe.load(export)
    return {g: split_largest(zeroshot_at(model, preprocess, tokenizer, data, g)["per_class"]) for g in COARSE}


def per_variant(per_run: dict[str, dict]) -> dict[str, dict]:
    """{variant: {granularity: the split's three top-1s averaged over the variant's seeds}}."""
    summary: dict[str, dict] = {}
    for v, runs in runs_by_variant(per_run).items():
        summary[v] = {}
        for g in COARSE:
            rows = [per_run[r][g] for r in runs]
            means = {key: statistics.fmean(row[key] for row in rows) for key in ("top1", "largest_top1", "others_top1")}
            summary[v][g] = {**means, "largest": rows[0]["largest"], "n": len(rows)}
    return summary


def table(summary: dict) -> str:
    lines = ["| variant | seeds | granularity | top-1 | recall of the largest class | top-1 on the other images |",
             "|---|---:|---|---:|---:|---:|"]
    for v, by_g in summary.items():
        for g, s in by_g.items():
            lines.append(f"| {v} | {s['n']} | {g} | {100 * s['top1']:.1f} | {100 * s['largest_top1']:.1f} "
                         f"({s['largest']}) | {100 * s['others_top1']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = run_parser(__doc__, "the evaluation style's data set", "largest_class.json")
    args = p.parse_args(argv)
    check_runs(p, args.runs)
    if not all((args.data / "zeroshot" / g).is_dir() for g in COARSE):
        p.error(f"{args.data}/zeroshot/subcategory or category not found: pass a `limoe data emoji` folder")

    return report_runs(args, lambda export: measure(export, args.data), per_variant, table,
                       f"Zero-shot top-1 (%) on {args.data.name}, split at the largest class, mean over each "
                       "variant's seeds:")


if __name__ == "__main__":
    sys.exit(main())
