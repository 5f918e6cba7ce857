"""Where name-level zero-shot accuracy differs between trained models, on the emoji data.

For each trained run (a folder with `export/`, as `benchmarks/quality.py` and `limoe demo`
write them), classify every Twemoji image among the 1,910 emoji names with the demo's
prompts, then report:

- name-level top-1 within each category (flags, people and body, ...), over all names and
  over all but the flags, per run and as the mean over the seeds of each variant (a run
  folder named `<variant>-seed<s>`);
- how much two runs agree on which names they get right: the Jaccard overlap of their sets of
  correct names, averaged over pairs of seeds of one variant ("within") and over pairs of
  runs of two variants ("between"). If two seeds of one model agree about as little as two
  different models do, a name-level difference between the models is mostly seed noise.

    python benchmarks/name_errors.py --data data/emoji-twitter \\
        runs/quality/runs/limoe-sp8000-cls-e8-entropy-seed{0,1,2} runs/quality/runs/open_clip-seed{0,1,2}

Prints markdown tables and writes JSON (--out). Evaluation only: about 20 s per run on 2 cores.
"""
from __future__ import annotations

import argparse
import itertools
import re
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def variant_of(run: Path) -> str:
    return re.sub(r"-seed\d+$", "", run.name)


def runs_by_variant(runs) -> dict[str, list[str]]:
    """Run folder names grouped by variant (`<variant>-seed<s>`), in the order given."""
    grouped: dict[str, list[str]] = {}
    for run in runs:
        grouped.setdefault(variant_of(Path(run)), []).append(run)
    return grouped


