"""Evaluators as plug-ins (eval/evaluators.py): each one's run() on the small fixtures of the other
eval tests, equal to the functions it wraps."""
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
