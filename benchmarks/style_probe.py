"""Is a zero-shot difference between trained models on the image side or the text side?

Zero-shot classification needs both towers: image embeddings, and text embeddings of the
class prompts. This probe leaves the text out. For each trained run (a folder with `export/`,
as `benchmarks/quality.py` and `limoe demo` write them) and each granularity (name,
subcategory, category):

1. embed every image of the training style (Noto, `--train-style`) and average the embeddings
   of each class into a centroid (no training, no prompts);
2. classify every image of the unseen style (Twemoji, `--data`) by its nearest centroid
   (cosine), and report top-1.

If model A beats model B here but not in zero-shot, A's images carry the classes across
drawing styles at least as well as B's, and A's shortfall in zero-shot is in how its text
embeddings of the prompts line up with them.

    python benchmarks/style_probe.py --data data/emoji-twitter --train-style data/emoji-google \\
        runs/quality/runs/limoe-e8e-bpe-seed{0,1,2} runs/quality/runs/open_clip-seed{0,1,2}

Prints a markdown table (mean over each variant's seeds, a run folder named
`<variant>-seed<s>`) and writes JSON (--out). Evaluation only. The three granularity folders
hold the same image files (`limoe data emoji` links them), so each distinct image (by its
bytes) is embedded once per run and shared by the three levels.
"""
from __future__ import annotations

import hashlib
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "benchmarks"):  # launch.demo; benchmarks/name_errors.py
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from launch.demo import GRANULARITIES  # noqa: E402 (light imports)
from name_errors import check_runs, report_runs, run_parser, runs_by_variant  # noqa: E402


def embed_folder(model, preprocess, folder: Path, batch_size: int = 256):
    """(L2-normalised image embeddings [N, D], labels [N], class names) of a labelled folder."""
    from eval.datasets import open_labelled_images

    image_size = model.config.image_size if hasattr(model, "config") else None
    data = open_labelled_images(folder, preprocess, image_size)
    features, labels = embed_images(model, data, batch_size)
    if data.skipped:
        print(f"warning: {folder}: skipped {dict(data.skipped)}", file=sys.stderr)
    return features, labels, data.classnames


def embed_images(model, data, batch_size: int = 256):
    """(L2-normalised image embeddings [N, D], labels [N]) of a LabelledImages set's readable images."""
    import torch

    from eval.encode import evaluating, model_device

    features, labels = [], []
    with evaluating(model):
        for images, batch_labels in data.batches(batch_size):
            features.append(model.encode_image(images.to(model_device(model)), normalize=True).float().cpu())
            labels.append(batch_labels)
    if not features:
        raise SystemExit(f"error: no readable images in {data.description.get('path')}")
    return torch.cat(features), torch.cat(labels)


def embed_style(model, preprocess, root: Path, batch_size: int = 256) -> dict[str, tuple]:
    """{granularity: (image embeddings [N, D], labels [N], class names)} of one style's
    zeroshot/<granularity> folders, each distinct image file (by its bytes) embedded once.
    An unreadable image is left out of every granularity (and reported)."""
    import torch

    from eval.datasets import FolderImages, open_labelled_images

    image_size = model.config.image_size if hasattr(model, "config") else None
    sets = {g: open_labelled_images(root / "zeroshot" / g, preprocess, image_size) for g in GRANULARITIES}
    if not all(isinstance(d, FolderImages) for d in sets.values()):  # shards: no files to share
        return {g: embed_folder(model, preprocess, root / "zeroshot" / g, batch_size) for g in GRANULARITIES}
    digest, first_file = {}, {}  # file -> hash of its bytes; hash -> a file with those bytes
    for data in sets.values():
        for path, _ in data.samples:
            if path not in digest:
                digest[path] = hashlib.sha1(Path(path).read_bytes()).hexdigest()
                first_file.setdefault(digest[path], path)
    hashes = list(first_file)
    # Each distinct image labelled by its index: the indices that come back are the images that were read.
    distinct = FolderImages([(first_file[h], i) for i, h in enumerate(hashes)], preprocess, None,
                            {"layout": "distinct images", "path": str(root)})
    features, index = embed_images(model, distinct, batch_size)
    if distinct.skipped:
        print(f"warning: {root}: skipped {dict(distinct.skipped)} (left out of every granularity)", file=sys.stderr)
    row_of = {hashes[i]: row for row, i in enumerate(index.tolist())}
    out = {}
    for g, data in sets.items():
        kept = [(row_of[digest[path]], label) for path, label in data.samples if digest[path] in row_of]
        rows = torch.tensor([row for row, _ in kept], dtype=torch.long)
        out[g] = (features[rows], torch.tensor([label for _, label in kept], dtype=torch.long), data.classnames)
    return out


