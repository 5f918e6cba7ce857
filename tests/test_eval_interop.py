"""CLIP_benchmark-style loader: (model, transform, tokenizer) usable by open_clip-style evaluators."""
import itertools
import json

import pytest
import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from PIL import Image

import limoe
from eval.interop import load_limoe
from launch.cli import main as limoe_main


def test_loader_takes_clip_benchmarks_keyword_arguments(tiny_export):
    # CLIP_benchmark calls load_func(model_name=..., pretrained=..., cache_dir=..., device=...)
    model, transform, tokenizer = load_limoe(model_name="limoe", pretrained=str(tiny_export), cache_dir=None,
                                             device="cpu")
    assert not model.training
    image = transform(Image.new("RGB", (40, 30), (200, 10, 10)))
    assert image.shape == (3, model.config.image_size, model.config.image_size)
    with torch.no_grad():
        z_img = model.encode_image(image[None])
        z_txt = model.encode_text(tokenizer(["a red heart", "a cat"]))
    assert z_img.shape == (1, model.config.embed_dim) and z_txt.shape == (2, model.config.embed_dim)


def test_loaded_model_equals_limoe_load(tiny_export):
    model, _, tokenizer = load_limoe(pretrained=tiny_export)
    reference, _, _ = limoe.load(tiny_export)
    tokens = tokenizer(["a red heart"])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens), reference.encode_text(tokens))


def test_open_clip_zero_shot_classifier_runs_on_the_loaded_model(tiny_export):
    model, _, tokenizer = load_limoe(pretrained=tiny_export)
    w = build_zero_shot_classifier(model, tokenizer, ["cat", "dog", "fish"], ["a photo of a {}."])
    assert w.shape == (model.config.embed_dim, 3)
    torch.testing.assert_close(w.norm(dim=0), torch.ones(3))


def test_missing_export_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="export folder"):
        load_limoe(pretrained=tmp_path / "nope")


# ---- CLIP_benchmark itself (the [bench] extra, installed by [dev]) ------------------------------

NAMES = ["red heart", "blue fish", "green tree", "yellow star", "purple cat", "orange sun"]
TEMPLATES = ["{c}", "{c} emoji"]  # short: the tiny tokenizer's context is 8


