"""Zero-shot evaluation speed: classifier build time for 1000 classes x 80 templates, and images/s.

A randomly initialised preset (weights do not change the speed) with a
SentencePiece tokenizer trained on the fly from ImageNet's class names and
the 80 OpenAI templates. Measured, each with `eval.*` code the CLI runs:

- classifier build: `build_zeroshot_classifier` over all 80,000 prompts
  (tokenize + encode + per-class mean); and, alternating in each repetition,
  ours and open_clip's `build_zero_shot_classifier` (10 classes = 800 prompts
  per forward) on the first `--open-clip-classes` classes, whose weights are
  also checked to be equal;
- model-only images/s: `evaluate_zeroshot` on preprocessed image tensors
  (image encoder + 1000-way logits + metrics), batches of `--batch-size`;
- end-to-end images/s: `evaluate_zeroshot` on an ImageNet-layout folder of
  JPEGs (500x375, decoded, resized, cropped by the model's preprocess), with
  `--workers` loader processes.

    python benchmarks/eval_speed.py                          # limoe-nano, CPU
    python benchmarks/eval_speed.py --model limoe-ti-16 --images 128
    python benchmarks/eval_speed.py --device cuda --model limoe-b-16 --images 2048 --batch-size 256

Every measurement runs `--reps` times; the table gives the median (and the
range: the machine's cores may be shared). Results: a table on stdout and JSON (command, machine, date) in --out.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, header, pick_device, write_json  # noqa: E402

import limoe  # noqa: E402
from eval.classifier import build_zeroshot_classifier  # noqa: E402
from eval.prompts import class_prompts, load_classnames, load_templates, template_text  # noqa: E402
from eval.zeroshot import evaluate_zeroshot  # noqa: E402


def train_tokenizer(classnames, templates, vocab_size: int, context_length: int) -> limoe.Tokenizer:
    texts = list(classnames) + [template_text(t).replace("{c}", "") for t in templates]
    return limoe.Tokenizer.train(texts, vocab_size=vocab_size, context_length=context_length)


def write_imagenet_folder(root: Path, num_images: int, num_classes: int = 10) -> None:
    """JPEGs of ImageNet's typical size in `val/<wnid>/`, smooth colour gradients (realistic to decode)."""
    from data_pipelines.imagenet import standard_wnids

    wnids = standard_wnids()[:num_classes]
    ramp = torch.linspace(0, 255, 500)
    for i in range(num_images):
        g = torch.Generator().manual_seed(i)
        colour = torch.rand(3, generator=g) * 255
        pixels = (0.5 * colour[None, None, :] + 0.5 * ramp[None, :, None]).expand(375, 500, 3)
        folder = root / "val" / wnids[i % num_classes]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / f"ILSVRC2012_val_{i:08d}.JPEG", quality=90)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="limoe-nano", help="preset (randomly initialised)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--templates", default="openai", help="openai (80) or simple (7)")
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--context-length", type=int, default=16)
    parser.add_argument("--text-batch-size", type=int, default=1024, help="prompts per text forward")
    parser.add_argument("--open-clip-classes", type=int, default=50,
                        help="classes for the open_clip builder comparison (0 to skip)")
    parser.add_argument("--images", type=int, default=512, help="images for each images/s measurement")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="loader processes for the end-to-end run")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each measurement (median reported)")
    parser.add_argument("--out", default="benchmarks/results/eval_speed.json", help="result JSON")
    args = parser.parse_args()

    device = pick_device(args.device)
    load_at_start = round(os.getloadavg()[0], 2)
    classnames = load_classnames("imagenet")
    templates = load_templates(args.templates)
    prompts = class_prompts(classnames, templates)
    num_prompts = sum(len(p) for p in prompts)

    t0 = time.perf_counter()
    tokenizer = train_tokenizer(classnames, templates, args.vocab_size, args.context_length)
    tokenizer_seconds = time.perf_counter() - t0
    torch.manual_seed(0)
    model, preprocess, tokenizer = limoe.create_model_and_transforms(args.model, tokenizer=tokenizer)
    model = model.to(device).eval()
    print(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, tokenizer "
          f"vocab {tokenizer.vocab_size} (trained in {tokenizer_seconds:.1f}s), {len(classnames)} classes x "
          f"{len(templates)} templates = {num_prompts} prompts, device {device}", file=sys.stderr)

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def row(measurement: str, seconds: list[float], count: int, unit: str) -> dict:
        # Median over repetitions: other processes share this machine's cores.
        med = statistics.median(seconds)
        return {"measurement": measurement, "seconds": med, "min_seconds": min(seconds),
                "max_seconds": max(seconds), "reps": len(seconds), "rate": count / med, "unit": unit}

    rows = []
    classifier = None

    def build_all():
        nonlocal classifier
        classifier = build_zeroshot_classifier(model, tokenizer, prompts, batch_size=args.text_batch_size,
                                               device=device)

    seconds = [timed(build_all) for _ in range(args.reps)]
    rows.append(row(f"classifier build, {len(classnames)} x {len(templates)} prompts (eval)", seconds,
                    num_prompts, "prompts/s"))

    if args.open_clip_classes:
        from open_clip.zero_shot_classifier import build_zero_shot_classifier

        # Same classes, alternating the two builders in each repetition.
        subset = classnames[:args.open_clip_classes]
        n = len(subset) * len(templates)
        ours_s, theirs_s = [], []
        for _ in range(args.reps):
            ours_s.append(timed(lambda: build_zeroshot_classifier(
                model, tokenizer, prompts[:len(subset)], batch_size=args.text_batch_size, device=device)))
            theirs_s.append(timed(lambda: build_zero_shot_classifier(
                model, tokenizer, subset, templates, num_classes_per_batch=10, device=device)))
        reference = build_zero_shot_classifier(model, tokenizer, subset, templates, num_classes_per_batch=10,
                                               device=device)
        torch.testing.assert_close(reference, classifier[:, :len(subset)], rtol=1e-4, atol=1e-5)
        rows.append(row(f"eval build_zeroshot_classifier, {len(subset)} x {len(templates)}", ours_s, n,
                        "prompts/s"))
        rows.append(row(f"open_clip build_zero_shot_classifier, {len(subset)} x {len(templates)} "
                        "(10 classes per forward)", theirs_s, n, "prompts/s"))

    # Model-only: preprocessed tensors, the 1000-way classifier, metrics.
    g = torch.Generator().manual_seed(0)
    size = model.config.image_size
    images = torch.randn(args.images, 3, size, size, generator=g)
    labels = torch.randint(0, len(classnames), (args.images,), generator=g)
    batches = [(images[i:i + args.batch_size], labels[i:i + args.batch_size])
               for i in range(0, args.images, args.batch_size)]
    evaluate_zeroshot(model, preprocess, tokenizer, batches[:1], classnames=classnames, classifier=classifier,
                      device=device)  # warm-up
    seconds = [evaluate_zeroshot(model, preprocess, tokenizer, batches, classnames=classnames,
                                 classifier=classifier, device=device)["eval_seconds"] for _ in range(args.reps)]
    rows.append(row(f"images, model only (batch {args.batch_size})", seconds, args.images, "images/s"))

    with tempfile.TemporaryDirectory() as tmp:
        write_imagenet_folder(Path(tmp), args.images)
        seconds = []
        for _ in range(args.reps):
            result = evaluate_zeroshot(model, preprocess, tokenizer, tmp, classnames=classnames,
                                       classifier=classifier, batch_size=args.batch_size,
                                       num_workers=args.workers, device=device)
            assert result["images"] == args.images, result["skipped"]
            seconds.append(result["eval_seconds"])
    rows.append(row(f"images, JPEG folder end to end (batch {args.batch_size}, {args.workers} workers)", seconds,
                    args.images, "images/s"))

    print(format_table(rows, [("measurement", "measurement"), ("seconds", "median s"), ("min_seconds", "min s"),
                              ("max_seconds", "max s"), ("rate", "rate (median)"), ("unit", "unit")]))
    doc = header("zero-shot evaluation speed")
    doc.update({"model": args.model, "device": str(device), "classes": len(classnames),
                "templates": len(templates), "prompts": num_prompts, "tokenizer_vocab": tokenizer.vocab_size,
                "context_length": tokenizer.context_length, "images": args.images, "batch_size": args.batch_size,
                "text_batch_size": args.text_batch_size, "workers": args.workers, "reps": args.reps,
                "load_average_1m_at_start": load_at_start, "load_average_1m_at_end": round(os.getloadavg()[0], 2),
                "results": rows})
    print(f"wrote {write_json(args.out, doc)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
