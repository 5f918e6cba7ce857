"""Evaluators as plug-ins, after big_vision's: one small class per kind of evaluation.

A training config lists them by name (launch/train_config.py parses and checks
each `evals.<name>.*` key like every other key):

    evals:
      imagenet: {type: zeroshot, every: 5000, data: data/imagenet/shards, classnames: imagenet}
      coco:     {type: retrieval, every: 5000, data: 'data/coco/val-{000000..000004}.tar', max_images: 5000}
      routing:  {type: routing, every: 1000, data: data/cc12m/val, max_pairs: 1024}

An evaluator's fields are its settings. `run(model, tokenizer)` returns flat
metrics (name -> float: what training logs as eval/<name>/<metric>);
`evaluate(model, tokenizer)` the full result that `run` reads them from and the
`limoe eval` commands write. The training hook (launch/eval_hook.py) and the
CLI (eval/cli.py) build these same classes; `EVALUATORS` finds one by `type`.

The evaluation code is imported when an evaluator runs, not here, so parsing a
training config stays light.
"""
from __future__ import annotations

import importlib
import sys
import time
from dataclasses import dataclass
from typing import ClassVar


@dataclass
class Evaluator:
    type: ClassVar[str]  # the `type` of a config entry
    what: ClassVar[str]  # how a log line names the task: "<what> on <data>"
    module: ClassVar[str]  # the eval/ module doing the work (checked importable before launch)
    data_help: ClassVar[str]  # what `data` must be, for the error when it is missing
    needs_experts: ClassVar[bool] = False  # only for a model with MoE layers (checked before training)

    every: int = 0  # training steps between runs; 0 = off (`limoe eval` runs it once, whatever this is)
    data: str | None = None
    batch_size: int = 64  # images (or pairs) per forward pass
    workers: int = 0  # data loading worker processes

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def describe(self) -> str:
        return f"{self.what} on {self.data}"

    def check_available(self) -> None:
        """ImportError if the code this evaluator runs cannot be imported."""
        importlib.import_module(self.module)

    def problems(self) -> dict[str, str]:
        """{field: what is wrong with its value} (empty when every value is usable)."""
        found = {}
        if self.every < 0:
            found["every"] = f"must be >= 0, got {self.every}"
        if self.every and not self.data:
            found["data"] = f"every > 0 needs data ({self.data_help})"
        if self.batch_size < 1:
            found["batch_size"] = f"must be >= 1, got {self.batch_size}"
        if self.workers < 0:
            found["workers"] = f"must be >= 0, got {self.workers}"
        return found

    def evaluate(self, model, tokenizer, device=None, progress: bool = False) -> dict:
        raise NotImplementedError

    def metrics(self, result: dict) -> dict[str, float]:
        raise NotImplementedError

    def run(self, model, tokenizer, device=None) -> dict[str, float]:
        return self.metrics(self.evaluate(model, tokenizer, device=device))


def _at_least_one(found: dict, name: str, value) -> None:
    if value is not None and value < 1:
        found[name] = f"must be >= 1 or null (all), got {value}"


@dataclass
class ZeroShot(Evaluator):
    """Zero-shot classification (eval/zeroshot.py): top1, top5 (5 classes or more), mean_per_class_recall."""

    type = "zeroshot"
    what = "zero-shot"
    module = f"{__package__}.zeroshot"
    data_help = "labelled images: a folder or shards"

    classnames: str | None = None  # null: from the data (classnames.txt); "imagenet", or a file
    templates: str | None = None  # "openai", "simple" or a file; null: the data's own, else openai
    class_prompts: str | None = None  # a JSON file, class name -> prompts, used instead of templates
    max_images: int | None = None  # a seeded sample of at most this many images; null = all
    split: str = "test"  # the split folder of a CLIP_benchmark dataset folder
    text_batch_size: int = 1024  # prompts per text forward pass

    def problems(self) -> dict[str, str]:
        found = super().problems()
        _at_least_one(found, "max_images", self.max_images)
        if self.text_batch_size < 1:
            found["text_batch_size"] = f"must be >= 1, got {self.text_batch_size}"
        return found

    def evaluate(self, model, tokenizer, device=None, progress: bool = False, preprocess=None,
                 cache_for=None, cache_dir=None) -> dict:
        """evaluate_zeroshot's result, with the prompts: `templates` (what was used), `prompts` (how
        many), `prompt_check`, and `classifier` ({"cache", "seconds", "path"}). The classifier is
        cached on disk under the export `cache_for` when given (the CLI), else built each time."""
        from limoe.transforms import image_transform

        from .classifier import build_zeroshot_classifier, cached_zeroshot_classifier, check_prompt_tokens
        from .datasets import open_labelled_images
        from .prompts import (class_prompts, load_class_prompts, load_classnames, load_templates,
                              prompts_for_classes, template_text)
        from .zeroshot import default_templates, evaluate_zeroshot, warn_about_prompts

        image_size = model.config.image_size
        preprocess = preprocess if preprocess is not None else image_transform(image_size, train=False)
        classnames = load_classnames(self.classnames) if self.classnames else None
        data = open_labelled_images(self.data, preprocess, image_size, classnames, split=self.split)
        classnames = data.classnames
        if classnames is None:
            raise ValueError(f"{self.data} has no classnames.txt; give --classnames imagenet|FILE")
        if self.class_prompts:
            prompts = prompts_for_classes(classnames, load_class_prompts(self.class_prompts))
            templates = {"class_prompts": str(self.class_prompts)}
        else:
            template_list = load_templates(default_templates(self.templates, data))
            prompts = class_prompts(classnames, template_list)
            name = str(self.templates) if self.templates is not None else ("from the data" if data.templates
                                                                           else "openai")
            templates = {"name": name, "templates": [template_text(t) for t in template_list]}
        num_prompts = sum(len(p) for p in prompts)
        prompt_check = check_prompt_tokens(tokenizer, prompts)
        warn_about_prompts(prompt_check)
        if progress:
            print(f"building the classifier: {len(classnames)} classes, {num_prompts} prompts", file=sys.stderr)
        if cache_for is None:
            t0 = time.perf_counter()
            classifier = build_zeroshot_classifier(model, tokenizer, prompts, batch_size=self.text_batch_size,
                                                   device=device, progress=progress)
            cache = {"cache": "off", "seconds": time.perf_counter() - t0}
        else:
            classifier, cache = cached_zeroshot_classifier(model, tokenizer, prompts, cache_for, cache_dir,
                                                           batch_size=self.text_batch_size, device=device,
                                                           progress=progress)
        result = evaluate_zeroshot(model, preprocess, tokenizer, data, classnames=classnames, classifier=classifier,
                                   batch_size=self.batch_size, max_images=self.max_images,
                                   num_workers=self.workers, device=device, progress=progress)
        result.update(templates=templates, prompts=num_prompts, prompt_check=prompt_check, classifier=cache)
        return result

    def metrics(self, result: dict) -> dict[str, float]:
        return {k: float(result[k]) for k in ("top1", "top5", "mean_per_class_recall") if k in result}


