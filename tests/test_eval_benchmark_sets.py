"""CLIP_benchmark's WebDataset layout read as it is: shards, class names, templates, caption lines; the suite."""
import csv
import json

import pytest
import torch
from PIL import Image

import limoe
from clip_benchmark_sets import write_classification_set, write_retrieval_set
from eval.benchmark_sets import (CLASSIFICATION, RETRIEVAL, BenchmarkSetError, benchmark_caption_loader,
                                 is_benchmark_set, open_benchmark_set)
from eval.datasets import DataLayoutError, open_labelled_images
from eval.zeroshot import evaluate_zeroshot
from launch.cli import main as limoe_main
from test_eval_zeroshot import COLOURS, ColourModel, colour_tokenizer

NAMES = sorted(COLOURS)  # blue, green, red


def colour_images(per_class=(2, 3, 4)):
    return [(Image.new("RGB", (20, 20), COLOURS[name]), label)
            for label, name in enumerate(NAMES) for _ in range(per_class[label])]


@pytest.fixture
def colour_set(tmp_path):
    """9 images of 3 colours over 3 shards, with two templates of its own."""
    return write_classification_set(tmp_path / "wds_colours", colour_images(), NAMES,
                                    ["a photo of {c}.", "{c} colour"], per_shard=4)


@pytest.fixture
def caption_set(tmp_path):
    images = [(Image.new("RGB", (20, 20), rgb), [f"a {name} square", f"{name} colour", f"pure {name}"])
              for name, rgb in COLOURS.items()]
    return write_retrieval_set(tmp_path / "wds_colour_captions", images, per_shard=2)


@pytest.fixture
def preprocess():
    return limoe.transforms.image_transform(16)


# ---- the layout ---------------------------------------------------------------------------


def test_classification_folder_gives_its_shards_classnames_and_templates(colour_set):
    benchmark_set = open_benchmark_set(colour_set)
    assert benchmark_set.task == CLASSIFICATION
    assert [s.rsplit("/", 1)[1] for s in benchmark_set.shards] == ["0.tar", "1.tar", "2.tar"]
    assert benchmark_set.classnames == NAMES
    assert benchmark_set.templates == ["a photo of {c}.", "{c} colour"]
    assert benchmark_set.name == "colours"  # the published sets' wds_ prefix dropped


def test_the_split_folder_itself_is_the_same_set(colour_set):
    assert is_benchmark_set(colour_set / "test")
    whole, split = open_benchmark_set(colour_set), open_benchmark_set(colour_set / "test")
    assert (split.root, split.split, split.shards) == (whole.root, "test", whole.shards)


def test_another_split_is_chosen_by_name(tmp_path):
    root = write_classification_set(tmp_path / "set", colour_images((1, 1, 1)), NAMES, None, split="train")
    assert not is_benchmark_set(root)
    assert open_benchmark_set(root, split="train").split == "train"


def test_without_nshards_txt_shards_are_taken_in_numeric_order(colour_set):
    (colour_set / "test" / "nshards.txt").unlink()
    (colour_set / "test" / "2.tar").rename(colour_set / "test" / "10.tar")
    assert [s.rsplit("/", 1)[1] for s in open_benchmark_set(colour_set).shards] == ["0.tar", "1.tar", "10.tar"]


def test_a_shard_listed_in_nshards_but_missing_is_a_clear_error(colour_set):
    (colour_set / "test" / "nshards.txt").write_text("5\n")
    with pytest.raises(BenchmarkSetError, match="lists 5 shards but 2 are missing"):
        open_benchmark_set(colour_set)


def test_multilabel_sets_are_refused_by_name(colour_set):
    (colour_set / "dataset_type.txt").write_text("multilabel\n")
    with pytest.raises(BenchmarkSetError, match="multilabel"):
        open_benchmark_set(colour_set)


def test_a_retrieval_set_is_not_opened_as_labelled_images(caption_set, preprocess):
    assert open_benchmark_set(caption_set).task == RETRIEVAL
    with pytest.raises(DataLayoutError, match="limoe eval retrieval"):
        open_labelled_images(caption_set, preprocess, 16)


# ---- classification ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["webp", "png", "jpg"])
def test_every_image_format_is_read_with_its_cls_label(tmp_path, preprocess, fmt):
    root = write_classification_set(tmp_path / fmt, colour_images(), NAMES, ["{c}"], fmt=fmt)
    data = open_labelled_images(root, preprocess, 16)
    assert data.description["layout"] == "clip_benchmark" and data.num_images is None
    labels = torch.cat([labels for _, labels in data.batches(4)])
    assert labels.tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2]


def test_evaluation_uses_the_sets_own_classnames_and_templates(colour_set, preprocess):
    result = evaluate_zeroshot(ColourModel(), preprocess, colour_tokenizer, colour_set)
    assert result["templates"] == ["a photo of {c}.", "{c} colour"]
    assert result["top1"] == 1.0 and result["images"] == 9 and result["classes"] == 3


