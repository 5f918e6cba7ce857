"""Class names and templates: open_clip's ImageNet sets, files, per-class prompt mappings."""
import json

import pytest
from open_clip import zero_shot_metadata

from eval.prompts import (PromptError, class_prompts, fill_template, load_class_prompts, load_classnames,
                          load_templates, prompts_for_classes, template_text)


def test_imagenet_names_and_templates_are_open_clips():
    assert load_classnames("imagenet") == list(zero_shot_metadata.IMAGENET_CLASSNAMES)
    assert len(load_classnames("imagenet")) == 1000
    assert load_templates("openai") == list(zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES)
    assert len(load_templates("openai")) == 80 and len(load_templates("simple")) == 7


def test_lambda_and_string_templates_fill_the_same_way():
    lam = zero_shot_metadata.SIMPLE_IMAGENET_TEMPLATES[0]
    assert fill_template(lam, "dog") == fill_template("itap of a {}.", "dog") == "itap of a dog."
    assert fill_template("a {c} with {braces}", "dog") == "a dog with {braces}"
    assert template_text(lam) == "itap of a {c}."


def test_classnames_from_a_text_file_skip_blank_lines(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("grinning face\n\n  red heart \nthumbs up\n")
    assert load_classnames(path) == ["grinning face", "red heart", "thumbs up"]


def test_classnames_from_a_json_list(tmp_path):
    path = tmp_path / "names.json"
    path.write_text(json.dumps(["cat", "dog"]))
    assert load_classnames(str(path)) == ["cat", "dog"]


def test_template_file_needs_a_placeholder_on_every_line(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("a photo of a {}.\nan emoji of {c}\n")
    assert [fill_template(t, "cat") for t in load_templates(path)] == ["a photo of a cat.", "an emoji of cat"]
    path.write_text("a photo of a {}.\nno placeholder here\n")
    with pytest.raises(PromptError, match="no placeholder here"):
        load_templates(path)


def test_missing_or_empty_files_are_clear_errors(tmp_path):
    with pytest.raises(PromptError, match="does not exist"):
        load_classnames(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(PromptError, match="no class name"):
        load_classnames(tmp_path / "empty.txt")


def test_class_prompts_fill_every_template_for_every_class():
    assert class_prompts(["cat", "dog"], ["a {}", "{} emoji"]) == [["a cat", "cat emoji"], ["a dog", "dog emoji"]]


def test_per_class_prompt_mapping(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"cat": ["a small cat", "a cat emoji"], "dog": ["a dog"]}))
    mapping = load_class_prompts(path)
    assert prompts_for_classes(["dog", "cat"], mapping) == [["a dog"], ["a small cat", "a cat emoji"]]
    with pytest.raises(PromptError, match="no prompts for 1 class"):
        prompts_for_classes(["cat", "bird"], mapping)


def test_per_class_prompt_mapping_rejects_empty_lists(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"cat": []}))
    with pytest.raises(PromptError, match="'cat'"):
        load_class_prompts(path)
