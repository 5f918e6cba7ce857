"""Evaluators as plug-ins (eval/evaluators.py): each one's run() on the small fixtures of the other
eval tests, equal to the functions it wraps, and the training hook that loops over the due ones."""
import logging

import pytest

from conftest import make_tiny_model
from eval.evaluators import EVALUATORS, Retrieval, Routing, ZeroShot
from test_eval_retrieval import colour_shards
from test_eval_zeroshot import ColourModel, colour_tokenizer, emoji_layout  # noqa: F401  (a fixture)


def test_the_registry_finds_each_evaluator_by_its_type():
    assert EVALUATORS == {"zeroshot": ZeroShot, "retrieval": Retrieval, "routing": Routing}


def test_zero_shot_run_gives_flat_metrics_equal_to_evaluate_zeroshot(emoji_layout):  # noqa: F811
    import limoe
    from eval.zeroshot import evaluate_zeroshot

    metrics = ZeroShot(data=str(emoji_layout), templates="simple", batch_size=4).run(ColourModel(), colour_tokenizer)
    assert metrics == {"top1": 1.0, "mean_per_class_recall": 1.0}  # 3 classes: no top-5
    direct = evaluate_zeroshot(ColourModel(), limoe.transforms.image_transform(16), colour_tokenizer, emoji_layout,
                               templates="simple", batch_size=4)
    assert metrics == {k: direct[k] for k in metrics}


def test_zero_shot_with_a_sample_of_the_images(emoji_layout):  # noqa: F811
    result = ZeroShot(data=str(emoji_layout), templates="simple", max_images=5).evaluate(ColourModel(),
                                                                                         colour_tokenizer)
    assert result["images"] == 5 and result["prompts"] == 21 and result["classifier"]["cache"] == "off"


def test_retrieval_run_gives_recall_at_k_both_ways(tmp_path):
    metrics = Retrieval(data=str(colour_shards(tmp_path)), batch_size=2).run(ColourModel(), colour_tokenizer)
    assert metrics == {f"{d}_R@{k}": 1.0 for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}


def test_routing_run_gives_the_summary_per_modality_as_the_demo_computed_it(tiny_tokenizer, tmp_path):
    from data_pipelines import build_eval_loader
    from data_pipelines.testing import write_fake_shards
    from eval.routing import analyze_routing, pair_batches

    write_fake_shards(tmp_path / "shards", num_samples=10, per_shard=5)
    model = make_tiny_model(tiny_tokenizer, moe={"num_experts": 4})
    routing = Routing(data=str(tmp_path / "shards"), batch_size=4, max_pairs=6)
    metrics = routing.run(model, tiny_tokenizer)
    assert set(metrics) == {f"{m}/{k}" for m in ("image", "text")
                            for k in ("drop_rate", "mean_entropy", "busiest_expert_share", "min_experts_used")}
    # What launch/demo.py's twemoji_routing did before it became this evaluator: the same numbers.
    loader = build_eval_loader(str(tmp_path / "shards"), model.config.image_size, 4, tokenizer=tiny_tokenizer)
    before = analyze_routing(model, pair_batches(loader), max_pairs=6)
    assert routing.evaluate(model, tiny_tokenizer) == before
    assert metrics["image/drop_rate"] == before["summary"]["image"]["drop_rate"]


def test_an_evaluator_is_due_every_n_steps_and_never_when_off():
    assert [s for s in range(1, 10) if ZeroShot(every=3).due(s)] == [3, 6, 9]
    assert not any(ZeroShot(every=0).due(s) for s in range(1, 10))


def test_the_training_hook_runs_the_due_evaluators_on_the_full_model_under_their_names(
        tiny_tokenizer, emoji_layout, tmp_path, caplog):  # noqa: F811
    from data_pipelines.testing import write_fake_shards
    from launch.eval_hook import due_evaluators, run_evaluators
    from launch.train_config import load_config

    write_fake_shards(tmp_path / "shards", num_samples=6, per_shard=6)
    config = load_config({
        "name": "t", "data": {"train": [{"shards": "unused.tar"}]},
        "eval": {"every": 4, "data": str(emoji_layout), "templates": "simple"},  # the old section
        "evals": {"colours": {"type": "zeroshot", "every": 2, "data": str(emoji_layout), "templates": "simple"},
                  "routing": {"type": "routing", "every": 3, "data": str(tmp_path / "shards"), "max_pairs": 4}}})
    assert [prefix for prefix, _ in due_evaluators(config, 4)] == ["eval", "eval/colours"]
    assert [prefix for prefix, _ in due_evaluators(config, 3)] == ["eval/routing"]
    assert due_evaluators(config, 5) == []

    model = make_tiny_model(tiny_tokenizer, moe={"num_experts": 4}).train()
    with caplog.at_level(logging.INFO, logger="limoe.train"):
        metrics = run_evaluators(model, tiny_tokenizer, due_evaluators(config, 12), 12, ep_size=1, device="cpu")
    assert set(metrics) == {"eval/top1", "eval/mean_per_class_recall",  # the old section's names, as before
                            "eval/colours/top1", "eval/colours/mean_per_class_recall",
                            *(f"eval/routing/{m}/{k}" for m in ("image", "text")
                              for k in ("drop_rate", "mean_entropy", "busiest_expert_share", "min_experts_used"))}
    assert metrics["eval/top1"] == metrics["eval/colours/top1"]  # the same evaluation of the same weights
    assert f"step 12 eval/colours: zero-shot on {emoji_layout}" in caplog.text
    assert model.training  # the training model is not touched: a copy is evaluated


def test_the_hook_says_which_evaluator_cannot_run(monkeypatch):
    from launch.eval_hook import EvalNotAvailable, run_evaluators

    def unavailable(self):
        raise ImportError("no module named eval.retrieval")

    monkeypatch.setattr(Retrieval, "check_available", unavailable)
    with pytest.raises(EvalNotAvailable, match="eval/coco: retrieval evaluation is not available"):
        run_evaluators(None, None, [("eval/coco", Retrieval(every=1, data="x"))], 1, ep_size=1, device="cpu")
