"""Folder, CSV and ImageNet builders, `limoe data check`, and `limoe tokenizer train`."""
import json

import pytest

from data_pipelines import build_eval_loader
from data_pipelines.folder import build_folder_dataset
from data_pipelines.imagenet import find_imagenet_val_dir, imagenet_classes, standard_wnids
from data_pipelines.shards import read_shard, resolve_shards
from data_pipelines.skips import SkipCounter
from data_pipelines.table import build_table_dataset
from data_pipelines.testing import jpeg_bytes, png_bytes, solid_image, write_fake_shards
from data_pipelines.cli import main as limoe_main  # the `limoe` CLI restricted to these commands
from limoe.tokenizer import Tokenizer


def raw_samples(folder):
    skips = SkipCounter()
    return [raw for url in resolve_shards(folder) for raw in read_shard(url, skips)]


def test_folder_with_sidecar_captions(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (images / "a.jpg").write_bytes(jpeg_bytes(solid_image(1)))
    (images / "a.txt").write_text("a red square\n\nanother caption for a\n")
    (images / "sub" / "b.png").write_bytes(png_bytes(solid_image(2)))
    (images / "sub" / "b.txt").write_text("b caption\n")
    (images / "lonely.png").write_bytes(png_bytes(solid_image(3)))  # no caption file: skipped
    summary = build_folder_dataset(images, tmp_path / "out", prefix="pics")
    assert summary.total == 2 and dict(summary.skipped) == {"no_caption_file": 1}
    raws = {raw["__key__"]: raw for raw in raw_samples(tmp_path / "out" / "shards")}
    assert json.loads(raws["a"]["captions.json"]) == ["a red square", "another caption for a"]
    assert raws["a"]["jpg"] == (images / "a.jpg").read_bytes()
    assert json.loads(raws["sub_b"]["captions.json"]) == ["b caption"]


def test_folder_per_class_gives_labels_and_classnames(tmp_path):
    images = tmp_path / "images"
    for index, name in enumerate(["tabby_cat", "golden_retriever", "zebra"]):
        (images / name).mkdir(parents=True)
        for i in range(2):
            (images / name / f"{i}.png").write_bytes(png_bytes(solid_image(index * 10 + i)))
    build_folder_dataset(images, tmp_path / "out", classes=True)
    shards = tmp_path / "out" / "shards"
    assert (shards / "classnames.txt").read_text().splitlines() == ["golden retriever", "tabby cat", "zebra"]
    batch = next(iter(build_eval_loader(shards, 16, batch_size=6)))
    assert batch["labels"].tolist() == [0, 0, 1, 1, 2, 2]
    assert batch["captions"][0] == ["golden retriever"]


def test_csv_of_paths_and_captions(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.png").write_bytes(png_bytes(solid_image(i)))
    (tmp_path / "table.csv").write_text(
        "path,text,label\nimg/0.png,zero|nought,0\nimg/1.png,one,1\nimg/9.png,missing,2\nimg/2.png,two,\n"
    )
    summary = build_table_dataset(tmp_path / "table.csv", "path", "text", tmp_path / "out", label_col="label",
                                  caption_sep="|")
    assert summary.total == 3 and dict(summary.skipped) == {"missing_image_file": 1}
    raws = raw_samples(tmp_path / "out" / "shards")
    assert [json.loads(r["captions.json"]) for r in raws] == [["zero", "nought"], ["one"], ["two"]]
    assert [r.get("cls") for r in raws] == [b"0", b"1", None]
    with pytest.raises(ValueError, match=r"no column\(s\) \['caption'\]"):
        build_table_dataset(tmp_path / "table.csv", "path", "caption", tmp_path / "out2")


def test_parquet_without_pyarrow_says_what_to_install(tmp_path):
    try:
        import pyarrow  # noqa: F401
        pytest.skip("pyarrow is installed")
    except ImportError:
        pass
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    with pytest.raises(RuntimeError, match="pip install pyarrow"):
        build_table_dataset(tmp_path / "t.parquet", "path", "text", tmp_path / "out")


def test_imagenet_index_is_sorted_wnid_order_with_open_clip_names(tmp_path):
    wnids = standard_wnids()
    assert len(wnids) == 1000 and wnids[0] == "n01440764" and wnids == sorted(wnids)
    val = tmp_path / "imagenet" / "val"
    for wnid in ["n15075141", "n01443537", "n01440764"]:  # a 3-class subset, created out of order
        (val / wnid).mkdir(parents=True)
        (val / wnid / "ILSVRC2012_val_00000001.JPEG").write_bytes(jpeg_bytes(solid_image(len(wnid))))
    assert find_imagenet_val_dir(tmp_path / "imagenet") == val
    assert imagenet_classes(val) == [("n01440764", "tench"), ("n01443537", "goldfish"),
                                     ("n15075141", "toilet paper")]
    assert limoe_main(["data", "imagenet", "--val", str(tmp_path / "imagenet"), "--out", str(tmp_path / "o")]) == 0
    shards = tmp_path / "o" / "shards"
    assert (shards / "classnames.txt").read_text().splitlines() == ["tench", "goldfish", "toilet paper"]
    labels = [int(r["cls"]) for r in raw_samples(shards)]
    assert labels == [0, 1, 2]


def test_unknown_wnids_need_a_classnames_file(tmp_path):
    for wnid in ["n99999999", "n01440764"]:
        (tmp_path / wnid).mkdir()
    with pytest.raises(ValueError, match="classnames file"):
        imagenet_classes(tmp_path)
    names = tmp_path / "names.txt"
    names.write_text("tench\nmystery\n")
    assert imagenet_classes(tmp_path, names) == [("n01440764", "tench"), ("n99999999", "mystery")]
    with pytest.raises(FileNotFoundError, match="wnid-named class folders"):
        find_imagenet_val_dir(tmp_path / "n01440764")


def test_data_check_reports_counts(tmp_path, capsys):
    write_fake_shards(tmp_path / "s", num_samples=12, per_shard=5)
    assert limoe_main(["data", "check", str(tmp_path / "s")]) == 0
    assert "3 shard(s), 12 readable samples of 12 listed in sizes.json; nothing skipped" in capsys.readouterr().out


def test_data_check_counts_the_caption_problems_training_would_skip(tmp_path, capsys):
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "c-000000.tar")) as writer:
        writer.write({"__key__": "ok", "png": png_bytes(solid_image(1)), "captions.json": b'["fine"]'})
        writer.write({"__key__": "none", "png": png_bytes(solid_image(2))})
        writer.write({"__key__": "blank", "png": png_bytes(solid_image(3)), "captions.json": b'[" "]'})
        writer.write({"__key__": "bad", "png": png_bytes(solid_image(4)), "captions.json": b"{not json"})
    assert limoe_main(["data", "check", str(tmp_path)]) == 1
    assert ("1 readable samples; skipped 3 (missing_caption: 1, empty_caption: 1, bad_caption_json: 1)"
            in capsys.readouterr().out)
    # Classification-only shards need no captions: --captions-optional reads them like the classification eval.
    assert limoe_main(["data", "check", "--captions-optional", str(tmp_path)]) == 0
    assert "4 readable samples; nothing skipped" in capsys.readouterr().out