def random_colour_images(count, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [Image.new("RGB", (24, 24), tuple(int(v) for v in torch.randint(0, 256, (3,), generator=gen)))
            for _ in range(count)]


class ImagesWithLabels(torch.utils.data.Dataset):
    """What clip_benchmark.webdataset_builder.convert_dataset takes: (image, label) items with
    `.classes` and `.templates` attributes, which it writes as classnames.txt and templates."""

    classes = NAMES
    templates = TEMPLATES

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def run_clip_benchmark(argv, out):
    from eval.interop import main

    assert main(argv + ["--no_amp", "--num_workers", "0", "--quiet", "--output", str(out)]) == 0
    return json.loads(out.read_text())["metrics"]


def test_clip_benchmarks_own_zeroshot_run_through_the_plug_in_equals_limoe_eval_zeroshot(tiny_export, tmp_path):
    builder = pytest.importorskip("clip_benchmark.webdataset_builder")
    items = [(image, i % len(NAMES)) for i, image in enumerate(random_colour_images(30))]
    builder.convert_dataset(ImagesWithLabels(items), "test", str(tmp_path / "wds_tiny"),
                            transform=builder.PIL_to_bytes("webp"), max_count=8, verbose=False)
    theirs = run_clip_benchmark(["eval", "--model_type", "limoe", "--model", "limoe", "--pretrained",
                                 str(tiny_export), "--dataset", "wds/tiny", "--dataset_root",
                                 str(tmp_path / "wds_tiny"), "--batch_size", "7"], tmp_path / "theirs.json")
    assert limoe_main(["eval", "zeroshot", "--model", str(tiny_export), "--data", str(tmp_path / "wds_tiny"),
                       "--no-cache", "--output", str(tmp_path / "ours.json")]) == 0
    ours = json.loads((tmp_path / "ours.json").read_text())
    assert ours["counts"]["images"] == 30 and ours["templates"]["templates"] == TEMPLATES
    assert ours["metrics"]["top1"] == pytest.approx(theirs["acc1"])
    assert ours["metrics"]["top5"] == pytest.approx(theirs["acc5"])
    assert ours["metrics"]["mean_per_class_recall"] == pytest.approx(theirs["mean_per_class_recall"])
    assert 0 < ours["metrics"]["top5"] < 1  # a non-trivial case


def test_clip_benchmarks_own_retrieval_run_through_the_plug_in_equals_limoe_eval_retrieval(tiny_export, tmp_path):
    builder = pytest.importorskip("clip_benchmark.webdataset_builder")
    # 32 different word pairs: captions with equal tokens would tie, and ties count against the query
    # here (docs/evaluation.md) while CLIP_benchmark's topk breaks them by index.
    words = ["red", "blue", "green", "cat", "dog", "fish", "tree", "sun", "moon", "star", "car", "bird"]
    pairs = [f"{a} {b}" for a, b in itertools.permutations(words, 2)][::4][:32]
    items = [(image, pairs[2 * i:2 * i + 2]) for i, image in enumerate(random_colour_images(16, seed=1))]
    builder.convert_retrieval_dataset(items, "test", str(tmp_path / "wds_captions"),
                                      transform=builder.PIL_to_bytes("png"), max_count=6, verbose=False)
    theirs = run_clip_benchmark(["eval", "--model_type", "limoe", "--model", "limoe", "--pretrained",
                                 str(tiny_export), "--dataset", "wds/captions", "--dataset_root",
                                 str(tmp_path / "wds_captions"), "--task", "zeroshot_retrieval",
                                 "--recall_k", "1", "5", "10", "--batch_size", "5"], tmp_path / "theirs.json")
    assert limoe_main(["eval", "retrieval", "--model", str(tiny_export), "--data", str(tmp_path / "wds_captions"),
                       "--output", str(tmp_path / "ours.json")]) == 0
    ours = json.loads((tmp_path / "ours.json").read_text())
    assert ours["counts"] == {"images": 16, "captions": 32}
    for k in (1, 5, 10):  # CLIP_benchmark's "image retrieval" is text -> image
        assert ours["metrics"][f"text_to_image_R@{k}"] == pytest.approx(theirs[f"image_retrieval_recall@{k}"])
        assert ours["metrics"][f"image_to_text_R@{k}"] == pytest.approx(theirs[f"text_retrieval_recall@{k}"])
    assert 0 < ours["metrics"]["text_to_image_R@5"] < 1


def test_clip_benchmarks_accuracy_runs_on_the_plug_ins_features_under_any_numpy(tiny_export):
    """CLIP_benchmark 1.6.2's accuracy() does float() of a one-element array (refused by numpy >= 2.4)."""
    zeroshot_classification = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    from eval.interop import load_clip_benchmark

    model, transform, tokenizer = load_clip_benchmark(pretrained=str(tiny_export))
    images = torch.stack([transform(image) for image in random_colour_images(12)])
    classifier = zeroshot_classification.zero_shot_classifier(model, tokenizer, NAMES, TEMPLATES, "cpu", amp=False)
    with torch.no_grad():
        logits = 100.0 * torch.nn.functional.normalize(model.encode_image(images), dim=-1) @ classifier
    target = torch.arange(12) % len(NAMES)
    top1, top5 = zeroshot_classification.accuracy(logits, target, topk=(1, 5))
    plain = logits.as_subclass(torch.Tensor)
    assert top1 == pytest.approx((plain.argmax(1) == target).float().mean().item())
    assert top5 == pytest.approx((plain.topk(5).indices == target[:, None]).any(1).float().mean().item())


def test_the_plug_ins_features_save_as_plain_tensors(tiny_export, tmp_path):
    from eval.interop import load_clip_benchmark

    model, transform, _ = load_clip_benchmark(pretrained=str(tiny_export))
    features = model.encode_image(transform(Image.new("RGB", (20, 20)))[None])
    torch.save(features, tmp_path / "features.pt")  # CLIP_benchmark's linear probe caches features so
    loaded = torch.load(tmp_path / "features.pt", weights_only=True)
    assert type(loaded) is torch.Tensor and torch.equal(loaded, features.as_subclass(torch.Tensor))
