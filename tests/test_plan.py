"""`limoe plan`: parameter counts, ZeRO partitioning, activation memory, all-to-all bytes,
FLOPs and what to change, on cases small enough to compute by hand."""
from __future__ import annotations

import json
import math

import pytest
import torch

import limoe
from launch.cli import main as cli_main
from launch.plan import (Setup, all_to_all_bytes, fits, flops_plan, memory_plan, model_state_bytes, parameter_counts,
                         parse_size, plan, reduce_bucket_bytes, setup_from_config)
from launch.train_config import load_config
from limoe.config import LIMoEConfig, MoEConfig
from limoe.flops import activation_bytes, flops_per_pair
from limoe.losses import LIMoELoss

# width 8, 2 blocks (block 1 is MoE with 2 experts), 2x2 patches of an 8 px image, 4 text tokens.
HAND = dict(name="hand", width=8, depth=2, heads=2, mlp_dim=16, image_size=8, patch_size=4, vocab_size=10,
            context_length=4, embed_dim=4, moe=MoEConfig(num_experts=2, placement="every 2"))


def hand_setup(**changes) -> Setup:
    values = dict(model=LIMoEConfig(**HAND), nonexpert_params=1000, expert_params=800, batch=2, accum_freq=1,
                  num_procs=4, num_nodes=1, ep_size=2, zero_stage=0, precision="bf16", grad_checkpointing=False,
                  device="cuda", reduce_bucket_size=100, overlap_comm=False, contiguous_gradients=True)
    values.update(changes)
    return Setup(**values)


def test_parameter_count_of_a_config_counted_by_hand():
    patch_embed = 3 * 4 * 4 * 8 + 8
    positions_and_embeddings = 4 * 8 + 10 * 8 + 4 * 8
    attention_block = 2 * 8 + (8 * 8 + 8) + (8 * 16 + 16) + (8 * 8 + 8) + 2 * 8  # norms, q, kv, out
    mlp = (8 * 16 + 16) + (16 * 8 + 8)
    router = 2 * 8  # no bias
    map_head = 8 + (3 * 8 * 8 + 3 * 8) + (8 * 8 + 8) + 2 * 8 + mlp  # probe, in/out projections, norm, MLP
    heads = 2 * 2 * 8 + map_head + 2 * 8 * 4 + 1  # final norms, MAP, projections, logit_scale
    total = patch_embed + positions_and_embeddings + 2 * attention_block + mlp + router + 2 * mlp + heads
    counts = parameter_counts(LIMoEConfig(**HAND))
    assert counts["total"] == total == 2721
    assert counts["experts"] == 2 * mlp


def test_zero_1_partitions_the_optimizer_states_and_zero_2_also_the_gradients():
    # 1000 non-expert parameters over 4 ranks; 800 expert parameters, 400 per rank (ep_size 2),
    # partitioned over their expert-data-parallel group of 4 / 2 = 2 ranks.
    by_stage = {stage: model_state_bytes(hand_setup(zero_stage=stage)) for stage in (0, 1, 2)}
    for states in by_stage.values():
        assert states["nonexpert"]["weights"] == 1000 * 2 and states["expert"]["weights"] == 400 * 2
    assert by_stage[0]["nonexpert"]["optimizer"] == 1000 * 12 and by_stage[0]["expert"]["optimizer"] == 400 * 12
    assert by_stage[1]["nonexpert"]["optimizer"] == 250 * 12 and by_stage[1]["expert"]["optimizer"] == 200 * 12
    assert by_stage[1]["nonexpert"]["gradients"] == 1000 * 2 and by_stage[1]["expert"]["gradients"] == 400 * 2
    assert by_stage[2]["nonexpert"]["gradients"] == 250 * 2 and by_stage[2]["expert"]["gradients"] == 200 * 2
    assert by_stage[2]["expert"]["partition_over"] == 2 and by_stage[2]["nonexpert"]["partition_over"] == 4


