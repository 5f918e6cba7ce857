"""`limoe eval zeroshot|retrieval|suite|routing`: evaluate an export folder from the command line."""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

from limoe.cli_errors import user_errors

EXAMPLES = """\
examples:
  limoe eval zeroshot --model runs/demo/export --data data/emoji-twitter/zeroshot/name
  limoe eval zeroshot --model EXPORT --data /datasets/imagenet --classnames imagenet --templates openai \\
      --batch-size 256 --workers 8 --output results/imagenet.json --per-class-csv results/imagenet.csv
  limoe eval retrieval --model EXPORT --data 'data/coco/val-{000000..000004}.tar'
  limoe eval routing --model EXPORT --data data/emoji-google/shards --out results/routing
  limoe eval zeroshot --model EXPORT --data datasets/wds_cifar10       # CLIP_benchmark's layout, its own templates
  limoe eval suite --model EXPORT --data datasets/wds_* --output results/suite.md --output results/suite.json
"""


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_model(args):
    import limoe

    args.device = args.device or _default_device()
    model, preprocess, tokenizer = limoe.load(args.model, device=args.device)
    return model, preprocess, tokenizer


def _run_info(args) -> dict:
    return {"command": " ".join(["limoe"] + sys.argv[1:]) if sys.argv else None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": args.device, "host": platform.node(), "python": platform.python_version()}


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _pct(x) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.2f}%"


# ---- zeroshot -------------------------------------------------------------------


def zeroshot_document(args, model, preprocess, tokenizer) -> tuple[dict, list, list[tuple[str, str]]]:
    """Evaluate `args.data` zero-shot: (result document, per-class rows, summary table rows)."""
    from .evaluators import ZeroShot

    evaluator = ZeroShot(data=args.data, classnames=args.classnames, templates=args.templates,
                         class_prompts=args.class_prompts, max_images=args.max_images, split=args.split,
                         batch_size=args.batch_size, workers=args.workers, text_batch_size=args.text_batch_size)
    result = evaluator.evaluate(model, tokenizer, preprocess=preprocess, progress=True,
                                cache_for=None if args.no_cache else args.model, cache_dir=args.cache_dir)
    per_class = result.pop("per_class")
    templates_desc, num_prompts, prompt_check, cache = (result.pop(k) for k in ("templates", "prompts",
                                                                                 "prompt_check", "classifier"))
    doc = {
        "task": "zeroshot_classification",
        "model": {"export": str(args.model), "name": model.config.name},
        "data": result.pop("data"),
        "classnames": str(args.classnames) if args.classnames else "from the data",
        "templates": templates_desc,
        "metrics": evaluator.metrics(result),
        "counts": {"images": result["images"], "classes": result["classes"],
                   "classes_with_images": result["classes_with_images"], "prompts": num_prompts,
                   "truncated_prompts": prompt_check["truncated_prompts"],
                   "classes_with_identical_prompt_tokens": prompt_check["classes_with_identical_tokens"],
                   "skipped": result["skipped"]},
        "timing": {"classifier_seconds": cache["seconds"], "classifier_cache": cache["cache"],
                   "classifier_cache_path": cache.get("path"), "eval_seconds": result["eval_seconds"],
                   "images_per_second": result["images_per_second"]},
        "run": _run_info(args),
    }
    rows = [("model", f"{args.model} ({model.config.name})"), ("data", f"{args.data} ({doc['data']['layout']})"),
            ("images", f"{result['images']} ({sum(result['skipped'].values())} skipped)"),
            ("classes", f"{result['classes']} ({result['classes_with_images']} with images)"),
            ("prompts", f"{num_prompts} ({templates_desc.get('name', 'per-class prompts')})"),
            ("top-1", _pct(result["top1"]))]
    if "top5" in result:
        rows.append(("top-5", _pct(result["top5"])))
    rows += [("mean per-class recall", _pct(result["mean_per_class_recall"])),
             ("classifier", f"{cache['seconds']:.2f}s (cache {cache['cache']})"),
             ("images/s", f"{result['images_per_second'] or 0:.1f}")]
    return doc, per_class, rows


@user_errors
def run_zeroshot(args) -> int:
    from limoe.files import write_json

    from .metrics import write_per_class_csv

    model, preprocess, tokenizer = _load_model(args)
    doc, per_class, rows = zeroshot_document(args, model, preprocess, tokenizer)
    print("zero-shot classification\n" + _table(rows))
    if args.output:
        write_json(doc, args.output)
        print(f"wrote {args.output}")
    if args.per_class_csv:
        write_per_class_csv(per_class, args.per_class_csv)
        print(f"wrote {args.per_class_csv}")
    return 0


# ---- retrieval ------------------------------------------------------------------


