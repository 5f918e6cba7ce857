"""Caption shards of a third emoji drawing style, OpenMoji, with the demo's classes and captions.

The demo trains on the 1,911 Noto images and evaluates zero-shot on Twemoji. To ask whether more
distinct training images (not more crops of the same ones) would change a result, this script
draws every one of those 1,911 emoji a second time, in OpenMoji's style, and writes them as
shards that a training run can read beside the Noto ones (`data.train` takes several sources).

- Classes and captions come from the same `emoji-datasource` package as the demo's data (the
  google one: its entries, names, short names, categories), so a sample here has exactly the
  captions and class indices of the Noto sample of the same emoji. Nothing from Twemoji is read.
- Images come from the npm package `openmoji` (OpenMoji, https://openmoji.org, by HfG Schwaebisch
  Gmuend; images under CC BY-SA 4.0), which ships SVGs only: each is rendered to a 64 x 64 PNG
  with alpha, as the emoji-datasource PNGs are, with CairoSVG (`pip install cairosvg`; it needs
  the cairo library, `apt-get install libcairo2`). CairoSVG is not one of limoe's dependencies.
- An emoji is matched on its code points (`unified`, else `non_qualified`, else either without
  U+FE0F); an entry without an OpenMoji drawing, or whose SVG does not render, is skipped and
  counted in `shards/skipped.json`, as the demo's builder does.

    python benchmarks/openmoji_shards.py --out data/emoji-openmoji
    python benchmarks/quality.py --set "data.train=[{shards: $PWD/data/emoji-google/shards, weight: 1.0}, \\
        {shards: $PWD/data/emoji-openmoji/shards, weight: 1.0}]" ...

Writes OUT/shards/emoji-openmoji-%06d.tar (+ sizes.json, classnames.txt, build.json); nothing
for zero-shot (OpenMoji is a training style here).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from data_pipelines.emoji import (  # noqa: E402
    BUILD_FILE, DEFAULT_VERSION, GRANULARITIES, EmojiSourceError, _class_of, class_lists, default_cache_dir,
    emoji_captions, emoji_name, find_emoji_tarball, npm_pack, read_emoji_package,
)
from data_pipelines.writer import Record, ShardSetWriter  # noqa: E402
from tqdm import tqdm  # noqa: E402

OPENMOJI_VERSION = "17.0.0"  # pinned, as the emoji-datasource version is
SVG_DIR = "package/color/svg/"
SIZE = 64
STYLE = "openmoji"


def find_openmoji_tarball(tarball: str | None, cache_dir: str | None, version: str = OPENMOJI_VERSION) -> Path:
    """--openmoji-tarball, else the cached `openmoji-<version>.tgz`, else `npm pack openmoji@<version>`."""
    if tarball:
        path = Path(tarball)
        if not path.is_file():
            raise EmojiSourceError(f"--openmoji-tarball {path} does not exist")
        return path
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cached = cache / f"openmoji-{version}.tgz"
    return cached if cached.is_file() else npm_pack(f"openmoji@{version}", cache)


def read_openmoji_svgs(tarball: str | os.PathLike) -> dict[str, bytes]:
    """{code points, upper case, e.g. '1F600' or '2764-FE0F': SVG bytes} of the colour drawings."""
    svgs = {}
    try:
        with tarfile.open(tarball, "r|*") as tar:
            for member in tar:
                name = member.name
                if member.isfile() and name.startswith(SVG_DIR) and name.endswith(".svg") \
                        and "/" not in name[len(SVG_DIR):]:
                    svgs[name[len(SVG_DIR):-len(".svg")].upper()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        raise EmojiSourceError(f"cannot read {tarball}: {error}") from None
    if not svgs:
        raise EmojiSourceError(f"{tarball} has no {SVG_DIR}*.svg: is it the openmoji package?")
    return svgs


def code_point_keys(entry: dict) -> list[str]:
    """The keys an entry may have in OpenMoji, most exact first."""
    keys = [k.upper() for k in (entry.get("unified"), entry.get("non_qualified")) if k]
    keys += [k.replace("-FE0F", "") for k in keys]
    return list(dict.fromkeys(keys))


def cairo_renderer(size: int = SIZE) -> Callable[[bytes], bytes]:
    try:
        import cairosvg
    except (ImportError, OSError) as error:  # OSError: the package is there, libcairo is not
        raise SystemExit(f"error: rendering OpenMoji's SVGs needs CairoSVG ({error}); "
                         "pip install cairosvg (and apt-get install libcairo2)") from None

    def render(svg: bytes) -> bytes:
        return cairosvg.svg2png(bytestring=svg, output_width=size, output_height=size)

    return render


def build_openmoji_shards(entries: list[dict], svgs: dict[str, bytes], out_dir: str | os.PathLike,
                          render: Callable[[bytes], bytes], stamp: dict, maxcount: int = 250):
    """One sample per emoji-datasource entry with an OpenMoji drawing, captions and class indices as
    the demo's builder gives that entry; returns the writer's summary."""
    entries = sorted(entries, key=lambda e: (e.get("sort_order", 0), e.get("unified", "")))
    classes = class_lists(entries)  # the same class lists, so the same indices, as the demo's data
    index = {g: {name: i for i, name in enumerate(names)} for g, names in classes.items()}
    with ShardSetWriter(Path(out_dir) / "shards", f"emoji-{STYLE}", maxcount=maxcount) as writer:
        for entry in tqdm(entries, desc="openmoji", unit="emoji"):
            source_id = entry.get("unified") or emoji_name(entry)
            svg = next((svgs[k] for k in code_point_keys(entry) if k in svgs), None)
            if svg is None:
                writer.skip(source_id, "no_openmoji_drawing", " / ".join(code_point_keys(entry)))
                continue
            try:
                png = render(svg)
            except Exception as error:  # a malformed SVG: counted, the build goes on
                writer.skip(source_id, "unrenderable_svg", f"{type(error).__name__}: {error}")
                continue
            labels = {g: index[g][_class_of(entry, g)] for g in GRANULARITIES}
            metadata = {"unified": entry.get("unified"), "name": emoji_name(entry), "style": STYLE,
                        "category": entry["category"], "subcategory": entry["subcategory"],
                        **{f"{g}_index": i for g, i in labels.items()}}
            writer.write(Record(source_id.lower(), png, emoji_captions(entry), labels["name"], metadata))
        writer.add_file("classnames.txt", "\n".join(classes["name"]) + "\n")
        writer.add_file(BUILD_FILE, json.dumps(stamp) + "\n")
    return writer.summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/emoji-openmoji", metavar="DIR",
                   help="shards go to DIR/shards (default data/emoji-openmoji)")
    p.add_argument("--cache", default=None, metavar="DIR", help="npm tarball cache (default ~/.cache/limoe/npm)")
    p.add_argument("--tarball", default=None, metavar="TGZ",
                   help="the emoji-datasource-google package (classes and captions; default: cache, else npm)")
    p.add_argument("--openmoji-tarball", default=None, metavar="TGZ",
                   help=f"the openmoji package (default: cache, else npm pack openmoji@{OPENMOJI_VERSION})")
    args = p.parse_args(argv)
    try:
        source = find_emoji_tarball("google", tarball=args.tarball, cache_dir=args.cache, version=DEFAULT_VERSION)
        entries, _ = read_emoji_package(source, "google")
        openmoji = find_openmoji_tarball(args.openmoji_tarball, args.cache)
        svgs = read_openmoji_svgs(openmoji)
    except EmojiSourceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    render = cairo_renderer()
    stamp = {"builder": "openmoji_shards", "style": STYLE, "package": openmoji.name, "captions": source.name}
    summary = build_openmoji_shards(entries, svgs, args.out, render, stamp)
    skipped = ", ".join(f"{r}: {n}" for r, n in summary.skipped.most_common()) or "none"
    print(f"{summary.total} OpenMoji samples in {len(summary.shards)} shard(s) under {Path(args.out) / 'shards'} "
          f"(classes and captions from {source.name}; skipped: {skipped})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