def test_fp32_zero_0_has_no_master_copy_but_zero_1_keeps_deepspeeds_fp32_partition():
    zero0 = model_state_bytes(hand_setup(precision="fp32", zero_stage=0))
    zero1 = model_state_bytes(hand_setup(precision="fp32", zero_stage=1))
    assert zero0["nonexpert"]["optimizer"] == 1000 * 8 and zero0["nonexpert"]["weights"] == 1000 * 4
    assert zero1["nonexpert"]["optimizer"] == 250 * 12


def test_more_ep_size_holds_fewer_experts_per_rank():
    assert model_state_bytes(hand_setup(ep_size=1))["expert"]["weights"] == 800 * 2
    assert model_state_bytes(hand_setup(ep_size=4))["expert"]["weights"] == 200 * 2


def test_reduce_buckets_follow_the_ds_config_and_a_cpu_touches_only_the_gradients():
    assert reduce_bucket_bytes(hand_setup(zero_stage=0)) == (0, 0)
    assert reduce_bucket_bytes(hand_setup(zero_stage=1, reduce_bucket_size=10_000)) == (20_000, 1400 * 2)
    assert reduce_bucket_bytes(hand_setup(zero_stage=2, overlap_comm=True, reduce_bucket_size=100)) == (400, 400)
    assert reduce_bucket_bytes(hand_setup(zero_stage=1, contiguous_gradients=False)) == (0, 0)


def test_the_peak_is_the_largest_of_backward_reduction_and_step():
    memory = memory_plan(hand_setup(zero_stage=1))
    assert memory["peak"] == max(memory["phases"].values())
    base = memory["weights"] + memory["optimizer"]
    assert memory["phases"]["backward"] == base + memory["reduce_buckets"] + memory["activations"]["peak"]
    assert memory["phases"]["step"] == base + memory["gradients"] + memory["step_workspace"]


def test_all_to_all_sends_the_other_ranks_share_of_the_buffer_four_times_per_layer():
    s = hand_setup(ep_size=2)
    tokens = 2 * (4 + 4)  # batch 2, 4 patches + 4 text tokens
    capacity = max(4, 4 * math.ceil(math.ceil(tokens / 2) / 4))
    buffer = 2 * capacity * 8 * 2  # [E, C, d] in bf16
    a2a = all_to_all_bytes(s)
    assert a2a["buffer"] == [2, capacity, 8] and a2a["per_transfer"] == buffer // 2
    assert a2a["per_step"] == 4 * buffer // 2  # one MoE layer: dispatch + combine, forward + backward
    assert all_to_all_bytes(s.replace(grad_checkpointing=True))["per_step"] == 6 * buffer // 2
    assert all_to_all_bytes(s.replace(accum_freq=3))["per_step"] == 3 * 4 * buffer // 2
    assert all_to_all_bytes(s.replace(ep_size=1, num_procs=4))["per_step"] == 0


def test_flops_per_step_are_three_forwards_and_checkpointing_adds_one():
    s = hand_setup(batch=5, accum_freq=2)
    forward = flops_per_pair(s.model)["total"] * 5 * 2
    f = flops_plan(s, peak_tflops=100.0, utilisation=0.5)
    assert f["executed"] == pytest.approx(3 * forward)
    assert f["step_time_s"] == pytest.approx(3 * forward / (0.5 * 100e12))
    ckpt = flops_plan(s.replace(grad_checkpointing=True), peak_tflops=100.0, utilisation=0.5)
    assert ckpt["executed"] == pytest.approx(4 * forward) and ckpt["model_flops_utilisation"] == pytest.approx(0.375)
    assert flops_plan(s, peak_tflops=None, utilisation=0.5)["step_time_s"] is None


def test_memory_sizes_parse_decimal_and_binary_units():
    assert parse_size("80GB") == 80 * 10 ** 9 and parse_size("24GiB") == 24 * 2 ** 30
    assert parse_size("512 mib") == 512 * 2 ** 20
    with pytest.raises(ValueError, match="not a memory size"):
        parse_size("lots")


