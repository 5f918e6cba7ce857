"""The emoji builder, offline against fake npm tarballs (and once against the real registry)."""
import json
import shutil
import subprocess
import tarfile

import pytest
from PIL import Image

from data_pipelines import build_eval_loader
from data_pipelines.emoji import (
    EmojiSourceError,
    build_emoji_dataset,
    category_words,
    emoji_captions,
    find_emoji_tarball,
    is_current_build,
    read_emoji_package,
)
from data_pipelines.shards import read_shard, resolve_shards
from data_pipelines.skips import SkipCounter
from data_pipelines.testing import MISSING_IMAGE_NAME
from data_pipelines.cli import main as limoe_main  # the `limoe` CLI restricted to these commands


@pytest.fixture(scope="module")
def built(fake_emoji_tarballs, tmp_path_factory):
    out = tmp_path_factory.mktemp("emoji")
    return {style: (build_emoji_dataset(style, out / style, tarball=path, maxcount=8), out / style)
            for style, path in fake_emoji_tarballs.items()}


def raw_samples(folder):
    skips = SkipCounter()
    raws = [raw for url in resolve_shards(folder / "shards") for raw in read_shard(url, skips)]
    assert skips.total == 0
    return raws


def test_captions_name_short_names_and_short_sentences_for_subcategory_and_category():
    entry = {"name": "GRINNING FACE", "short_names": ["grinning", "grinning_face"], "unified": "1F600",
             "category": "Smileys & Emotion", "subcategory": "face-smiling"}
    assert emoji_captions(entry) == [
        "grinning face",
        "grinning",
        "an emoji of grinning face",
        "a face-smiling emoji",
        "an emoji from smileys and emotion",
    ]
    assert emoji_captions({**entry, "name": ""})[0] == "grinning"  # empty names fall back to short names
    assert category_words("Travel & Places") == "travel and places"


def test_every_entry_with_an_image_becomes_one_sample(built):
    summary, folder = built["google"]
    assert summary.shards.total == 30
    assert dict(summary.skipped) == {"missing_image": 1}
    assert summary.num_classes == {"name": 31, "subcategory": 6, "category": 3}
    assert len(summary.shards.shards) == 4  # 30 samples, 8 per shard
    skipped = json.loads((folder / "shards" / "skipped.json").read_text())
    assert skipped["items"][0]["reason"] == "missing_image"
    assert "skipped 1 entries (missing_image: 1)" in str(summary)


def test_shard_samples_keep_the_original_png_and_all_captions(built, fake_emoji_tarballs):
    _, folder = built["google"]
    entries, images = read_emoji_package(fake_emoji_tarballs["google"], "google")
    raws = {raw["__key__"]: raw for raw in raw_samples(folder)}
    assert raws["e000"]["png"] == images["e000.png"]  # the base image, not the skin tone variant
    assert "e000-1f3fb" not in raws
    captions = json.loads(raws["e000"]["captions.json"])
    assert captions[0] == "red smile" and "an emoji from smileys and emotion" in captions
    metadata = json.loads(raws["e000"]["json"])
    classnames = (folder / "shards" / "classnames.txt").read_text().splitlines()
    assert classnames[int(raws["e000"]["cls"])] == "red smile" == metadata["name"]
    assert metadata["category"] == "Smileys & Emotion" and metadata["style"] == "google"
    empty_named = next(e for e in entries if e["name"] == "")
    assert json.loads(raws[empty_named["unified"].lower()]["captions.json"])[0] == "purple cup"


def test_zero_shot_folders_at_three_granularities(built):
    _, folder = built["google"]
    for granularity, n in {"name": 31, "subcategory": 6, "category": 3}.items():
        root = folder / "zeroshot" / granularity
        names = (root / "classnames.txt").read_text().splitlines()
        assert len(names) == n and names == sorted(names)
        class_dirs = sorted(p.name for p in root.iterdir() if p.is_dir())
        assert class_dirs == [f"{i:05d}" for i in range(n)]  # every class has a folder, even an empty one
        assert sum(len(list((root / d).glob("*.png"))) for d in class_dirs) == 30
    category = folder / "zeroshot" / "category"
    names = (category / "classnames.txt").read_text().splitlines()
    assert names == ["animals and nature", "food and drink", "smileys and emotion"]
    assert len(list((category / "00002").glob("*.png"))) == 10
    image = Image.open(next((category / "00000").glob("*.png")))
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)  # composited onto white
    name_root = folder / "zeroshot" / "name"
    missing = (name_root / "classnames.txt").read_text().splitlines().index(MISSING_IMAGE_NAME.lower())
    assert list((name_root / f"{missing:05d}").iterdir()) == []