@dataclass
class Retrieval(Evaluator):
    """Image-text retrieval (eval/retrieval.py): image_to_text_R@k and text_to_image_R@k, k = 1, 5, 10."""

    type = "retrieval"
    what = "retrieval"
    module = f"{__package__}.retrieval"
    data_help = "caption shards, or a CLIP_benchmark retrieval folder"

    max_images: int | None = None  # the first this many images; null = all
    split: str = "test"  # the split folder of a CLIP_benchmark dataset folder

    def problems(self) -> dict[str, str]:
        found = super().problems()
        _at_least_one(found, "max_images", self.max_images)
        return found

    def evaluate(self, model, tokenizer, device=None, progress: bool = False) -> dict:
        """{"data", "metrics", "counts", "timing", "skipped"}."""
        from data_pipelines import build_eval_loader

        from .benchmark_sets import benchmark_caption_loader, is_benchmark_set, open_benchmark_set
        from .retrieval import caption_batches, evaluate_retrieval

        if is_benchmark_set(self.data, self.split):
            benchmark_set = open_benchmark_set(self.data, self.split)
            loader = benchmark_caption_loader(benchmark_set, model.config.image_size, self.batch_size, self.workers)
            data = benchmark_set.description()
        else:
            loader = build_eval_loader(self.data, model.config.image_size, self.batch_size, num_workers=self.workers)
            data = {"layout": "webdataset", "path": str(self.data)}
        result = evaluate_retrieval(model, tokenizer, caption_batches(loader), device=device,
                                    max_images=self.max_images, progress=progress)
        return {"data": data, **result, "skipped": dict(loader.skips.counts)}

    def metrics(self, result: dict) -> dict[str, float]:
        return {k: float(v) for k, v in result["metrics"].items()}


@dataclass
class Routing(Evaluator):
    """Routing analysis (eval/routing.py) on image-caption pairs (each image with its first caption):
    per modality the drop rate, mean router entropy, busiest-expert share and fewest experts used."""

    type = "routing"
    what = "routing"
    module = f"{__package__}.routing"
    data_help = "caption shards"
    needs_experts = True

    # Pairs per routing call: capacity is per call, so drop rates depend on it (the training batch per rank
    # gives the drop rates training sees).
    batch_size: int = 128
    max_pairs: int | None = 1024  # null = every pair
    capacity_factor: float | None = None  # null: the model's training capacity factor

    def problems(self) -> dict[str, str]:
        found = super().problems()
        _at_least_one(found, "max_pairs", self.max_pairs)
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            found["capacity_factor"] = f"must be > 0 or null, got {self.capacity_factor}"
        return found

    def evaluate(self, model, tokenizer, device=None, progress: bool = False) -> dict:
        """analyze_routing's result."""
        from data_pipelines import build_eval_loader

        from .routing import analyze_routing, pair_batches

        loader = build_eval_loader(str(self.data), model.config.image_size, self.batch_size,
                                   num_workers=self.workers, tokenizer=tokenizer)
        return analyze_routing(model, pair_batches(loader), capacity_factor=self.capacity_factor,
                               max_pairs=self.max_pairs, device=device, progress=progress)

    def metrics(self, result: dict) -> dict[str, float]:
        return {f"{modality}/{k}": float(v) for modality, summary in result["summary"].items()
                for k, v in summary.items()}


EVALUATORS: dict[str, type[Evaluator]] = {cls.type: cls for cls in (ZeroShot, Retrieval, Routing)}
