"""Zero-shot evaluation end to end: data layouts map classes to the right names, metrics match the model."""
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import limoe
from data_pipelines.writer import Record, write_shards
from data_pipelines.testing import png_bytes
from eval.classifier import build_zeroshot_classifier
from eval.datasets import DataLayoutError, open_labelled_images
from eval.prompts import class_prompts
from eval.zeroshot import evaluate_zeroshot
from launch.cli import main as limoe_main

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}


def save_image(path, colour, size=20):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)


class ColourModel(torch.nn.Module):
    """A model that knows colours: image feature = mean normalised RGB, text feature = one-hot colour.
    It classifies perfectly exactly when labels and class names line up."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device
        self.config = SimpleNamespace(image_size=16)

    def encode_image(self, images, normalize=False):
        z = images.mean(dim=(2, 3))
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(self, tokens, normalize=False):
        z = F.one_hot(tokens[:, 0], 3).float()
        return F.normalize(z, dim=-1) if normalize else z


def colour_tokenizer(texts):
    return torch.tensor([[next(i for i, c in enumerate(COLOURS) if c in t)] for t in texts])


@pytest.fixture
def preprocess():
    return limoe.transforms.image_transform(16)


@pytest.fixture
def emoji_layout(tmp_path):
    """The data builders' zero-shot layout: numbered folders + classnames.txt (blue, green, red)."""
    root = tmp_path / "zeroshot" / "name"
    names = sorted(COLOURS)
    for index, name in enumerate(names):
        for i in range(index + 2):  # imbalanced: 2, 3, 4 images
            save_image(root / f"{index:05d}" / f"{name}-{i}.png", COLOURS[name])
    (root / "classnames.txt").write_text("\n".join(names) + "\n")
    return root


# ---- layouts -------------------------------------------------------------------------


def test_imagenet_folder_maps_sorted_wnids_to_open_clip_names(tmp_path, preprocess):
    for wnid in ("n02123045", "n01440764", "n01443537"):  # created out of order on purpose
        save_image(tmp_path / "val" / wnid / f"ILSVRC2012_val_{wnid}.JPEG", (10, 20, 30))
    data = open_labelled_images(tmp_path, preprocess, 16)
    assert data.description["layout"] == "imagenet"
    assert data.classnames == ["tench", "goldfish", "tabby cat"]
    assert [(path.parent.name, label) for path, label in data.samples] == [
        ("n01440764", 0), ("n01443537", 1), ("n02123045", 2)]


def test_imagenet_subset_with_all_1000_names_keeps_standard_labels(tmp_path, preprocess):
    for wnid in ("n02123045", "n01440764"):
        save_image(tmp_path / "val" / wnid / "a.JPEG", (10, 20, 30))
    data = open_labelled_images(tmp_path / "val", preprocess, 16, classnames=limoe_imagenet_names())
    assert len(data.classnames) == 1000
    assert [label for _, label in data.samples] == [0, 281]
    assert data.classnames[281] == "tabby cat"


def limoe_imagenet_names():
    from eval.prompts import load_classnames

    return load_classnames("imagenet")


def test_numbered_folders_take_names_from_classnames_txt(emoji_layout, preprocess):
    data = open_labelled_images(emoji_layout, preprocess, 16)
    assert data.description["layout"] == "numbered_folders"
    assert data.classnames == ["blue", "green", "red"]
    assert {(p.name.split("-")[0], label) for p, label in data.samples} == {("blue", 0), ("green", 1), ("red", 2)}


def test_numbered_folders_without_class_names_are_a_clear_error(emoji_layout, preprocess):
    (emoji_layout / "classnames.txt").unlink()
    with pytest.raises(DataLayoutError, match="numbered"):
        open_labelled_images(emoji_layout, preprocess, 16)


def test_named_folders_are_class_names(tmp_path, preprocess):
    save_image(tmp_path / "red_heart" / "a.png", (200, 0, 0))
    save_image(tmp_path / "blue_circle" / "b.png", (0, 0, 200))
    data = open_labelled_images(tmp_path, preprocess, 16)
    assert data.classnames == ["blue circle", "red heart"]
    assert [(p.name, label) for p, label in data.samples] == [("b.png", 0), ("a.png", 1)]


