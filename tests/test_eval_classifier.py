"""Zero-shot classifier: same weights as open_clip's builder, cached on disk by model and prompts."""
import os

import pytest
import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

import limoe
from eval.classifier import build_zeroshot_classifier, cached_zeroshot_classifier, classifier_cache_key
from eval.prompts import class_prompts

CLASSNAMES = ["red car", "blue fish", "cat", "dog", "green tree", "sun", "smiling face"]


@pytest.mark.parametrize("templates", [OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES,
                                       ["a photo of a {}.", "{} emoji"]])
def test_classifier_equals_open_clip_build_zero_shot_classifier(tiny_model, tiny_tokenizer, templates):
    tiny_model.eval()
    names = CLASSNAMES[:4]  # open_clip's builder then runs one full and one partial batch of 3 classes
    reference = build_zero_shot_classifier(tiny_model, tiny_tokenizer, names, templates, num_classes_per_batch=3)
    ours = build_zeroshot_classifier(tiny_model, tiny_tokenizer, class_prompts(names, templates), batch_size=50)
    assert ours.shape == (tiny_model.config.embed_dim, len(names))
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_classifier_does_not_depend_on_text_batch_size(tiny_model, tiny_tokenizer):
    prompts = class_prompts(CLASSNAMES[:3], SIMPLE_IMAGENET_TEMPLATES)
    a = build_zeroshot_classifier(tiny_model, tiny_tokenizer, prompts, batch_size=4)
    b = build_zeroshot_classifier(tiny_model, tiny_tokenizer, prompts, batch_size=1000)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_classes_may_have_different_numbers_of_prompts(tiny_model, tiny_tokenizer):
    prompts = [["a red car", "a car that is red", "red car emoji"], ["cat"]]
    w = build_zeroshot_classifier(tiny_model, tiny_tokenizer, prompts)
    z = tiny_model.eval().encode_text(tiny_tokenizer(prompts[0]), normalize=True).detach()
    expected = torch.nn.functional.normalize(z.mean(0), dim=0)
    torch.testing.assert_close(w[:, 0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.norm(dim=0), torch.ones(2))


def test_building_restores_training_mode(tiny_model, tiny_tokenizer):
    tiny_model.train()
    build_zeroshot_classifier(tiny_model, tiny_tokenizer, [["cat"], ["dog"]])
    assert tiny_model.training


def test_class_without_prompts_is_an_error(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="no prompts"):
        build_zeroshot_classifier(tiny_model, tiny_tokenizer, [["cat"], []])


def test_cache_miss_then_hit_returns_the_same_weights(tiny_export, tmp_path):
    model, _, tokenizer = limoe.load(tiny_export)
    prompts = class_prompts(CLASSNAMES, SIMPLE_IMAGENET_TEMPLATES)
    w1, info1 = cached_zeroshot_classifier(model, tokenizer, prompts, tiny_export, cache_dir=tmp_path / "cache")
    w2, info2 = cached_zeroshot_classifier(model, tokenizer, prompts, tiny_export, cache_dir=tmp_path / "cache")
    assert (info1["cache"], info2["cache"]) == ("miss", "hit")
    assert info1["path"] == info2["path"] and info1["path"].endswith(".safetensors")
    torch.testing.assert_close(w1, w2, rtol=0, atol=0)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [os.path.basename(info1["path"])]


def test_cache_key_changes_with_prompts_and_with_the_weights_file(tiny_export, tiny_tokenizer):
    prompts = class_prompts(CLASSNAMES, SIMPLE_IMAGENET_TEMPLATES)
    key = classifier_cache_key(tiny_export, prompts)
    assert classifier_cache_key(tiny_export, prompts) == key
    assert classifier_cache_key(tiny_export, prompts[:-1]) != key
    assert classifier_cache_key(tiny_export, class_prompts(CLASSNAMES, ["{} emoji"])) != key
    weights = tiny_export / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # re-exported weights
    assert classifier_cache_key(tiny_export, prompts) != key


def test_corrupt_cache_entry_is_rebuilt(tiny_export, tmp_path):
    model, _, tokenizer = limoe.load(tiny_export)
    prompts = [["cat"], ["dog"]]
    w1, info = cached_zeroshot_classifier(model, tokenizer, prompts, tiny_export, cache_dir=tmp_path)
    with open(info["path"], "r+b") as f:
        f.truncate(40)
    w2, info2 = cached_zeroshot_classifier(model, tokenizer, prompts, tiny_export, cache_dir=tmp_path)
    assert info2["cache"] == "miss"
    torch.testing.assert_close(w1, w2)
    assert cached_zeroshot_classifier(model, tokenizer, prompts, tiny_export, cache_dir=tmp_path)[1]["cache"] == "hit"


def test_prompt_check_reports_cut_prompts_and_classes_that_cannot_be_told_apart(tiny_tokenizer):
    from eval.classifier import check_prompt_tokens

    long_prefix = "a photo of a red green blue yellow"  # longer than the tiny context of 8 on its own
    prompts = [[f"{long_prefix} cat"], [f"{long_prefix} dog"], ["cat"], ["dog emoji"]]
    check = check_prompt_tokens(tiny_tokenizer, prompts)
    assert check == {"prompts": 4, "truncated_prompts": 2, "classes_with_identical_tokens": 2}
    assert check_prompt_tokens(tiny_tokenizer, [["cat"], ["dog"]])["classes_with_identical_tokens"] == 0
