"""The emoji demo data set, built from the npm package `emoji-datasource-<style>`.

The package (fetched once with `npm pack`, cached) holds `package/emoji.json`
(one entry per emoji: name, unified code point, image file, short names,
category, subcategory, skin tone variants...) and 64 px PNGs with alpha in
`package/img/<style>/64/`. We use each entry's base image only (skin tone
variants are separate entries under `skin_variations`, left out).

Output, under `--out DIR`:

    shards/emoji-<style>-%06d.tar    one sample per emoji, several captions:
                                     "grinning face", each short name ("grinning"),
                                     "an emoji of grinning face", "a face-smiling emoji",
                                     "an emoji from smileys and emotion";
                                     cls = index of the name class, json = the entry's fields
    zeroshot/{name,subcategory,category}/<class:05d>/<key>.png + classnames.txt
                                     the same images on white, folder per class

Class lists are built from every entry of emoji.json, whether or not this
style has its image, and indexed in sorted class-name order; so the google
and twitter builds of one package version share their class lists (a model
trained on one style is evaluated on the other). A class whose images are all
missing for a style keeps its (empty) folder, so folder index = class index.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from limoe.files import replace_directory
from limoe.transforms import to_rgb

from .writer import Record, ShardSetWriter, WriteSummary

STYLES = ("google", "twitter")
DEFAULT_VERSION = "16.0.0"  # pinned so class lists and numbers stay comparable; "latest" to follow npm
GRANULARITIES = ("name", "subcategory", "category")
# Bumped whenever the samples this builder writes change (captions, labels, layout);
# stored in shards/build.json so that caches built by an older version are rebuilt.
BUILD_FORMAT = 2
BUILD_FILE = "build.json"
TARBALL_DIR_ENV = "LIMOE_NPM_TARBALL_DIR"


class EmojiSourceError(RuntimeError):
    """The emoji package could not be found or fetched; the message says what to do."""


# ---- fetching the npm package -------------------------------------------------


def default_cache_dir() -> Path:
    root = os.environ.get("LIMOE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "limoe"
    )
    return Path(root) / "npm"


def package_name(style: str) -> str:
    if style not in STYLES:
        raise ValueError(f"unknown emoji style {style!r}; choose from {', '.join(STYLES)}")
    return f"emoji-datasource-{style}"


def _newest_tarball(folder: Path, style: str) -> Path | None:
    def version_key(path: Path):
        version = path.name[len(package_name(style)) + 1 : -len(".tgz")]
        return [int(p) if p.isdigit() else -1 for p in re.split(r"[.-]", version)]

    found = sorted(folder.glob(f"{package_name(style)}-[0-9]*.tgz"), key=version_key)
    return found[-1] if found else None


def npm_pack(spec: str, dest_dir: Path) -> Path:
    """`npm pack <spec>` into dest_dir (via a temp folder, so a broken download never looks cached)."""
    npm = shutil.which("npm")
    if npm is None:
        raise EmojiSourceError(
            "npm is not installed (it fetches the emoji images). Install Node.js/npm, or pass "
            f"--tarball FILE / set {TARBALL_DIR_ENV} to a folder with emoji-datasource-<style>-*.tgz"
        )
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".npm-pack-") as tmp:
        try:
            result = subprocess.run(
                [npm, "pack", spec, "--json", "--pack-destination", tmp],
                capture_output=True, text=True, timeout=900, cwd=tmp,
            )
        except subprocess.TimeoutExpired:
            raise EmojiSourceError(f"npm pack {spec} timed out; offline? pass --tarball FILE") from None
        if result.returncode != 0:
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
            raise EmojiSourceError(
                f"npm pack {spec} failed (offline or registry unreachable?):\n{tail}\n"
                f"Pass --tarball FILE or set {TARBALL_DIR_ENV} to use a downloaded package."
            )
        packed = sorted(Path(tmp).glob("*.tgz"))
        if not packed:
            raise EmojiSourceError(f"npm pack {spec} produced no .tgz file:\n{result.stdout[-500:]}")
        target = dest_dir / packed[0].name
        os.replace(packed[0], target)
    return target


def find_emoji_tarball(
    style: str, tarball: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
    version: str = DEFAULT_VERSION, tarball_dir: str | os.PathLike | None = None,
) -> Path:
    """The package tarball to read: --tarball, else the newest in `tarball_dir` (`limoe demo
    --tarball-dir`) or $LIMOE_NPM_TARBALL_DIR, else the cache, else npm pack."""
    name = package_name(style)
    if tarball is not None:
        path = Path(tarball)
        if not path.is_file():
            raise EmojiSourceError(f"--tarball {path} does not exist")
        return path
    where = f"--tarball-dir {tarball_dir}" if tarball_dir else f"${TARBALL_DIR_ENV}={os.environ.get(TARBALL_DIR_ENV)}"
    if tarball_dir or os.environ.get(TARBALL_DIR_ENV):
        found = _newest_tarball(Path(tarball_dir or os.environ[TARBALL_DIR_ENV]), style)
        if found is None:
            raise EmojiSourceError(f"{where} has no {name}-*.tgz")
        return found
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cached = _newest_tarball(cache, style) if version == "latest" else cache / f"{name}-{version}.tgz"
    if cached is not None and cached.is_file():
        return cached
    return npm_pack(f"{name}@{version}", cache)


# ---- reading the package --------------------------------------------------------


def read_emoji_package(tarball: str | os.PathLike, style: str) -> tuple[list[dict], dict[str, bytes]]:
    """(emoji.json entries, {image file name: PNG bytes} of the 64 px images), in one pass over the .tgz."""
    image_dir = f"package/img/{style}/64/"
    entries, images = None, {}
    try:
        with tarfile.open(tarball, "r|*") as tar:  # streaming: a .tgz has no cheap random access
            for member in tar:
                if not member.isfile():
                    continue
                if member.name == "package/emoji.json":
                    entries = json.load(tar.extractfile(member))
                elif member.name.startswith(image_dir) and "/" not in member.name[len(image_dir):]:
                    images[member.name[len(image_dir):]] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        raise EmojiSourceError(f"cannot read {tarball}: {error}") from None
    if entries is None:
        raise EmojiSourceError(f"{tarball} has no package/emoji.json: is it an emoji-datasource package?")
    return entries, images


def _words(text: str) -> str:
    return " ".join(str(text).lower().replace("_", " ").split())


def emoji_name(entry: dict) -> str:
    """Lowercased name, or the first short name when the name is empty."""
    name = _words(entry.get("name") or "")
    if not name and entry.get("short_names"):
        name = _words(entry["short_names"][0])
    return name or _words(entry.get("unified", "unknown emoji"))


def category_words(category: str) -> str:
    """"Smileys & Emotion" -> "smileys and emotion"."""
    return " ".join(str(category).lower().replace("&", " and ").split())


def subcategory_words(subcategory: str) -> str:
    return " ".join(str(subcategory).lower().split())  # "face-smiling" stays as is


def emoji_captions(entry: dict) -> list[str]:
    """Name, short names, a templated sentence with the name, and one short
    sentence each for the subcategory and the category.

    The templates matter: zero-shot prompts only work if they look like
    training captions, and category-level zero-shot needs category words in
    some captions (a trial on bare-name captions scored ~1% with the prompt "an emoji of
    {name}." and no better than the majority class by category). The coarse sentences are separate
    and short on purpose: an earlier "<name>, a <subcategory> emoji from
    <category>" lost its category words to the demo's 16-token context in
    two captions out of three.
    """
    name = emoji_name(entry)
    captions = [name]
    captions += [_words(short) for short in entry.get("short_names") or []]
    captions.append(f"an emoji of {name}")
    captions.append(f"a {subcategory_words(entry['subcategory'])} emoji")
    captions.append(f"an emoji from {category_words(entry['category'])}")
    return list(dict.fromkeys(c for c in captions if c))  # dedupe, keep order


def class_lists(entries: list[dict]) -> dict[str, list[str]]:
    """Sorted class names per granularity, from all entries (style-independent)."""
    return {
        "name": sorted({emoji_name(e) for e in entries}),
        "subcategory": sorted({subcategory_words(e["subcategory"]) for e in entries}),
        "category": sorted({category_words(e["category"]) for e in entries}),
    }


def _class_of(entry: dict, granularity: str) -> str:
    if granularity == "name":
        return emoji_name(entry)
    if granularity == "subcategory":
        return subcategory_words(entry["subcategory"])
    return category_words(entry["category"])


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


# ---- building ---------------------------------------------------------------------


def build_stamp(style: str, tarball: str | os.PathLike) -> dict:
    return {"builder": "emoji", "format": BUILD_FORMAT, "style": style, "package": Path(tarball).name}


def is_current_build(out_dir: str | os.PathLike) -> bool:
    """True when `out_dir` holds a complete build by this version of the builder:
    shards/ and zeroshot/ are each committed whole, with a stamp, and both stamps agree."""
    stamps = []
    for part in ("shards", "zeroshot"):
        try:
            stamps.append(json.loads((Path(out_dir) / part / BUILD_FILE).read_text()))
        except (OSError, ValueError):
            return False
    return stamps[0] == stamps[1] and stamps[0].get("format") == BUILD_FORMAT


@dataclass
class EmojiBuildSummary:
    style: str
    tarball: Path
    out_dir: Path
    shards: WriteSummary
    num_classes: dict[str, int]
    skipped: Counter = field(default_factory=Counter)

    def __str__(self) -> str:
        classes = ", ".join(f"{g}: {n}" for g, n in self.num_classes.items())
        lines = [
            f"emoji {self.style} from {self.tarball.name}: {self.shards.total} samples in "
            f"{len(self.shards.shards)} shard(s) under {self.out_dir / 'shards'}",
            f"zero-shot classes ({classes}) under {self.out_dir / 'zeroshot'}",
        ]
        if self.skipped:
            reasons = ", ".join(f"{r}: {n}" for r, n in self.skipped.most_common())
            lines.append(f"skipped {sum(self.skipped.values())} entries ({reasons}), see shards/skipped.json")
        return "\n".join(lines)


def build_emoji_dataset(
    style: str,
    out_dir: str | os.PathLike,
    tarball: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    version: str = DEFAULT_VERSION,
    maxcount: int = 250,
    tarball_dir: str | os.PathLike | None = None,
) -> EmojiBuildSummary:
    """Build caption shards and the zero-shot folders for one style (see module docstring)."""
    tarball = find_emoji_tarball(style, tarball=tarball, cache_dir=cache_dir, version=version, tarball_dir=tarball_dir)
    entries, images = read_emoji_package(tarball, style)
    entries = sorted(entries, key=lambda e: (e.get("sort_order", 0), e.get("unified", "")))
    classes = class_lists(entries)
    class_index = {g: {name: i for i, name in enumerate(names)} for g, names in classes.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    zeroshot_tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".zeroshot.partial-"))
    try:
        for granularity, names in classes.items():
            folder = zeroshot_tmp / granularity
            for index in range(len(names)):
                (folder / f"{index:05d}").mkdir(parents=True)
            (folder / "classnames.txt").write_text("\n".join(names) + "\n")

        stamp = json.dumps(build_stamp(style, tarball)) + "\n"  # the same in shards/ and zeroshot/
        with ShardSetWriter(out_dir / "shards", f"emoji-{style}", maxcount=maxcount) as writer:
            for entry in entries:
                source_id = entry.get("unified") or entry.get("image") or emoji_name(entry)
                if entry.get(f"has_img_{style}") is False:
                    writer.skip(source_id, "no_image_for_style", f"has_img_{style} is false")
                    continue
                data = images.get(entry.get("image", ""))
                if data is None:
                    writer.skip(source_id, "missing_image", f"no package/img/{style}/64/{entry.get('image')}")
                    continue
                try:
                    on_white = to_rgb(Image.open(io.BytesIO(data)))
                except Exception as error:
                    writer.skip(source_id, "undecodable_image", f"{type(error).__name__}: {error}")
                    continue
                labels = {g: class_index[g][_class_of(entry, g)] for g in GRANULARITIES}
                metadata = {
                    "unified": entry.get("unified"),
                    "name": emoji_name(entry),
                    "short_names": entry.get("short_names") or [],
                    "category": entry["category"],
                    "subcategory": entry["subcategory"],
                    "style": style,
                    **{f"{g}_index": i for g, i in labels.items()},
                }
                key = writer.write(Record(source_id.lower(), data, emoji_captions(entry), labels["name"], metadata))
                if key is None:
                    continue
                first = None
                for granularity, index in labels.items():
                    path = zeroshot_tmp / granularity / f"{index:05d}" / f"{key}.png"
                    if first is None:
                        on_white.save(path)
                        first = path
                    else:
                        _link_or_copy(first, path)  # same image in three layouts: link, don't triple the disk use
            writer.add_file("classnames.txt", "\n".join(classes["name"]) + "\n")  # names of the cls labels
            writer.add_file(BUILD_FILE, stamp)
        (zeroshot_tmp / BUILD_FILE).write_text(stamp)
        replace_directory(zeroshot_tmp, out_dir / "zeroshot")
    except BaseException:
        shutil.rmtree(zeroshot_tmp, ignore_errors=True)
        raise
    return EmojiBuildSummary(
        style=style, tarball=Path(tarball), out_dir=out_dir, shards=writer.summary,
        num_classes={g: len(n) for g, n in classes.items()}, skipped=writer.summary.skipped,
    )