def run_parser(doc: str, data_help: str, out: str) -> argparse.ArgumentParser:
    """The arguments the run-analysis scripts share: run folders, --data and --out."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders, each with export/ (named <variant>-seed<s>)")
    p.add_argument("--data", type=Path, default=Path("data/emoji-twitter"),
                   help=f"{data_help} (default data/emoji-twitter)")
    p.add_argument("--out", type=Path, default=Path(out), help=f"JSON output (default {out})")
    return p


def check_runs(parser: argparse.ArgumentParser, runs: list[Path]) -> None:
    """Refuse, through the parser, run folders without export/."""
    missing = [str(r) for r in runs if not (r / "export").is_dir()]
    if missing:
        parser.error("no export/ in " + ", ".join(missing))


def report_runs(args, measure, per_variant, table, heading: str, **extra) -> int:
    """The run-analysis scripts' main loop: `measure(export_dir)` for each run in args.runs (a
    progress bar), summarise per variant, print `heading` and the markdown table, and write the
    per-run and per-variant results (plus `extra`) as JSON to args.out."""
    from tqdm import tqdm

    from limoe.files import write_json

    per_run = {run.name: measure(run / "export") for run in tqdm(args.runs, desc="runs", unit="run")}
    summary = per_variant(per_run)
    print(f"\n{heading}\n")
    print(table(summary))
    write_json({"per_run": per_run, "per_variant": summary, "runs": [str(r) for r in args.runs],
                "data": str(args.data), **extra}, args.out)
    print(f"\nwrote {args.out}")
    return 0


def name_categories(zeroshot: Path) -> tuple[list[str], list[str]]:
    """The category of each name class (by index), from the image files the two folders share."""
    names = (zeroshot / "name" / "classnames.txt").read_text().splitlines()
    categories = (zeroshot / "category" / "classnames.txt").read_text().splitlines()
    category_of_file = {f.name: categories[int(d.name)]
                        for d in (zeroshot / "category").iterdir() if d.is_dir() for f in d.iterdir()}
    of_name = []
    for i in range(len(names)):
        files = sorted((zeroshot / "name" / f"{i:05d}").iterdir())
        found = {category_of_file.get(f.name) for f in files} - {None}
        if len(found) != 1:
            raise SystemExit(f"error: name class {i} ({names[i]!r}) has images in categories {sorted(found)}")
        of_name.append(found.pop())
    return names, of_name


def name_hits(export: Path, data: Path) -> list[float]:
    """Per name class: the fraction of its Twemoji images classified correctly (top-1), evaluated
    as `limoe demo` and benchmarks/quality.py evaluate."""
    import limoe
    from launch.demo import zeroshot_at

    model, preprocess, tokenizer = limoe.load(export)
    return [row["top1"] for row in zeroshot_at(model, preprocess, tokenizer, data, "name")["per_class"]]


def jaccard(a: list[float], b: list[float]) -> float:
    right_a, right_b = {i for i, v in enumerate(a) if v > 0.5}, {i for i, v in enumerate(b) if v > 0.5}
    return len(right_a & right_b) / max(1, len(right_a | right_b))


def summarize(hits: dict[str, list[float]], category_of: list[str]) -> dict:
    categories = sorted(set(category_of))
    members = {c: [i for i, cat in enumerate(category_of) if cat == c] for c in categories}
    groups = {**members, "all": list(range(len(category_of)))}
    if "flags" in members:  # most of the names a model gets right are flags: the rest, on their own
        groups["all except flags"] = [i for i, cat in enumerate(category_of) if cat != "flags"]
    per_run = {run: {g: statistics.fmean(h[i] for i in idx) for g, idx in groups.items()} for run, h in hits.items()}
    variants = runs_by_variant(hits)
    per_variant = {v: {g: statistics.fmean(per_run[r][g] for r in runs) for g in groups} for v, runs in variants.items()}
    agreement = {}
    for v, w in itertools.combinations_with_replacement(variants, 2):
        pairs = (itertools.combinations(variants[v], 2) if v == w
                 else itertools.product(variants[v], variants[w]))
        values = [jaccard(hits[a], hits[b]) for a, b in pairs]
        if values:
            agreement[f"{v} vs {w}"] = {"mean": statistics.fmean(values), "pairs": len(values)}
    return {"classes_per_group": {g: len(idx) for g, idx in groups.items()}, "per_run": per_run,
            "per_variant": per_variant, "agreement": agreement, "variants": variants}


def tables(summary: dict) -> str:
    variants = list(summary["per_variant"])
    lines = ["| category | names | " + " | ".join(variants) + " |", "|---|---:|" + "---:|" * len(variants)]
    for group, n in summary["classes_per_group"].items():
        label = f"**{group}** (mean over names)" if group.startswith("all") else group
        lines.append(f"| {label} | {n} | " + " | ".join(f"{100 * summary['per_variant'][v][group]:.1f}"
                                                         for v in variants) + " |")
    lines += ["", "| runs compared | pairs | Jaccard overlap of the names each gets right |", "|---|---:|---:|"]
    for key, a in summary["agreement"].items():
        lines.append(f"| {key} | {a['pairs']} | {a['mean']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = run_parser(__doc__, "the Twemoji data set (its zeroshot/name and zeroshot/category)", "name_errors.json")
    args = p.parse_args(argv)
    zeroshot = args.data / "zeroshot"
    check_runs(p, args.runs)
    if not (zeroshot / "name").is_dir():
        p.error(f"{zeroshot}/name not found: pass --data, the folder `limoe data emoji --style twitter` built")

    from tqdm import tqdm

    from limoe.files import write_json

    names, category_of = name_categories(zeroshot)
    hits = {}
    for run in tqdm(args.runs, desc="runs", unit="run"):
        hits[run.name] = name_hits(run / "export", args.data)
        if len(hits[run.name]) != len(names):
            raise SystemExit(f"error: {run} scored {len(hits[run.name])} classes, the data has {len(names)}")
    summary = summarize(hits, category_of)
    print("\nName-level top-1 (%) on Twemoji within each category, mean over each variant's seeds:\n")
    print(tables(summary))
    write_json({**summary, "runs": [str(r) for r in args.runs], "hits": hits}, args.out)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
