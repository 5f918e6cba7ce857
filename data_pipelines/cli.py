"""`limoe data ...` (dataset builders, shard check) and `limoe tokenizer train`."""
from __future__ import annotations

import argparse
import sys

from limoe.cli_errors import user_errors


def register(subparsers) -> None:
    data = subparsers.add_parser(
        "data",
        help="build and check WebDataset shards (emoji, image folders, CSV, ImageNet)",
        description="Build WebDataset tar shards (+ sizes.json, skipped.json) from raw data, or check shards.",
    )
    commands = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    data.set_defaults(func=lambda args: data.print_help() or 2)

    emoji = commands.add_parser(
        "emoji",
        help="the emoji demo set from the npm package emoji-datasource-<style>",
        description=(
            "Fetch emoji-datasource-<style> with `npm pack` (cached), write caption shards to OUT/shards "
            "and zero-shot folders (name / subcategory / category) to OUT/zeroshot. "
            "Offline: --tarball FILE or $LIMOE_NPM_TARBALL_DIR."
        ),
    )
    emoji.add_argument("--style", choices=("google", "twitter"), required=True, help="image style (Noto / Twemoji)")
    emoji.add_argument("--out", required=True, help="output folder (gets shards/ and zeroshot/)")
    emoji.add_argument("--cache", default=None, help="where npm tarballs are kept (default ~/.cache/limoe/npm)")
    emoji.add_argument("--tarball", default=None, help="use this emoji-datasource-<style>-*.tgz instead of npm")
    emoji.add_argument("--version", default=None, help="npm package version (default: the pinned one; 'latest')")
    emoji.add_argument("--maxcount", type=int, default=250, help="samples per shard (default 250)")
    emoji.set_defaults(func=_run_emoji)

    folder = commands.add_parser(
        "folder",
        help="shards from a folder of images with caption files, or a folder per class",
        description=(
            "Caption mode: x.jpg + x.txt (one caption per line). Class mode (--classes): IMAGES/<class>/..., "
            "labels by sorted folder name, classnames.txt written next to the shards."
        ),
    )
    folder.add_argument("--images", required=True, help="input folder")
    folder.add_argument("--out", required=True, help="output folder (gets shards/)")
    folder.add_argument("--classes", action="store_true", help="folder-per-class layout: write cls labels")
    folder.add_argument("--prefix", default=None, help="shard name prefix (default: the input folder's name)")
    folder.add_argument("--maxcount", type=int, default=10_000, help="samples per shard")
    folder.set_defaults(func=_run_folder)

    table = commands.add_parser(
        "csv",
        help="shards from a CSV/TSV (or parquet, with pyarrow) of image paths and captions",
        description="Rows of local image paths (relative to the table or --image-root) and captions.",
    )
    table.add_argument("--csv", required=True, help="table file: .csv, .tsv or .parquet")
    table.add_argument("--image-col", required=True, help="column with image paths")
    table.add_argument("--caption-col", required=True, help="column with captions")
    table.add_argument("--label-col", default=None, help="optional column with labels (ints go to cls)")
    table.add_argument("--caption-sep", default=None, help="split a caption cell into several captions on this")
    table.add_argument("--image-root", default=None, help="base folder for relative image paths")
    table.add_argument("--out", required=True, help="output folder (gets shards/)")
    table.add_argument("--prefix", default=None, help="shard name prefix (default: the table's name)")
    table.add_argument("--maxcount", type=int, default=10_000, help="samples per shard")
    table.set_defaults(func=_run_table)

    imagenet = commands.add_parser(
        "imagenet",
        help="check an ImageNet val folder, write its classnames.txt and labelled shards",
        description=(
            "Recognise val/n01440764/*.JPEG (wnid folders); class index = sorted wnid order, names from "
            "open_clip's IMAGENET_CLASSNAMES. Writes OUT/shards with cls labels and classnames.txt."
        ),
    )
    imagenet.add_argument("--val", required=True, help="ImageNet root or its val/ folder")
    imagenet.add_argument("--out", required=True, help="output folder (gets shards/)")
    imagenet.add_argument("--classnames", default=None, help="names file for non-standard wnid sets")
    imagenet.set_defaults(func=_run_imagenet)

    check = commands.add_parser(
        "check",
        help="read shards end to end and report samples and skipped ones per reason",
        description="Reads every sample (decoding images) the way the training loader does and prints counts, "
                    "compared with sizes.json where there is one; exit code 1 if anything was skipped or missing.",
    )
    check.add_argument("shards", help="shard spec: folder, brace pattern, glob, or 'a::b'")
    check.add_argument("--captions-optional", action="store_true",
                       help="shards for classification only: samples without usable captions are not counted "
                            "as skipped (as the classification evaluation reads them)")
    check.set_defaults(func=_run_check)

    tokenizer = subparsers.add_parser(
        "tokenizer",
        help="train a SentencePiece tokenizer",
        description="Tokenizer tools.",
    )
    tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", metavar="TOKENIZER_COMMAND")
    tokenizer.set_defaults(func=lambda args: tokenizer.print_help() or 2)
    train = tokenizer_commands.add_parser(
        "train",
        help="train a SentencePiece model on all captions in shards",
        description="Writes FILE (a SentencePiece .model) and FILE.json (its context length).",
    )
    train.add_argument("--data", required=True, help="shard spec: folder, brace pattern, glob, or 'a::b'")
    train.add_argument("--vocab-size", type=int, default=8000, help="vocabulary size (smaller if data is tiny)")
    train.add_argument("--out", required=True, help="output .model file")
    train.add_argument("--context-length", type=int, default=16, help="text length in tokens, eos included")
    train.add_argument("--model-type", default="unigram", choices=("unigram", "bpe", "word", "char"))
    train.set_defaults(func=_run_tokenizer_train)