def test_named_folders_match_given_class_names_by_name(tmp_path, preprocess):
    save_image(tmp_path / "red" / "a.png", (200, 0, 0))
    save_image(tmp_path / "blue" / "b.png", (0, 0, 200))
    data = open_labelled_images(tmp_path, preprocess, 16, classnames=["red", "green", "blue"])
    assert sorted((p.name, label) for p, label in data.samples) == [("a.png", 0), ("b.png", 2)]


# ---- evaluation -------------------------------------------------------------------------


def test_a_model_that_knows_colours_scores_perfectly_on_the_emoji_layout(emoji_layout, preprocess):
    result = evaluate_zeroshot(ColourModel(), preprocess, colour_tokenizer, emoji_layout,
                               templates=["a {} emoji", "{}"], batch_size=4)
    assert result["images"] == 9 and result["classes"] == 3
    assert result["top1"] == 1.0 and result["mean_per_class_recall"] == 1.0
    assert "top5" not in result
    assert [row["images"] for row in result["per_class"]] == [2, 3, 4]


def test_wrong_class_names_for_the_data_score_zero(emoji_layout, preprocess):
    (emoji_layout / "classnames.txt").write_text("green\nred\nblue\n")  # shifted by one
    result = evaluate_zeroshot(ColourModel(), preprocess, colour_tokenizer, emoji_layout, templates=["{}"])
    assert result["top1"] == 0.0


def test_metrics_match_the_model_computed_by_hand(emoji_layout, preprocess, tiny_model, tiny_tokenizer):
    names = ["blue", "green", "red"]
    result = evaluate_zeroshot(tiny_model, preprocess, tiny_tokenizer, emoji_layout, templates="simple",
                               batch_size=5)
    data = open_labelled_images(emoji_layout, preprocess, 16)
    images = torch.stack([preprocess(Image.open(p)) for p, _ in data.samples])
    labels = torch.tensor([label for _, label in data.samples])
    w = build_zeroshot_classifier(tiny_model, tiny_tokenizer, class_prompts(names, limoe_templates("simple")))
    with torch.no_grad():
        logits = 100 * tiny_model.eval().encode_image(images, normalize=True) @ w
    expected = (logits.argmax(1) == labels).float().mean().item()
    assert result["top1"] == pytest.approx(expected)
    assert len(result["templates"]) == 7


def limoe_templates(name):
    from eval.prompts import load_templates

    return load_templates(name)


def test_unreadable_images_are_skipped_and_counted(emoji_layout, preprocess):
    (emoji_layout / "00002" / "broken.png").write_bytes(b"not a png")
    result = evaluate_zeroshot(ColourModel(), preprocess, colour_tokenizer, emoji_layout, templates=["{}"])
    assert result["images"] == 9
    assert result["skipped"] == {"unreadable_image": 1}


def test_max_images_takes_a_sample_across_classes(emoji_layout, preprocess):
    result = evaluate_zeroshot(ColourModel(), preprocess, colour_tokenizer, emoji_layout, templates=["{}"],
                               max_images=5)
    assert result["images"] == 5


def test_training_mode_is_restored(emoji_layout, preprocess, tiny_model, tiny_tokenizer):
    tiny_model.train()
    evaluate_zeroshot(tiny_model, preprocess, tiny_tokenizer, emoji_layout, templates=["{}"], max_images=3)
    assert tiny_model.training


def test_webdataset_shards_with_class_labels(tmp_path, preprocess):
    names = sorted(COLOURS)
    records = [Record(f"img{i}", png_bytes(Image.new("RGB", (20, 20), COLOURS[names[i % 3]])), [names[i % 3]],
                      i % 3) for i in range(7)]
    write_shards(records, tmp_path / "shards", "colours", maxcount=3)
    (tmp_path / "shards" / "classnames.txt").write_text("\n".join(names) + "\n")
    result = evaluate_zeroshot(ColourModel(), preprocess, colour_tokenizer, tmp_path / "shards", templates=["{}"],
                               batch_size=2)
    assert result["data"]["layout"] == "webdataset"
    assert result["images"] == 7 and result["top1"] == 1.0