def test_google_and_twitter_share_class_lists_but_not_pixels(built):
    (_, google), (_, twitter) = built["google"], built["twitter"]
    for granularity in ("name", "subcategory", "category"):
        path = f"zeroshot/{granularity}/classnames.txt"
        assert (google / path).read_text() == (twitter / path).read_text()
    g, t = raw_samples(google), raw_samples(twitter)
    assert [r["__key__"] for r in g] == [r["__key__"] for r in t]
    assert [r["cls"] for r in g] == [r["cls"] for r in t]
    assert g[0]["png"] != t[0]["png"]


def test_a_build_is_current_only_with_both_stamps_of_this_format(built, tmp_path):
    _, folder = built["google"]
    assert is_current_build(folder)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    stamp = json.loads((copy / "shards" / "build.json").read_text())
    (copy / "shards" / "build.json").write_text(json.dumps({**stamp, "format": stamp["format"] - 1}))
    assert not is_current_build(copy)  # built by an older builder: rebuild
    (copy / "shards" / "build.json").write_text(json.dumps(stamp))
    assert is_current_build(copy)
    (copy / "zeroshot" / "build.json").unlink()
    assert not is_current_build(copy)  # interrupted between committing the shards and the folders
    assert not is_current_build(tmp_path / "missing")


def test_emoji_shards_feed_the_eval_loader(built):
    _, folder = built["twitter"]
    batches = list(build_eval_loader(folder / "shards", 32, batch_size=16))
    assert sum(len(b["keys"]) for b in batches) == 30
    assert batches[0]["images"].shape == (16, 3, 32, 32)
    assert all(label >= 0 for b in batches for label in b["labels"].tolist())


def test_the_cli_builds_from_the_tarball_folder_in_the_environment(fake_emoji_tarballs, tmp_path, monkeypatch,
                                                                    capsys):
    monkeypatch.setenv("LIMOE_NPM_TARBALL_DIR", str(fake_emoji_tarballs["twitter"].parent))
    assert limoe_main(["data", "emoji", "--style", "twitter", "--out", str(tmp_path / "out")]) == 0
    assert "30 samples" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["shards", "zeroshot"]  # no temp folders left


def test_a_cached_tarball_is_reused_without_npm(fake_emoji_tarballs, tmp_path, monkeypatch):
    monkeypatch.delenv("LIMOE_NPM_TARBALL_DIR", raising=False)
    shutil.copy(fake_emoji_tarballs["google"], tmp_path / "emoji-datasource-google-0.0.0.tgz")
    monkeypatch.setattr(shutil, "which", lambda name: None)  # npm "missing": must not be needed
    assert find_emoji_tarball("google", cache_dir=tmp_path, version="0.0.0").parent == tmp_path
    assert find_emoji_tarball("google", cache_dir=tmp_path, version="latest").parent == tmp_path


def test_missing_npm_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("LIMOE_NPM_TARBALL_DIR", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(EmojiSourceError, match="npm is not installed.*--tarball"):
        find_emoji_tarball("google", cache_dir=tmp_path)
    assert limoe_main(["data", "emoji", "--style", "google", "--out", str(tmp_path / "o"),
                       "--cache", str(tmp_path)]) == 1
    assert "error: npm is not installed" in capsys.readouterr().err


def test_a_tarball_that_is_not_an_emoji_package_is_a_clear_error(tmp_path):
    bogus = tmp_path / "emoji-datasource-google-1.0.0.tgz"
    with tarfile.open(bogus, "w:gz"):
        pass
    with pytest.raises(EmojiSourceError, match="no package/emoji.json"):
        build_emoji_dataset("google", tmp_path / "out", tarball=bogus)


def _registry_reachable() -> bool:
    if shutil.which("npm") is None:
        return False
    try:
        result = subprocess.run(["npm", "view", "emoji-datasource-google", "version"], capture_output=True,
                                timeout=30)
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


@pytest.mark.network
def test_real_npm_package_has_the_expected_layout(tmp_path):
    if not _registry_reachable():
        pytest.skip("npm or the npm registry is not available")
    tarball = find_emoji_tarball("google", cache_dir=tmp_path)
    assert tarball.parent == tmp_path and tarball.name == "emoji-datasource-google-16.0.0.tgz"
    entries, images = read_emoji_package(tarball, "google")
    assert len(entries) > 1800 and len(images) > 3000
    assert len({e["category"] for e in entries}) == 10
    assert len({e["subcategory"] for e in entries}) == 99
    assert all(e["image"] in images for e in entries)