# -- activations: the count against what torch really allocates ----------------------------------


def allocated_during(fn) -> tuple[int, int]:
    """(bytes still allocated after fn, peak) by torch's CPU allocator, from the profiler's events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return live, peak


ACTIVATION_MODEL = dict(width=32, depth=4, heads=2, mlp_dim=128, image_size=16, patch_size=4, vocab_size=50,
                        context_length=8, embed_dim=16)


@pytest.mark.parametrize("variant", ["per-expert loop", "batched experts", "checkpointing", "shared expert"])
def test_kept_activations_match_what_torch_allocates(variant):
    # Capacity factor 4: no route is dropped; every variant runs its experts on all E x C buffer rows.
    shared = 256 if variant == "shared expert" else 0  # its activations: about a fifth of the kept bytes
    config = LIMoEConfig(**ACTIVATION_MODEL, moe=MoEConfig(num_experts=4, capacity_factor=4.0,
                                                         shared_expert_mlp_dim=shared))
    torch.manual_seed(0)
    model = limoe.LIMoE(config).train()
    batched = variant == "batched experts"
    for layer in model.moe_layers():
        layer.deepspeed_moe.experts.batched = batched
    model.set_grad_checkpointing(variant == "checkpointing")
    batch, kept = 6, []

    def forward():
        images = torch.randn(batch, 3, 16, 16)
        tokens = torch.randint(3, 50, (batch, 8))  # full-length texts: no padding
        kept.append(LIMoELoss("clip")(model(images, tokens)))  # inputs and the graph stay alive

    measured, _ = allocated_during(forward)
    predicted = activation_bytes(config, batch, batched_experts=batched,
                                 grad_checkpointing=variant == "checkpointing")["kept"]
    assert predicted == pytest.approx(measured, rel=0.05)


def test_with_checkpointing_nothing_outlives_the_backward_but_the_gradients():
    # DeepSpeed's MOELayer keeps its last aux loss on the module (l_aux); checkpointing's
    # recomputation stops early, so that was a graph nothing backwards through, alive until the
    # next forward (6.1 GB of l16-multinode's then 10.7 GB planned peak per GPU). limoe's layer returns it.
    config = LIMoEConfig(**ACTIVATION_MODEL, moe=MoEConfig(num_experts=4, capacity_factor=4.0))
    torch.manual_seed(0)
    model = limoe.LIMoE(config).train()
    model.set_grad_checkpointing(True)
    batch = 6
    images, tokens = torch.randn(batch, 3, 16, 16), torch.randint(3, 50, (batch, 8))
    grads = 4 * sum(p.numel() for p in model.parameters())

    def train_step():
        LIMoELoss("clip")(model(images, tokens))["loss"].backward()

    after_backward, _ = allocated_during(train_step)
    held = activation_bytes(config, batch, grad_checkpointing=True)["held_after_backward"]
    assert held == 0 and after_backward - grads < 0.01 * grads


def test_a_training_step_peaks_near_the_plan():
    # One process, torch AdamW on fp32 weights: DeepSpeed's ZeRO 0 on one rank.
    config = LIMoEConfig(**ACTIVATION_MODEL, moe=MoEConfig(num_experts=4))
    batch = 16
    setup = Setup(model=config, **{k: v for k, v in parameter_split(config).items()}, batch=batch, accum_freq=1,
                  num_procs=1, num_nodes=1, ep_size=1, zero_stage=0, precision="fp32", grad_checkpointing=False,
                  device="cpu")
    state = {}

    def build_and_train():
        torch.manual_seed(0)
        model = limoe.LIMoE(config).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        images, tokens = torch.randn(batch, 3, 16, 16), torch.randint(3, 50, (batch, 8))
        for _ in range(2):  # the first step creates AdamW's states
            optimizer.zero_grad(set_to_none=True)
            LIMoELoss("clip")(model(images, tokens))["loss"].backward()
            optimizer.step()
        state["model"] = model

    _, peak = allocated_during(build_and_train)
    assert memory_plan(setup)["peak"] == pytest.approx(peak, rel=0.25)


def parameter_split(config) -> dict:
    counts = parameter_counts(config)
    return {"nonexpert_params": counts["total"] - counts["experts"], "expert_params": counts["experts"]}


# -- the plan of a config, and what to change ------------------------------------------------------


def test_plan_of_b16_8gpu_shards_one_expert_per_gpu_and_fits_80gb():
    config = load_config("b16-8gpu")
    result = plan(config, parse_size("80GB"))
    assert result["fits"] and not result["suggestions"]
    counts = parameter_counts(config.fit_tokenizer(config.data.tokenizer_vocab_size))
    assert result["memory"]["states"]["expert"]["parameters"] == counts["experts"] // 8
    assert result["all_to_all"]["per_step"] > 0 and result["flops"]["step_time_s"] > 0


def test_a_config_that_does_not_fit_gets_changes_with_their_numbers():
    config = load_config("b16-8gpu", [("train.batch_size", 2048)])
    result = plan(config, parse_size("80GB"))
    assert not result["fits"]
    changes = {tuple(sorted(s["set"])): s for s in result["suggestions"]}
    assert ("parallel.zero_stage",) in changes and ("train.grad_checkpointing",) in changes
    smaller = changes[("train.accum_freq", "train.batch_size")]
    assert smaller["fits"] and smaller["set"]["train.batch_size"] * smaller["set"]["train.accum_freq"] == 2048
    assert changes[("train.grad_checkpointing",)]["peak"] < result["memory"]["peak"]
    # Each suggestion's numbers are the plan of the changed config.
    batch = smaller["set"]["train.batch_size"]
    changed = load_config("b16-8gpu", [("train.batch_size", batch), ("train.accum_freq", 2048 // batch)])
    assert plan(changed, parse_size("80GB"))["memory"]["peak"] == smaller["peak"]


def test_a_larger_ep_size_is_suggested_where_the_experts_and_ranks_allow_it():
    config = load_config("b16-8gpu", [("parallel.ep_size", 2), ("train.batch_size", 2048)])
    result = plan(config, parse_size("80GB"))
    ep = [s for s in result["suggestions"] if "parallel.ep_size" in s["set"]]
    assert [s["set"] for s in ep] == [{"parallel.ep_size": 4}]
    assert ep[0]["peak"] < result["memory"]["peak"]  # a quarter of the experts' weights and states instead of half


def test_cpu_ranks_share_the_nodes_ram():
    setup, _ = setup_from_config(load_config("cpu-demo"))
    peak = memory_plan(setup)["peak_resident"]
    assert fits(setup, int(2 * peak / 0.9) + 1000)[0]
    assert not fits(setup, int(1.5 * peak / 0.9))[0]  # enough for one rank, not for the node's two


def test_cli_prints_the_plan_and_json(capsys):
    assert cli_main(["plan", "l16-multinode", "--device-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "fits" in out and "ZeRO 2, checkpointing on" in out and "all-to-all per step" in out
    assert cli_main(["plan", "cpu-demo", "--device-memory", "24GB", "--json", "--set", "train.batch_size=8"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["setup"]["batch"] == 8 and data["memory"]["peak"] > 0
    # A shared expert's activations get their own entry; without one there is none.
    for shared in (0, 256):
        assert cli_main(["plan", "cpu-demo", "--set", f"model.moe.shared_expert_mlp_dim={shared}"]) == 0
        assert ("shared expert" in capsys.readouterr().out) == bool(shared)


def test_cli_names_a_bad_argument_in_one_line(capsys):
    assert cli_main(["plan", "cpu-demo", "--device-memory", "lots"]) == 2
    assert cli_main(["plan", "cpu-demo", "--set", "parallel.ep_size=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "not a memory size" in err[0] and "parallel.ep_size" in err[1]
