"""benchmarks/openmoji_shards.py: a second drawing of the demo's emoji, with the demo's captions and
classes. The SVG renderer is swapped for a stub (CairoSVG is not a dependency), so these check the
matching, the labels and the skips, not how OpenMoji looks."""
from __future__ import annotations

import io
import json
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import openmoji_shards as om  # noqa: E402
from data_pipelines.emoji import EmojiSourceError, build_emoji_dataset, read_emoji_package  # noqa: E402
from data_pipelines.testing import MISSING_IMAGE_NAME, png_bytes  # noqa: E402


def read_samples(shard_dir: Path) -> dict[str, dict[str, bytes]]:
    samples = defaultdict(dict)
    for shard in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                samples[key][ext] = tar.extractfile(member).read()
    return dict(samples)


def stub_render(svg: bytes) -> bytes:
    if b"broken" in svg:
        raise ValueError("not an SVG")
    return png_bytes(Image.new("RGBA", (om.SIZE, om.SIZE), (10, 200, 30, 255)))


def test_code_point_keys_fall_back_to_non_qualified_and_without_fe0f():
    entry = {"unified": "2764-fe0f", "non_qualified": "2764"}
    assert om.code_point_keys(entry) == ["2764-FE0F", "2764"]
    assert om.code_point_keys({"unified": "1F600", "non_qualified": None}) == ["1F600"]


def test_samples_have_the_demo_builders_captions_and_classes(tmp_path, fake_emoji_tarballs):
    demo = build_emoji_dataset("google", tmp_path / "google", tarball=fake_emoji_tarballs["google"])
    entries, _ = read_emoji_package(fake_emoji_tarballs["google"], "google")
    with_images = [e for e in entries if e["name"] != MISSING_IMAGE_NAME]  # it has no OpenMoji drawing either
    svgs = {e["unified"].upper(): b"<svg/>" for e in with_images}
    # one drawing known only without its variation selector, one absent, one that does not render
    first, absent, broken = with_images[0], with_images[1], with_images[2]
    first["unified"] = first["unified"] + "-FE0F"
    del svgs[absent["unified"].upper()]
    svgs[broken["unified"].upper()] = b"broken"

    summary = om.build_openmoji_shards(entries, svgs, tmp_path / "openmoji", stub_render, {"builder": "test"})

    assert summary.skipped == {"no_openmoji_drawing": 2, "unrenderable_svg": 1}  # absent + the missing-image entry
    theirs = read_samples(tmp_path / "google" / "shards")
    ours = read_samples(tmp_path / "openmoji" / "shards")
    assert len(ours) == demo.shards.total - 2 == summary.total
    for key, sample in ours.items():
        twin_key = key if key in theirs else key.removesuffix("-fe0f")
        assert json.loads(sample["captions.json"]) == json.loads(theirs[twin_key]["captions.json"])
        assert sample["cls"] == theirs[twin_key]["cls"]
        meta, their_meta = json.loads(sample["json"]), json.loads(theirs[twin_key]["json"])
        assert meta["style"] == "openmoji"
        assert {g: meta[f"{g}_index"] for g in om.GRANULARITIES} == \
            {g: their_meta[f"{g}_index"] for g in om.GRANULARITIES}
        assert Image.open(io.BytesIO(sample["png"])).size == (om.SIZE, om.SIZE)
    assert (tmp_path / "openmoji" / "shards" / "classnames.txt").read_text() == \
        (tmp_path / "google" / "shards" / "classnames.txt").read_text()
    sizes = json.loads((tmp_path / "openmoji" / "shards" / "sizes.json").read_text())
    assert sizes["total"] == len(ours)


def test_reads_colour_svgs_only_and_rejects_other_packages(tmp_path):
    path = tmp_path / "openmoji-0.0.0.tgz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in [("package/color/svg/1F600.svg", b"<svg>colour</svg>"),
                           ("package/black/svg/1F600.svg", b"<svg>black</svg>"),
                           ("package/color/svg/extra/1F601.svg", b"<svg>nested</svg>")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert om.read_openmoji_svgs(path) == {"1F600": b"<svg>colour</svg>"}

    with pytest.raises(EmojiSourceError, match="no package/color/svg"):
        om.read_openmoji_svgs(_empty_tgz(tmp_path))
    with pytest.raises(EmojiSourceError, match="does not exist"):
        om.find_openmoji_tarball(str(tmp_path / "absent.tgz"), None)


def _empty_tgz(tmp_path: Path) -> Path:
    path = tmp_path / "empty.tgz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("package/package.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    return path