@user_errors
def _run_emoji(args):
    from .emoji import DEFAULT_VERSION, build_emoji_dataset

    summary = build_emoji_dataset(
        args.style, args.out, tarball=args.tarball, cache_dir=args.cache,
        version=args.version or DEFAULT_VERSION, maxcount=args.maxcount,
    )
    print(summary)


@user_errors
def _run_folder(args):
    from .folder import build_folder_dataset

    print(build_folder_dataset(args.images, args.out, classes=args.classes, prefix=args.prefix,
                               maxcount=args.maxcount))


@user_errors
def _run_table(args):
    from .table import build_table_dataset

    print(build_table_dataset(args.csv, args.image_col, args.caption_col, args.out, label_col=args.label_col,
                              caption_sep=args.caption_sep, image_root=args.image_root, prefix=args.prefix,
                              maxcount=args.maxcount))


@user_errors
def _run_imagenet(args):
    from .imagenet import build_imagenet_shards

    print(build_imagenet_shards(args.val, args.out, classnames_file=args.classnames))


@user_errors
def _run_check(args):
    from .samples import parse_sample
    from .shards import count_samples, read_shard, resolve_shards
    from .skips import SkipCounter

    skips = SkipCounter()
    shards = resolve_shards(args.shards)
    good = 0
    for url in shards:
        for raw in read_shard(url, skips):
            good += parse_sample(raw, skips, need_captions=not args.captions_optional) is not None
    listed = count_samples(shards)
    of_listed = "" if listed is None else f" of {listed} listed in sizes.json"
    print(f"{len(shards)} shard(s), {good} readable samples{of_listed}; {skips.summary()}")
    return 1 if skips.total else 0


@user_errors
def _run_tokenizer_train(args):
    from .loader import train_tokenizer
    from .skips import SkipCounter

    skips = SkipCounter()
    tokenizer = train_tokenizer(args.data, args.vocab_size, args.context_length, skips, model_type=args.model_type)
    path = tokenizer.save(args.out)
    print(f"wrote {path} (vocab {tokenizer.vocab_size}, context length {tokenizer.context_length}); "
          f"{skips.summary()}")


def main(argv: list[str] | None = None) -> int:
    """Run these commands without the rest of the `limoe` CLI (python -m data_pipelines.cli ...)."""
    parser = argparse.ArgumentParser(prog="limoe")
    register(parser.add_subparsers(dest="command", metavar="COMMAND"))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
