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
