"""Routing analysis: per-layer, per-modality expert usage, drop rates and health numbers."""
import json
import math

import pytest
import torch
from PIL import Image

from conftest import make_tiny_model
from eval.routing import analyze_routing, expert_roles, modality_summary, plot_routing
from limoe.flops import image_tokens


def pair_batches(tokenizer, num_batches=2, batch_size=6, image_size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    captions = ["red heart", "blue fish swimming", "a cat", "green tree and sun", "dog", "yellow star emoji"]
    return [(torch.randn(batch_size, 3, image_size, image_size, generator=g),
             tokenizer([captions[(b + i) % len(captions)] for i in range(batch_size)])) for b in range(num_batches)]


def test_summary_numbers_from_counts():
    stats = {"tokens": 100, "routes": 100, "dropped": 10, "assigned": torch.tensor([70, 20, 6, 4]),
             "kept": torch.tensor([60, 20, 6, 4]), "entropy_sum": torch.tensor(50.0)}
    s = modality_summary(stats, num_experts=4)
    assert s["drop_rate"] == pytest.approx(0.1)
    assert s["mean_entropy"] == pytest.approx(0.5)
    assert s["busiest_expert_share"] == pytest.approx(0.7)
    assert s["experts_used"] == 2  # threshold 100 / (2 * 4) = 12.5 tokens
    assert s["expert_fraction"] == pytest.approx([0.7, 0.2, 0.06, 0.04])


def test_expert_roles_by_modality():
    image = {"tokens": 100, "tokens_per_expert": [50, 50, 0, 0]}
    text = {"tokens": 10, "tokens_per_expert": [0, 5, 5, 0]}
    assert expert_roles(image, text, 4) == ["image", "shared", "text", "unused"]


def test_analysis_counts_every_token_of_both_modalities(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer, moe={"num_experts": 4})
    batches = pair_batches(tiny_tokenizer)
    result = analyze_routing(model, batches)
    assert result["pairs"] == 12 and result["forward_calls"] == 2
    assert [layer["block"] for layer in result["layers"]] == model.config.moe.moe_layers(model.config.depth)
    text_tokens = sum(int((tokens != 0).sum()) for _, tokens in batches)
    for layer in result["layers"]:
        assert layer["image"]["tokens"] == 12 * image_tokens(model.config)  # patches (+ a class token)
        assert layer["text"]["tokens"] == text_tokens  # padding is not routed
        for m in ("image", "text"):
            s = layer[m]
            assert sum(s["tokens_per_expert"]) == s["tokens"]
            assert sum(s["kept_per_expert"]) + s["dropped"] == s["routes"]
            assert 0 <= s["mean_entropy"] <= math.log(4) + 1e-6
            assert 1 <= s["experts_used"] <= 4


def test_drop_rate_follows_the_capacity_factor(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer, moe={"num_experts": 4})
    batches = pair_batches(tiny_tokenizer)
    tight = analyze_routing(model, batches, capacity_factor=0.25)
    roomy = analyze_routing(model, batches, capacity_factor=4.0)
    assert roomy["summary"]["image"]["drop_rate"] == 0.0 and roomy["summary"]["text"]["drop_rate"] == 0.0
    # 0.25 leaves room for at most a quarter of the routes (plus rounding up to a multiple of 4)
    assert tight["summary"]["image"]["drop_rate"] > 0.5
    assert tight["capacity_factor"] == 0.25


def test_default_capacity_factor_is_the_training_one(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer, moe={"num_experts": 4, "capacity_factor": 1.5})
    assert analyze_routing(model, pair_batches(tiny_tokenizer, 1))["capacity_factor"] == 1.5


def test_analysis_restores_eval_routing_and_training_mode(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer, moe={"num_experts": 4})
    model.train()
    analyze_routing(model, pair_batches(tiny_tokenizer, 1), capacity_factor=0.5)
    assert model.training
    assert all(layer.gate.dropless_eval for layer in model.moe_layers())
    assert all(layer.gate.eval_capacity_factor == model.config.moe.eval_capacity_factor
               for layer in model.moe_layers())


def test_max_pairs_limits_the_sample(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer, moe={"num_experts": 4})
    assert analyze_routing(model, pair_batches(tiny_tokenizer, 3), max_pairs=8)["pairs"] == 8


def test_dense_model_has_nothing_to_analyse(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer, name="limoe-nano-dense")
    with pytest.raises(ValueError, match="no MoE layers"):
        analyze_routing(model, pair_batches(tiny_tokenizer, 1))


def test_plot_writes_a_png_and_the_result_is_json(tiny_tokenizer, tmp_path):
    model = make_tiny_model(tiny_tokenizer, moe={"num_experts": 4})
    result = analyze_routing(model, pair_batches(tiny_tokenizer, 1))
    json.dumps(result)  # plain types only
    path = plot_routing(result, tmp_path / "plots" / "routing.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 400


def test_routing_cli_writes_json_and_png(tiny_export, tmp_path, capsys):
    from data_pipelines.testing import write_fake_shards
    from launch.cli import main as limoe_main

    write_fake_shards(tmp_path / "shards", num_samples=10, per_shard=5)
    out = tmp_path / "routing"
    assert limoe_main(["eval", "routing", "--model", str(tiny_export), "--data", str(tmp_path / "shards"),
                       "--out", str(out), "--batch-size", "4", "--num-pairs", "6"]) == 0
    assert "experts" in capsys.readouterr().out
    doc = json.loads((out / "routing.json").read_text())
    assert doc["pairs"] == 6 and doc["batch_size"] == 4
    assert doc["capacity_factor"] == 1.0  # the training capacity factor of the tiny model
    assert (out / "routing.png").stat().st_size > 1000