def test_data_check_counts_the_samples_of_a_tar_with_no_members_as_missing(tmp_path, capsys):
    import tarfile

    tarfile.open(tmp_path / "e-000000.tar", "w").close()  # a valid tar, no members
    (tmp_path / "sizes.json").write_text(json.dumps({"e-000000.tar": 161, "total": 161}))
    assert limoe_main(["data", "check", str(tmp_path)]) == 1
    assert ("0 readable samples of 161 listed in sizes.json; skipped 162 (missing_samples: 161, truncated_tar: 1)"
            in capsys.readouterr().out)


def test_tokenizer_train_from_shard_captions(tmp_path, capsys):
    write_fake_shards(tmp_path / "s", num_samples=30, per_shard=10)
    out = tmp_path / "tok" / "tokenizer.model"
    assert limoe_main(["tokenizer", "train", "--data", str(tmp_path / "s"), "--vocab-size", "30",
                       "--out", str(out), "--context-length", "24"]) == 0
    assert "wrote" in capsys.readouterr().out
    tokenizer = Tokenizer.load(out)
    assert tokenizer.context_length == 24 and tokenizer.vocab_size == 30
    assert tokenizer.decode(tokenizer("colour number 7")[0]) == "colour number 7"


def test_cli_errors_are_one_line_not_a_traceback(tmp_path, capsys):
    assert limoe_main(["tokenizer", "train", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "t")]) == 1
    assert capsys.readouterr().err.startswith("error: ")


def test_the_limoe_cli_registers_these_commands():
    from launch.cli import COMMAND_MODULES

    assert "data_pipelines.cli" in COMMAND_MODULES