def test_given_templates_win_over_the_sets_own(colour_set, preprocess):
    result = evaluate_zeroshot(ColourModel(), preprocess, colour_tokenizer, colour_set, templates=["{}"])
    assert result["templates"] == ["{}"]


def test_zeroshot_cli_reads_the_layout_with_its_templates(tiny_export, colour_set, tmp_path, capsys):
    out = tmp_path / "result.json"
    assert limoe_main(["eval", "zeroshot", "--model", str(tiny_export), "--data", str(colour_set),
                       "--no-cache", "--output", str(out)]) == 0
    assert "clip_benchmark" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["data"]["dataset"] == "colours" and doc["data"]["split"] == "test"
    assert doc["templates"] == {"name": "from the data", "templates": ["a photo of {c}.", "{c} colour"]}
    assert doc["counts"]["images"] == 9 and doc["counts"]["prompts"] == 6


# ---- retrieval ---------------------------------------------------------------------------


def test_every_caption_line_of_a_sample_is_a_caption(caption_set):
    loader = benchmark_caption_loader(open_benchmark_set(caption_set), 16, batch_size=2)
    captions = [caps for batch in loader for caps in batch["captions"]]
    assert captions == [[f"a {n} square", f"{n} colour", f"pure {n}"] for n in COLOURS]


def test_retrieval_cli_on_a_benchmark_folder_counts_every_caption(tiny_export, caption_set, tmp_path):
    out = tmp_path / "retrieval.json"
    assert limoe_main(["eval", "retrieval", "--model", str(tiny_export), "--data", str(caption_set),
                       "--batch-size", "2", "--output", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["counts"] == {"images": 3, "captions": 9}
    assert doc["data"]["layout"] == "clip_benchmark"


# ---- the suite ---------------------------------------------------------------------------


def test_suite_writes_one_row_per_dataset_in_every_format(tiny_export, colour_set, caption_set, tmp_path, capsys):
    outputs = [tmp_path / "suite.csv", tmp_path / "suite.json", tmp_path / "suite.md"]
    argv = ["eval", "suite", "--model", str(tiny_export), "--data", str(colour_set), str(caption_set),
            "--no-cache", "--batch-size", "4"]
    for path in outputs:
        argv += ["--output", str(path)]
    assert limoe_main(argv) == 0
    doc = json.loads(outputs[1].read_text())
    rows = {row["dataset"]: row for row in doc["rows"]}
    assert set(rows) == {"colours", "colour_captions"}
    assert rows["colours"]["task"] == "zeroshot_classification" and rows["colours"]["images"] == 9
    assert rows["colour_captions"]["task"] == "retrieval" and rows["colour_captions"]["images"] == 3
    # The suite's numbers are the single commands' numbers.
    single = tmp_path / "single.json"
    assert limoe_main(["eval", "zeroshot", "--model", str(tiny_export), "--data", str(colour_set), "--no-cache",
                       "--output", str(single)]) == 0
    assert rows["colours"]["top1"] == json.loads(single.read_text())["metrics"]["top1"]
    assert doc["results"]["colour_captions"]["metrics"]["text_to_image_R@1"] == rows["colour_captions"][
        "text_to_image_R@1"]
    with open(outputs[0], newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["dataset"] for r in csv_rows] == ["colours", "colour_captions"]
    assert float(csv_rows[0]["top1"]) == rows["colours"]["top1"]
    markdown = outputs[2].read_text()
    assert markdown.startswith("| dataset | task | images | top1 |") and "| colour_captions | retrieval | 3 |" in markdown


def test_suite_reports_a_broken_dataset_in_its_row_and_runs_the_rest(tiny_export, colour_set, tmp_path, capsys):
    broken = tmp_path / "wds_broken"
    (broken / "test").mkdir(parents=True)
    (broken / "test" / "nshards.txt").write_text("2\n")
    out = tmp_path / "suite.json"
    code = limoe_main(["eval", "suite", "--model", str(tiny_export), "--data", str(broken), str(colour_set),
                       "--no-cache", "--output", str(out)])
    assert code == 1
    assert "1 of 2 datasets failed" in capsys.readouterr().err
    rows = json.loads(out.read_text())["rows"]
    assert "lists 2 shards but 2 are missing" in rows[0]["error"] and rows[0]["top1"] is None
    assert rows[1]["error"] is None and rows[1]["images"] == 9


def test_suite_refuses_an_output_it_cannot_write_before_evaluating(tiny_export, colour_set, tmp_path, capsys):
    code = limoe_main(["eval", "suite", "--model", str(tiny_export), "--data", str(colour_set),
                       "--output", str(tmp_path / "suite.xlsx")])
    assert code == 2 and ".csv, .json or .md" in capsys.readouterr().err