def retrieval_document(args, model, tokenizer) -> tuple[dict, list[tuple[str, str]]]:
    """Evaluate retrieval on `args.data`: (result document, summary table rows)."""
    from .evaluators import Retrieval

    result = Retrieval(data=args.data, max_images=args.max_images, split=args.split, batch_size=args.batch_size,
                       workers=args.workers).evaluate(model, tokenizer, progress=True)
    data_desc = result["data"]
    doc = {"task": "retrieval", "model": {"export": str(args.model), "name": model.config.name}, **result,
           "run": _run_info(args)}
    rows = [("model", f"{args.model} ({model.config.name})"), ("data", f"{args.data} ({data_desc['layout']})"),
            ("images", str(result["counts"]["images"])), ("captions", str(result["counts"]["captions"]))]
    rows += [(name, _pct(value)) for name, value in result["metrics"].items()]
    rows.append(("images/s", f"{result['timing']['images_per_second'] or 0:.1f}"))
    return doc, rows


@user_errors
def run_retrieval(args) -> int:
    from limoe.files import write_json

    model, _, tokenizer = _load_model(args)
    doc, rows = retrieval_document(args, model, tokenizer)
    print("retrieval\n" + _table(rows))
    if args.output:
        write_json(doc, args.output)
        print(f"wrote {args.output}")
    return 0


# ---- suite ----------------------------------------------------------------------


@user_errors
def run_suite(args) -> int:
    from .suite import evaluate_suite, write_suite_outputs

    for output in args.output:
        check_suite_output(output)
    model, preprocess, tokenizer = _load_model(args)
    documents = {
        "zeroshot_classification": lambda a: zeroshot_document(a, model, preprocess, tokenizer)[0],
        "retrieval": lambda a: retrieval_document(a, model, tokenizer)[0],
    }
    table = evaluate_suite(args, documents)
    print(table["markdown"])
    for output in args.output:
        write_suite_outputs(table, output)
        print(f"wrote {output}")
    failed = [row for row in table["rows"] if row.get("error")]
    if failed:
        print(f"error: {len(failed)} of {len(table['rows'])} datasets failed (see the error column)", file=sys.stderr)
        return 1
    return 0


def check_suite_output(path: str) -> None:
    from .suite import TABLE_FORMATS

    if Path(path).suffix.lower() not in TABLE_FORMATS:
        raise ValueError(f"--output {path}: give a .csv, .json or .md file")


# ---- routing --------------------------------------------------------------------


@user_errors
def run_routing(args) -> int:
    from limoe.config import MODALITIES
    from limoe.files import write_json

    from .evaluators import Routing
    from .routing import plot_routing

    model, _, tokenizer = _load_model(args)
    result = Routing(data=args.data, batch_size=args.batch_size, max_pairs=args.num_pairs,
                     capacity_factor=args.capacity_factor, workers=args.workers).evaluate(model, tokenizer,
                                                                                         progress=True)
    result["batch_size"] = args.batch_size
    result["data"] = str(args.data)
    result["export"] = str(args.model)
    result["run"] = _run_info(args)
    out = Path(args.out)
    write_json(result, out / "routing.json")
    plot_routing(result, out / "routing.png")
    rows = []
    for layer in result["layers"]:
        for m in MODALITIES:
            s = layer[m]
            rows.append((f"block {layer['block']} {m}",
                         f"drop {_pct(s['drop_rate']):>7}  entropy {s['mean_entropy']:.3f}  "
                         f"busiest {_pct(s['busiest_expert_share']):>7}  used {s['experts_used']}/"
                         f"{result['num_experts']}"))
        roles = layer["expert_roles"]
        rows.append((f"block {layer['block']} experts",
                     ", ".join(f"{r} {roles.count(r)}" for r in (*MODALITIES, "shared", "unused"))))
    print(f"routing of {result['pairs']} pairs at capacity factor {result['capacity_factor']:g} "
          f"(max entropy {result['max_entropy']:.3f})\n" + _table(rows))
    print(f"wrote {out / 'routing.json'} and {out / 'routing.png'}")
    return 0


# ---- registration -----------------------------------------------------------------


def _common(p, data_help: str, many: bool = False) -> None:
    p.add_argument("--model", required=True, metavar="EXPORT",
                   help="export folder (model.safetensors + config.json + tokenizer.model)")
    p.add_argument("--data", required=True, help=data_help, **({"nargs": "+", "metavar": "DIR"} if many else {}))
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--workers", type=int, default=0, help="data loading worker processes (default 0)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def _classifier_flags(p) -> None:
    p.add_argument("--text-batch-size", type=int, default=1024, help="prompts per text forward pass")
    p.add_argument("--cache-dir", default=None,
                   help="classifier cache folder (default $LIMOE_CACHE_DIR/zeroshot or ~/.cache/limoe/zeroshot)")
    p.add_argument("--no-cache", action="store_true", help="build the classifier without reading or writing the cache")


def _split_flag(p) -> None:
    p.add_argument("--split", default="test", help="split folder of CLIP_benchmark dataset folders (default test)")


