"""`limoe demo` end to end on the fake emoji packages: the same code path, a tiny budget."""
import json
import os

import pytest

from launch.cli import main

# limoe-nano's expert layout is kept, its expert widths scaled to this model (half mlp_dim).
TINY_MODEL = ["model.width=32", "model.depth=2", "model.heads=2", "model.mlp_dim=64", "model.embed_dim=16",
              "model.image_size=16", "model.patch_size=4", "model.moe.expert_mlp_dim=32",
              "model.moe.shared_expert_mlp_dim=32", "data.workers=0"]


@pytest.mark.slow
def test_demo_produces_every_artifact_and_prints_the_table(tmp_path, fake_emoji_tarballs, capsys):
    out = tmp_path / "demo"
    tarballs = fake_emoji_tarballs["google"].parent
    argv = ["demo", "--out", str(out), "--tarball-dir", str(tarballs), "--steps", "3", "--batch-size", "8",
            "--vocab-size", "60", "--compare-dense", "--compare", "open_clip"]
    for item in TINY_MODEL:
        argv += ["--set", item]
    assert main(argv) == 0

    printed = capsys.readouterr().out
    assert "Zero-shot on the unseen Twemoji style" in printed and "| mean per-class recall |" in printed
    for granularity in ("name", "subcategory", "category"):
        for model in ("limoe", "dense", "open_clip"):
            assert f"| {model} | {granularity} |" in printed
    assert "limoe serve --model" in printed

    for name in ("report.md", "loss.png", "routing.png", "routing.json", "results.json"):
        assert (out / name).is_file(), name
    for run, tokenizer in (("limoe", "tokenizer.model"), ("dense", "tokenizer.model"),
                           ("open_clip", "tokenizer.bpe.json")):
        export = out / run / "export"
        assert (export / "model.safetensors").is_file() and (export / tokenizer).is_file()
        assert (out / run / "metrics.jsonl").is_file()
    results = json.loads((out / "results.json").read_text())
    rows = {r["granularity"]: r for r in results["results"]["limoe"]}
    assert rows["category"]["classes"] == 3 and rows["subcategory"]["classes"] == 6
    assert rows["name"]["images"] == 30  # one fake entry has no image
    assert 0.0 <= rows["name"]["top1"] <= 1.0
    report = (out / "report.md").read_text()
    assert "never saw" in report and "![routing](routing.png)" in report
    models = results["models"]
    assert models["open_clip"]["model"] == "open_clip-nano" and "BPETokenizer" in models["open_clip"]["tokenizer"]
    assert models["dense"]["parameters"] < models["limoe"]["parameters"]
    assert "| open_clip | open_clip-nano |" in report


def test_the_demo_leaves_the_tarball_folder_variable_as_it_found_it(tmp_path, fake_emoji_tarballs, monkeypatch):
    """--tarball-dir is passed down, not set in $LIMOE_NPM_TARBALL_DIR: a process that goes on after
    `limoe demo` (a test worker) must not read the fake packages later."""
    from data_pipelines.emoji import TARBALL_DIR_ENV, EmojiSourceError
    from launch.demo import build_data

    tarballs = fake_emoji_tarballs["google"].parent
    monkeypatch.delenv(TARBALL_DIR_ENV, raising=False)
    data = build_data(tmp_path / "data", None, str(tarballs))
    assert set(data) == {"train", "eval"} and all(p.is_dir() for p in data.values())
    assert TARBALL_DIR_ENV not in os.environ
    monkeypatch.setenv(TARBALL_DIR_ENV, "/somewhere/else")
    build_data(tmp_path / "data", None, str(tarballs))  # cached now; the variable still comes back
    assert os.environ[TARBALL_DIR_ENV] == "/somewhere/else"
    with pytest.raises(EmojiSourceError, match=r"--tarball-dir .*empty has no emoji-datasource-google-\*\.tgz"):
        build_data(tmp_path / "other", None, str(tmp_path / "empty"))
