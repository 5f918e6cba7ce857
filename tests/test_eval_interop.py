"""CLIP_benchmark-style loader: (model, transform, tokenizer) usable by open_clip-style evaluators."""
import pytest
import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from PIL import Image

import limoe
from eval.interop import load_limoe


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


def test_clip_benchmark_evaluator_agrees_with_evaluate_zeroshot(tiny_export, tmp_path):
    """Runs where CLIP_benchmark is installed (it is not a dependency of this project)."""
    zeroshot_classification = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    from eval.datasets import open_labelled_images
    from eval.zeroshot import evaluate_zeroshot

    gen = torch.Generator().manual_seed(0)
    names = ["red heart", "blue fish", "green tree", "yellow star", "purple cat", "orange sun"]
    for c, name in enumerate(names):
        for i in range(4):
            colour = tuple(int(v) for v in torch.randint(0, 256, (3,), generator=gen))
            path = tmp_path / "data" / name.replace(" ", "_") / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (24, 24), colour).save(path)
    model, transform, tokenizer = load_limoe(pretrained=tiny_export)
    data = open_labelled_images(tmp_path / "data", transform, model.config.image_size)

    class ImageFolderWithClasses(torch.utils.data.Dataset):
        classes = data.classnames

        def __len__(self):
            return len(data.samples)

        def __getitem__(self, i):
            path, label = data.samples[i]
            return transform(Image.open(path)), label

    templates = ["{c}", "{c} emoji"]  # short: the tiny tokenizer's context is 8
    loader = torch.utils.data.DataLoader(ImageFolderWithClasses(), batch_size=5)
    # CLIP_benchmark's own classifier and logits. (Its `evaluate` wrapper trips over numpy >= 2 when
    # turning counts into floats, so its metrics are taken from the logits, as `evaluate` does.)
    classifier = zeroshot_classification.zero_shot_classifier(model, tokenizer, data.classnames, templates, "cpu",
                                                              amp=False)
    logits, target = zeroshot_classification.run_classification(model, classifier, loader, "cpu", amp=False)
    ours = evaluate_zeroshot(model, transform, tokenizer, data, templates=templates, batch_size=7)
    assert ours["top1"] == pytest.approx((logits.argmax(1) == target).float().mean().item())
    assert ours["top5"] == pytest.approx((logits.topk(5).indices == target[:, None]).any(1).float().mean().item())
    assert ours["mean_per_class_recall"] == pytest.approx(
        zeroshot_classification.balanced_accuracy_score(target, logits.argmax(1)))
    assert 0 < ours["top5"] < 1  # a non-trivial case