def register(subparsers) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser("eval", help="zero-shot classification, retrieval and routing analysis of an export",
                              description="Evaluate a limoe export folder.", epilog=EXAMPLES, formatter_class=fmt)
    sub = p.add_subparsers(dest="eval_command", metavar="TASK")

    def print_tasks(args) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=print_tasks)

    z = sub.add_parser(
        "zeroshot", help="zero-shot classification accuracy (top-1, top-5, mean per-class recall)",
        formatter_class=fmt,
        description="Zero-shot classification as open_clip / CLIP_benchmark compute it: each class's prompts "
                    "(templates filled with its name) are encoded, normalised, averaged and renormalised; "
                    "logits = 100 * image features @ classifier. The classifier is cached on disk, keyed by "
                    "the export and the prompts.",
        epilog="data layouts: CLIP_benchmark's WebDataset folders (DIR/test/*.tar, classnames.txt, "
               "zeroshot_classification_templates.txt), ImageNet (DIR/val/<wnid>/* or DIR/<wnid>/*), folder "
               "per class with classnames.txt (numbered 00000/ folders or named folders), or WebDataset shards "
               "with a `cls` field (classnames.txt beside them or --classnames).")
    _common(z, "labelled images: a CLIP_benchmark dataset folder, an ImageNet-layout folder, a folder per class, "
               "or WebDataset shards (folder, .tar, brace pattern)")
    _split_flag(z)
    z.add_argument("--classnames", default=None, metavar="imagenet|FILE",
                   help="class names: 'imagenet' (open_clip's 1000) or a file (JSON list or one per line); "
                        "default: classnames.txt in the data, or ImageNet's for the ImageNet layout")
    z.add_argument("--templates", default=None, metavar="openai|simple|FILE",
                   help="prompt templates: 'openai' (80), 'simple' (7) or a file with {} or {c} (default: the "
                        "data's zeroshot_classification_templates.txt if it has one, else openai)")
    z.add_argument("--class-prompts", default=None, metavar="JSON",
                   help="JSON mapping class name -> list of prompts, instead of templates")
    z.add_argument("--max-images", type=int, default=None, help="evaluate a seeded sample of at most N images")
    z.add_argument("--output", default=None, metavar="FILE", help="write the result as JSON")
    z.add_argument("--per-class-csv", default=None, metavar="FILE", help="write per-class accuracy as CSV")
    _classifier_flags(z)
    z.set_defaults(func=run_zeroshot)

    u = sub.add_parser(
        "suite", help="one export on a list of dataset folders (CLIP_benchmark's layout), into one table",
        formatter_class=fmt,
        description="Evaluate an export on several dataset folders, each as `limoe eval zeroshot` or "
                    "`limoe eval retrieval` would (a CLIP_benchmark folder with dataset_type.txt = retrieval "
                    "is a retrieval set, any other labelled layout is classification), with each set's own "
                    "classnames.txt and zeroshot_classification_templates.txt, into one table: a row per "
                    "dataset with its metrics. A dataset that fails gets its error in the table (exit status 1) "
                    "and the others still run.",
        epilog="example: limoe eval suite --model EXPORT --data ~/datasets/wds_cifar10 ~/datasets/wds_imagenet1k "
               "~/datasets/wds_mscoco_captions --output suite.md --output suite.csv --output suite.json")
    _common(u, "dataset folders, one per dataset", many=True)
    _split_flag(u)
    u.add_argument("--output", action="append", default=[], metavar="FILE",
                   help="write the table: .csv (fractions), .json (rows + every dataset's full result) or .md "
                        "(percentages); repeat for several")
    u.add_argument("--templates", default=None, metavar="openai|simple|FILE",
                   help="templates for every classification set (default: each set's own, else openai)")
    u.add_argument("--max-images", type=int, default=None, help="at most N images per dataset")
    _classifier_flags(u)
    u.set_defaults(func=run_suite)

    r = sub.add_parser("retrieval", help="image-to-text and text-to-image recall@1/5/10 on caption shards",
                       description="Retrieval recall@k on WebDataset caption shards (captions.json lists several "
                                   "captions per image, or txt one). An image counts as retrieved at k if any "
                                   "of its captions is in the top k; ties count against the query.")
    _common(r, "caption shards (folder, .tar, brace pattern), or a CLIP_benchmark retrieval folder "
               "(dataset_type.txt says retrieval; every line of a sample's txt is a caption)")
    _split_flag(r)
    r.add_argument("--max-images", type=int, default=None, help="use at most the first N images")
    r.add_argument("--output", default=None, metavar="FILE", help="write the result as JSON")
    r.set_defaults(func=run_retrieval)

    g = sub.add_parser("routing", help="tokens per expert, drop rates and router entropy per MoE layer and modality",
                       description="Run the joint image+text forward on a sample of pairs with capacity-limited "
                                   "routing at the training capacity factor and report, per MoE layer and "
                                   "modality, tokens per expert, drop rate, mean router entropy, busiest-expert "
                                   "share and experts used; writes routing.json and routing.png (heat maps).")
    _common(g, "caption shards (folder, .tar, brace pattern); each pair is an image and its first caption")
    g.set_defaults(batch_size=128)
    g.add_argument("--out", required=True, metavar="DIR", help="output folder for routing.json and routing.png")
    g.add_argument("--num-pairs", type=int, default=1024, help="pairs to analyse (default 1024)")
    g.add_argument("--capacity-factor", type=float, default=None,
                   help="capacity factor (default: the model's training capacity factor); drop rates also "
                        "depend on --batch-size, the pairs per routing call (default 128)")
    g.set_defaults(func=run_routing)