def test_labels_beyond_the_class_names_are_a_clear_error(tmp_path, preprocess):
    records = [Record("img0", png_bytes(Image.new("RGB", (20, 20), COLOURS["red"])), ["red"], 5)]
    write_shards(records, tmp_path / "shards", "colours")
    with pytest.raises(ValueError, match="label 5"):
        evaluate_zeroshot(ColourModel(), preprocess, colour_tokenizer, tmp_path / "shards",
                          classnames=sorted(COLOURS), templates=["{}"])


def test_batches_from_the_training_loop_can_be_passed_directly(preprocess):
    images = torch.stack([preprocess(Image.new("RGB", (20, 20), COLOURS[c])) for c in ("red", "blue")])
    batches = [{"images": images, "labels": torch.tensor([2, 0])}]
    result = evaluate_zeroshot(ColourModel(), None, colour_tokenizer, batches, classnames=["blue", "green", "red"],
                               templates=["{}"])
    assert result["top1"] == 1.0 and result["images"] == 2


def test_a_map_style_dataset_can_be_passed_and_sampled(preprocess):
    names = ["blue", "green", "red"]
    items = [(preprocess(Image.new("RGB", (20, 20), COLOURS[c])), names.index(c)) for c in names * 3]

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            return items[i]

    full = evaluate_zeroshot(ColourModel(), None, colour_tokenizer, Items(), classnames=names, templates=["{}"],
                             batch_size=4)
    sampled = evaluate_zeroshot(ColourModel(), None, colour_tokenizer, Items(), classnames=names,
                                templates=["{}"], max_images=4)
    assert (full["images"], full["top1"]) == (9, 1.0)
    assert sampled["images"] == 4


# ---- command line -------------------------------------------------------------------------


def test_cli_writes_result_json_and_per_class_csv_and_reuses_the_cached_classifier(
        tiny_export, emoji_layout, tmp_path, capsys):
    out = tmp_path / "result.json"
    argv = ["eval", "zeroshot", "--model", str(tiny_export), "--data", str(emoji_layout), "--templates", "simple",
            "--output", str(out), "--per-class-csv", str(tmp_path / "per_class.csv"),
            "--cache-dir", str(tmp_path / "cache"), "--batch-size", "4"]
    assert limoe_main(argv) == 0
    printed = capsys.readouterr().out
    assert "top-1" in printed and "mean per-class recall" in printed
    doc = json.loads(out.read_text())
    assert doc["model"]["export"] == str(tiny_export)
    assert doc["data"]["layout"] == "numbered_folders"
    assert doc["counts"]["images"] == 9 and doc["counts"]["classes"] == 3 and doc["counts"]["prompts"] == 21
    assert len(doc["templates"]["templates"]) == 7
    assert set(doc["metrics"]) == {"top1", "mean_per_class_recall"}
    assert doc["timing"]["classifier_cache"] == "miss"
    assert (tmp_path / "per_class.csv").read_text().splitlines()[0] == "class,name,images,top1"
    assert limoe_main(argv) == 0
    second = json.loads(out.read_text())
    assert second["timing"]["classifier_cache"] == "hit"
    assert second["metrics"] == doc["metrics"]


def test_cli_reports_bad_input_in_one_line(tiny_export, tmp_path, capsys):
    (tmp_path / "data" / "00000").mkdir(parents=True)
    code = limoe_main(["eval", "zeroshot", "--model", str(tiny_export), "--data", str(tmp_path / "data")])
    assert code == 2
    assert "numbered" in capsys.readouterr().err
    code = limoe_main(["eval", "zeroshot", "--model", str(tmp_path / "no-export"), "--data", str(tmp_path)])
    assert code == 2
    assert "config.json" in capsys.readouterr().err
