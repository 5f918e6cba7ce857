"""Class names and prompt templates for zero-shot classification.

ImageNet's 1000 class names and the OpenAI (80) and simple (7) template sets
come from open_clip's metadata module, so they are exactly the ones every
open_clip / CLIP_benchmark number is computed with. Its templates are
lambdas; file templates are strings with a `{}` or `{c}` placeholder. Both
kinds are "templates" here: `fill_template` handles either.

A classifier is built from *prompts*: for every class, the list of strings
whose embeddings are averaged. `class_prompts` makes them from class names
and templates; a JSON file mapping class -> list of prompts gives them
directly (hand-written descriptions, CuPL-style prompts).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping, Sequence, Union

from open_clip.zero_shot_metadata import (IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES,
                                          SIMPLE_IMAGENET_TEMPLATES)

from limoe.embedder import PLACEHOLDERS
from limoe.embedder import fill_template as fill_text_template

Template = Union[str, Callable[[str], str]]

TEMPLATE_SETS: dict[str, Sequence[Template]] = {
    "openai": OPENAI_IMAGENET_TEMPLATES,
    "simple": SIMPLE_IMAGENET_TEMPLATES,
}
CLASSNAME_SETS: dict[str, Sequence[str]] = {"imagenet": IMAGENET_CLASSNAMES}


class PromptError(ValueError):
    pass


def _read_list(path: Path, what: str) -> list[str]:
    """A JSON list of strings, or one entry per non-blank line."""
    if not path.is_file():
        raise PromptError(f"{what} file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise PromptError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise PromptError(f"{path}: expected a JSON list of strings")
        items = [x.strip() for x in items]
    else:
        items = [line.strip() for line in text.splitlines()]
    items = [x for x in items if x]
    if not items:
        raise PromptError(f"{path}: no {what} in the file")
    return items


def load_classnames(spec: str | Sequence[str]) -> list[str]:
    """`"imagenet"`, a file (JSON list or one name per line), or a list of names."""
    if not isinstance(spec, (str, Path)):
        names = [str(x) for x in spec]
        if not names:
            raise PromptError("empty list of class names")
        return names
    if str(spec) in CLASSNAME_SETS:
        return list(CLASSNAME_SETS[str(spec)])
    return _read_list(Path(spec), "class name")


def load_templates(spec: str | Sequence[Template]) -> list[Template]:
    """`"openai"`, `"simple"`, a file (JSON list or one per line, each with `{}` or `{c}`),
    or a list of templates (strings or callables)."""
    if not isinstance(spec, (str, Path)):
        templates = list(spec)
    elif str(spec) in TEMPLATE_SETS:
        return list(TEMPLATE_SETS[str(spec)])
    else:
        templates = _read_list(Path(spec), "template")
    if not templates:
        raise PromptError("empty list of templates")
    for t in templates:
        if isinstance(t, str) and not any(p in t for p in PLACEHOLDERS):
            raise PromptError(f"template {t!r} has no class-name placeholder ({{}} or {{c}})")
    return templates


def fill_template(template: Template, classname: str) -> str:
    return template(classname) if callable(template) else fill_text_template(template, classname)


def template_text(template: Template) -> str:
    """A readable form of a template, for result files: the `{c}` form of a lambda."""
    return template("{c}") if callable(template) else template


def class_prompts(classnames: Sequence[str], templates: Sequence[Template]) -> list[list[str]]:
    """For each class, every template filled with its name."""
    return [[fill_template(t, name) for t in templates] for name in classnames]


def load_class_prompts(path: str | Path) -> dict[str, list[str]]:
    """A JSON file mapping class name -> list of prompts (order kept)."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"class prompt file {path} does not exist")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PromptError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(doc, dict) or not doc:
        raise PromptError(f"{path}: expected a JSON object mapping class name -> list of prompts")
    out = {}
    for name, prompts in doc.items():
        if (not isinstance(prompts, list) or not prompts
                or not all(isinstance(p, str) and p.strip() for p in prompts)):
            raise PromptError(f"{path}: class {name!r} needs a non-empty list of non-empty strings")
        out[name] = [p.strip() for p in prompts]
    return out


def prompts_for_classes(classnames: Sequence[str], prompt_map: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """Pick each class's prompts from a class -> prompts mapping; every class must be there."""
    missing = [c for c in classnames if c not in prompt_map]
    if missing:
        raise PromptError(f"no prompts for {len(missing)} class(es): {missing[:5]}"
                          f"{'...' if len(missing) > 5 else ''}")
    return [list(prompt_map[c]) for c in classnames]