def nearest_centroid_top1(train_x, train_y, test_x, test_y, num_classes: int) -> float:
    """Top-1 of classifying test_x by the nearest (cosine) class centroid of train_x. A test image
    whose class has no training image counts as wrong."""
    import torch

    sums = torch.zeros(num_classes, train_x.shape[1]).index_add_(0, train_y, train_x)
    present = torch.bincount(train_y, minlength=num_classes) > 0
    centroids = torch.nn.functional.normalize(sums, dim=-1)
    scores = test_x @ centroids.T
    scores[:, ~present] = float("-inf")
    return (scores.argmax(1) == test_y).float().mean().item()


def probe(export: Path, train_style: Path, data: Path) -> dict[str, float]:
    import limoe

    model, preprocess, _ = limoe.load(export)
    train, test = embed_style(model, preprocess, train_style), embed_style(model, preprocess, data)
    out = {}
    for g in GRANULARITIES:
        (train_x, train_y, train_names), (test_x, test_y, test_names) = train[g], test[g]
        if train_names != test_names:
            raise SystemExit(f"error: the {g} classes of {train_style} and {data} differ")
        out[g] = nearest_centroid_top1(train_x, train_y, test_x, test_y, len(test_names))
    return out


def per_variant(per_run: dict[str, dict[str, float]]) -> dict[str, dict[str, dict]]:
    """{variant: {granularity: {"mean", "std", "n"}}} over the variant's seeds."""
    out = {}
    for v, runs in runs_by_variant(per_run).items():
        out[v] = {}
        for g in GRANULARITIES:
            values = [per_run[r][g] for r in runs]
            out[v][g] = {"mean": statistics.fmean(values), "n": len(values),
                         "std": statistics.stdev(values) if len(values) > 1 else None}
    return out


def table(summary: dict[str, dict[str, dict]]) -> str:
    lines = ["| variant | seeds | " + " | ".join(f"{g} top-1" for g in GRANULARITIES) + " |",
             "|---|---:|" + "---:|" * len(GRANULARITIES)]
    for v, by_g in summary.items():
        cells = []
        for g in GRANULARITIES:
            s = by_g[g]
            cells.append(f"{100 * s['mean']:.1f}" + (f" ± {100 * s['std']:.1f}" if s["std"] is not None else ""))
        lines.append(f"| {v} | {by_g[GRANULARITIES[0]]['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = run_parser(__doc__, "the unseen style's data set, classified", "style_probe.json")
    p.add_argument("--train-style", type=Path, default=Path("data/emoji-google"),
                   help="the training style's data set, whose images make the centroids (default data/emoji-google)")
    args = p.parse_args(argv)
    check_runs(p, args.runs)
    for d in (args.data, args.train_style):
        if not (d / "zeroshot" / "name").is_dir():
            p.error(f"{d}/zeroshot/name not found: pass the folder `limoe data emoji --style ...` built")

    return report_runs(args, lambda export: probe(export, args.train_style, args.data), per_variant, table,
                       f"Nearest class centroid of {args.train_style.name} image embeddings, top-1 (%) on "
                       f"{args.data.name}, mean ± std over each variant's seeds:", train_style=str(args.train_style))


if __name__ == "__main__":
    sys.exit(main())
