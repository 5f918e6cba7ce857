"""`limoe demo`: real data end to end, on a 2-core CPU box.

The default budget is 935 training steps (--minutes 10 at 110 steps a minute): about 11 minutes
on 2 idle cores of a fast machine, 27 on the slowest day measured (README, "Two commands
for a fresh machine").

1. build the emoji data sets (Noto = google, Twemoji = twitter) with the data builder (cached);
2. the tokenizer (trained on the Noto training captions, or open_clip's BPE; cached by kind);
3. train the demo preset through the `deepspeed` launcher: 2 CPU ranks, ep_size 2, Noto only;
4. with --compare, the same steps and batch for the dense twin (`dense`) and/or the dense
   two-tower open_clip CLIP of the same width, depth and FLOPs per pair (`open_clip`, with
   open_clip's own BPE tokenizer and loss: no caption positives);
5. export, then zero-shot on Twemoji (never seen) by emoji name, subcategory and category;
6. plots (loss curve, routing heat map), report.md, and the lines to serve the result.

The training budget is a number of steps derived from --minutes with a
throughput measured on a 2-core machine (STEPS_PER_MINUTE), not a wall-clock
cut, so a run is reproducible whatever the machine's speed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

STYLES = {"train": "google", "eval": "twitter"}
GRANULARITIES = ("name", "subcategory", "category")
# Prompts that look like the training captions (see data_pipelines/emoji.py):
# "grinning face", "an emoji of grinning face", "a face-smiling emoji", "an emoji from smileys and emotion".
TEMPLATES = {
    "name": ["{}", "an emoji of {}"],
    "subcategory": ["a {} emoji"],
    "category": ["an emoji from {}"],
}
# Measured: `limoe demo` training (limoe-nano, 2 CPU ranks, batch 2 x 64) ran 2.3 steps/s on an
# idle 2-core Intel Xeon machine with 4 experts (138/min); 110 leaves a margin for slower or busier
# machines. With 8 experts on a 2-core AMD EPYC machine it ran about 1.6 steps/s (96/min), so there
# a --minutes budget runs over by about a seventh. On 2026-12-07 the same AMD machine, running slower
# that day, trained the round-22 layout at 0.6 steps/s (its step in one process is as fast as the
# 8-expert layout's: README). The default budget stays 935 steps (10 minutes at 110 steps/min),
# the number of pairs every comparison in docs/quality.md uses.
STEPS_PER_MINUTE = 110
FIXED_MINUTES = 1.5  # data (cached), tokenizer, DeepSpeed start-up, export and evaluation
DEMO_CONFIG = "cpu-demo"
# open_clip's bundled BPE (49,408 tokens; nothing trained or downloaded). Chosen by the emoji
# ablation (docs/quality.md, round 8): with 8 experts and the entropy losses, +1.5 points by name over
# SentencePiece asked for 8,000 pieces (~1.9k on these captions; 3 seeds), putting LIMoE ahead of the
# open_clip peer by name and category and 0.3 points behind by subcategory.
DEFAULT_TOKENIZER = "bpe"


def stage(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def budget_steps(minutes: float) -> int:
    return max(1, int((minutes - FIXED_MINUTES) * STEPS_PER_MINUTE))


def build_data(data_dir: Path, cache_dir: str | None, tarball_dir: str | None = None) -> dict[str, Path]:
    """The two emoji sets; `tarball_dir` (--tarball-dir) is where the npm packages are read from,
    passed down rather than set in the environment, which would outlive the demo in the process."""
    from data_pipelines.emoji import build_emoji_dataset, is_current_build

    out = {}
    for role, style in STYLES.items():
        target = data_dir / f"emoji-{style}"
        if is_current_build(target):
            print(f"{style}: cached at {target}")
        else:
            print(build_emoji_dataset(style, target, cache_dir=cache_dir, tarball_dir=tarball_dir))
            for stale in target.glob("tokenizer*"):  # trained on the captions of an older build
                stale.unlink()
        out[role] = target
    return out


# SentencePiece model types a tokenizer kind can name: "sp<N>" is unigram, "spbpe<N>" BPE.
SENTENCEPIECE_KINDS = {"spbpe": "bpe", "sp": "unigram"}  # longest prefix first


def tokenizer_kind(kind: str) -> str:
    """Check a tokenizer kind: "bpe" (open_clip's), "sp<N>" (SentencePiece unigram asked for N pieces)
    or "spbpe<N>" (SentencePiece BPE asked for N pieces)."""
    if kind == "bpe" or sentencepiece_kind(kind) is not None:
        return kind
    raise ValueError(f"unknown tokenizer {kind!r}: 'bpe' (open_clip's BPE), 'sp<N>' (SentencePiece unigram, "
                     "N pieces) or 'spbpe<N>' (SentencePiece BPE, N pieces)")


def sentencepiece_kind(kind: str) -> tuple[str, int] | None:
    """(model type, pieces asked for) of a SentencePiece kind, None for anything else."""
    for prefix, model_type in SENTENCEPIECE_KINDS.items():
        size = kind[len(prefix):]
        if kind.startswith(prefix) and size.isdigit() and int(size) > 0:
            return model_type, int(size)
    return None


def prepare_tokenizer(train_dir: Path, kind: str, context_length: int) -> Path:
    """The tokenizer file of `kind`, cached in the training set's folder under a name per kind
    (tokenizer-sp8000.model, tokenizer-spbpe8000.model, tokenizer.bpe.json), so asking for another
    size or type never reuses one. SentencePiece is trained on the training captions; open_clip's BPE
    is only written out."""
    from data_pipelines.loader import build_tokenizer
    from limoe.tokenizer import load_tokenizer

    kind = tokenizer_kind(kind)
    path = train_dir / ("tokenizer.bpe.json" if kind == "bpe" else f"tokenizer-{kind}.model")
    if path.is_file() and load_tokenizer(path).context_length == context_length:
        print(f"cached at {path}")
        return path
    model_type, asked = sentencepiece_kind(kind) or (None, 0)
    tokenizer = build_tokenizer(path, str(train_dir / "shards"), asked, context_length,
                                **({"model_type": model_type} if model_type else {}))
    print(f"wrote {path}: {tokenizer!r}" + (f" ({model_type}, asked for {asked} pieces)" if asked else ""))
    return path


# Models `--compare` can add: (preset, tokenizer kind or None for the demo's own, table label, overrides).
# The dense twin trains with the demo's recipe; the open_clip peer with open_clip's own loss (plain
# InfoNCE, no caption positives), as the peer of docs/quality.md.
COMPARE = {"dense": ("limoe-nano-dense", None, "dense", []),
           "open_clip": ("open_clip-nano", "bpe", "open_clip", [("data.caption_positives", False)])}


def train(name: str, model_preset: str, data: dict[str, Path], tokenizer: Path, out: Path, steps: int,
          extra: list[tuple[str, object]]) -> Path:
    from launch.launcher import run_training

    overrides = [
        ("name", name),
        ("logs", str(out)),
        ("model.preset", model_preset),
        ("data.train", [{"shards": str(data["train"] / "shards"), "weight": 1.0}]),
        ("data.tokenizer", str(tokenizer)),
        ("train.steps", steps),
        ("schedule.warmup", steps // 10),
        ("checkpoint.every", max(steps, 1)),
        ("checkpoint.export", True),
        *extra,
    ]
    if model_preset.endswith("-dense") or model_preset.startswith("open_clip"):
        overrides.append(("parallel.ep_size", 1))  # no experts to split
    return run_training(DEMO_CONFIG, overrides, resume=None)


def zeroshot_at(model, preprocess, tokenizer, eval_dir: Path, granularity: str, progress: bool = False) -> dict:
    """eval.zeroshot's full result on the data set's folder of one granularity, with the demo's prompts."""
    from eval.zeroshot import evaluate_zeroshot

    return evaluate_zeroshot(model, preprocess, tokenizer, eval_dir / "zeroshot" / granularity,
                             templates=TEMPLATES[granularity], batch_size=256, progress=progress)


def evaluate(export_dir: Path, eval_dir: Path) -> list[dict]:
    import limoe

    model, preprocess, tokenizer = limoe.load(export_dir)
    rows = []
    for granularity in GRANULARITIES:
        result = zeroshot_at(model, preprocess, tokenizer, eval_dir, granularity, progress=True)
        images_per_class = [c["images"] for c in result["per_class"]]
        classes = result["classes"]
        rows.append({
            "granularity": granularity,
            "classes": classes,
            "images": result["images"],
            "top1": result["top1"],
            "top5": result.get("top5"),
            "mean_per_class_recall": result["mean_per_class_recall"],
            "chance_top1": 1.0 / classes,
            "chance_top5": min(5, classes) / classes,
            "majority_top1": max(images_per_class) / result["images"],
        })
    return rows


def model_facts(export_dir: Path) -> dict:
    """What a trained model is: its preset, tokenizer, parameters and forward FLOPs per pair."""
    import limoe
    from limoe.flops import count_parameters, flops_per_pair, measured_flops_per_pair

    model, _, tokenizer = limoe.load(export_dir)
    params = count_parameters(model)
    return {"model": model.config.name, "tokenizer": repr(tokenizer), "parameters": params["total"],
            "active_parameters_per_token": params["active_per_token"],
            "flops_per_pair": flops_per_pair(model.config)["total"], "flops_per_pair_counted": measured_flops_per_pair(model)}


def facts_table(facts: dict[str, dict]) -> str:
    lines = ["| model | preset | tokenizer | parameters | active per token | forward FLOPs per pair (analytic / counted) |",
             "|---|---|---|---:|---:|---:|"]
    for label, f in facts.items():
        lines.append(f"| {label} | {f['model']} | {f['tokenizer']} | {f['parameters'] / 1e6:.2f}M | "
                     f"{f['active_parameters_per_token'] / 1e6:.2f}M | {f['flops_per_pair'] / 1e6:.0f}M / "
                     f"{f['flops_per_pair_counted'] / 1e6:.0f}M |")
    return "\n".join(lines)


def analyze(export_dir: Path, eval_dir: Path, out: Path) -> dict:
    import limoe
    from eval.evaluators import Routing
    from limoe.files import write_json
    from eval.routing import plot_routing

    model, _, tokenizer = limoe.load(export_dir)
    # The Twemoji caption pairs at the training capacity factor, 128 pairs per routing call.
    result = Routing(data=str(eval_dir / "shards"), batch_size=128, max_pairs=1024).evaluate(model, tokenizer)
    plot_routing(result, out / "routing.png")
    write_json(result, out / "routing.json")
    return result


def plot_losses(runs: dict[str, Path], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for label, run_dir in runs.items():
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
        rows = [r for r in rows if "loss" in r]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=f"{label}: total")
        if label == "limoe" and rows and "contrastive_loss" in rows[0]:
            ax.plot([r["step"] for r in rows], [r["contrastive_loss"] for r in rows], "--", label="limoe: contrastive")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("limoe demo: training loss (Noto emoji)")
    ax.legend()
    ax.grid(alpha=0.3)
    FigureCanvasAgg(fig).print_png(str(path))
    return path


def results_table(results: dict[str, list[dict]]) -> str:
    """Top-1/top-5 next to uniform chance and to always guessing the largest class; mean
    per-class recall (chance 1/classes whatever the class sizes) for the unbalanced coarse labels."""
    lines = ["| model | granularity | classes | top-1 | top-5 | mean per-class recall | chance top-1 | chance top-5 "
             "| majority class |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    for model, rows in results.items():
        for r in rows:
            lines.append(f"| {model} | {r['granularity']} | {r['classes']} | {pct(r['top1'])} | {pct(r['top5'])} | "
                         f"{pct(r['mean_per_class_recall'])} | {pct(r['chance_top1'])} | {pct(r['chance_top5'])} | "
                         f"{pct(r['majority_top1'])} |")
    return "\n".join(lines)


def serve_lines(export_dir: Path) -> str:
    name = "limoe-demo"
    return f"""Try the embedding API on the result:

    limoe serve --model {export_dir} --model-name {name} --port 8000
    curl -s http://127.0.0.1:8000/v1/embeddings -H 'Content-Type: application/json' \\
         -d '{{"input": ["grinning face", "red heart"], "model": "{name}"}}' | head -c 300
    curl -s http://127.0.0.1:8000/v1/classify -F input=@some-emoji.png -F labels="red heart" -F labels="grinning face"
    python -c "from openai import OpenAI; c = OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='-'); \\
print(len(c.embeddings.create(model='{name}', input=['grinning face']).data[0].embedding))"
"""


def write_report(out: Path, args, results, routing, runs, seconds: float, steps: int, facts: dict) -> Path:
    import platform

    summary = routing["summary"]
    text = [
        "# limoe demo report",
        "",
        f"- command: `{' '.join(['limoe', *args.argv])}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {platform.machine()}, "
        f"{os.cpu_count()} CPU cores; total time {seconds / 60:.1f} min",
        f"- trained on the Noto (google) emoji for {steps} steps; evaluated zero-shot on Twemoji (twitter), "
        "a drawing style the model never saw",
        "",
        "## Zero-shot on the unseen style",
        "",
        results_table(results),
        "",
        "Prompts: " + "; ".join(f"{g}: {', '.join(repr(t) for t in TEMPLATES[g])}" for g in GRANULARITIES),
        "",
        "## The models",
        "",
        facts_table(facts),
        "",
        "## Training loss",
        "",
        "![loss](loss.png)",
        "",
        "## Routing (LIMoE, Twemoji pairs, training capacity factor)",
        "",
        "![routing](routing.png)",
        "",
        "| modality | drop rate | mean router entropy | busiest expert share | fewest experts used |",
        "|---|---:|---:|---:|---:|",
        *[f"| {m} | {100 * s['drop_rate']:.1f}% | {s['mean_entropy']:.3f} (max {routing['max_entropy']:.3f}) | "
          f"{100 * s['busiest_expert_share']:.1f}% | {s['min_experts_used']} / {routing['num_experts']} |"
          for m, s in summary.items()],
        "",
        "## Runs",
        "",
        *[f"- {label}: `{path}`" for label, path in runs.items()],
        "",
        "## Serve it",
        "",
        "```",
        serve_lines(runs["limoe"] / "export"),
        "```",
    ]
    path = out / "report.md"
    path.write_text("\n".join(text) + "\n")
    return path


def run_demo(args) -> int:
    from launch.launcher import TrainingFailed
    from launch.train_config import ConfigError

    try:
        return demo(args)
    except (ConfigError, TrainingFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def demo(args) -> int:
    from limoe.files import write_json
    from launch.train_config import parse_set

    t0 = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data).resolve() if args.data else out / "data"
    steps = args.steps or budget_steps(args.minutes)
    extra = [parse_set(item) for item in args.set]
    if args.batch_size:
        extra.append(("train.batch_size", args.batch_size))

    compare = list(dict.fromkeys((args.compare or []) + (["dense"] if args.compare_dense else [])))
    tokenizer_kind = f"sp{args.vocab_size}" if args.vocab_size else args.tokenizer

    stage("1/6 emoji data sets (Noto for training, Twemoji for evaluation)")
    data = build_data(data_dir, args.cache, args.tarball_dir)
    stage(f"2/6 tokenizer ({tokenizer_kind})")
    import limoe

    context = limoe.get_config("limoe-nano").context_length
    tokenizers = {kind: prepare_tokenizer(data["train"], kind, context)
                  for kind in dict.fromkeys([tokenizer_kind] + [COMPARE[c][1] or tokenizer_kind for c in compare])}
    stage(f"3/6 training limoe-nano with DeepSpeed: 2 CPU ranks, ep_size 2, {steps} steps")
    runs = {"limoe": train("limoe", "limoe-nano", data, tokenizers[tokenizer_kind], out, steps, extra)}
    if compare:
        stage(f"4/6 training {', '.join(COMPARE[c][0] for c in compare)}: the same steps ({steps}) and batch")
    for name in compare:
        preset, kind, label, own = COMPARE[name]
        runs[label] = train(label, preset, data, tokenizers[kind or tokenizer_kind], out, steps, own + extra)
    stage("5/6 zero-shot on Twemoji, a style the model never saw")
    results = {label: evaluate(run / "export", data["eval"]) for label, run in runs.items()}
    stage("6/6 plots and report")
    plot_losses(runs, out / "loss.png")
    routing = analyze(runs["limoe"] / "export", data["eval"], out)
    facts = {label: model_facts(run / "export") for label, run in runs.items()}
    write_json({"steps": steps, "results": results, "models": facts}, out / "results.json")
    report = write_report(out, args, results, routing, runs, time.time() - t0, steps, facts)

    print("\nZero-shot on the unseen Twemoji style:\n")
    print(results_table(results))
    print(f"\nwrote {report}, {out / 'loss.png'}, {out / 'routing.png'}, {out / 'results.json'}")
    print(f"total time {(time.time() - t0) / 60:.1f} min\n")
    print(serve_lines(runs["limoe"] / "export"))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="build emoji data, train a LIMoE on 2 CPU ranks, evaluate zero-shot on an unseen style",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--minutes", type=float, default=10.0,
                   help="budget, turned into a number of training steps: "
                        f"{STEPS_PER_MINUTE} per minute after {FIXED_MINUTES} fixed minutes, the speed of a fast "
                        "2-core machine (default 10: 935 steps; a slower machine takes longer, the steps stay)")
    p.add_argument("--steps", type=int, default=None, help="train exactly this many steps (overrides --minutes)")
    p.add_argument("--batch-size", type=int, default=None, help="pairs per rank per step (default: the config's)")
    p.add_argument("--compare", action="append", choices=sorted(COMPARE), default=[],
                   help="also train and score this model with the same steps and batch (repeatable): the dense "
                        "twin `dense`, or `open_clip`, open_clip's two-tower CLIP of the same width, depth and "
                        "FLOPs per pair, with open_clip's BPE tokenizer")
    p.add_argument("--compare-dense", action="store_true", help="the same as --compare dense")
    p.add_argument("--data", default=None, help="where the emoji data sets go (default OUT/data; reused if present)")
    p.add_argument("--cache", default=None, help="npm tarball cache (default ~/.cache/limoe/npm)")
    p.add_argument("--tarball-dir", default=None,
                   help="read emoji-datasource-*.tgz from this folder instead of npm (offline)")
    p.add_argument("--tokenizer", type=tokenizer_kind, default=DEFAULT_TOKENIZER, metavar="KIND",
                   help="LIMoE's tokenizer: sp<N> (SentencePiece unigram asked for N pieces, trained on the Noto "
                        "captions), spbpe<N> (SentencePiece BPE, likewise) or bpe (open_clip's BPE); cached in the "
                        f"data folder per kind (default {DEFAULT_TOKENIZER})")
    p.add_argument("--vocab-size", type=int, default=None, metavar="N",
                   help="the same as --tokenizer spN")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any training config key, e.g. --set model.width=64 (repeatable)")
    p.set_defaults(func=run_demo)
