"""The shared LIMoE transformer: interface, dropless inference, gradients, export."""
import json

import pytest
import torch
import torch.nn.functional as F

import limoe
from limoe.config import get_config
from limoe.flops import count_parameters, flops_per_pair, image_tokens
from limoe.losses import LIMoELoss

from conftest import make_tiny_model, tiny_texts


def _batch(tokenizer, n=6, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), tokenizer(tiny_texts(n, seed=seed))


def test_create_model_and_transforms_follows_open_clip_conventions(tiny_tokenizer):
    model, preprocess, tokenizer = limoe.create_model_and_transforms(
        "limoe-nano", tokenizer=tiny_tokenizer, width=32, depth=2, heads=2, mlp_dim=64, embed_dim=16)
    assert tokenizer is tiny_tokenizer
    assert model.config.vocab_size == tiny_tokenizer.vocab_size
    from PIL import Image
    x = preprocess(Image.new("RGBA", (50, 40), (255, 0, 0, 128)))
    assert x.shape == (3, 32, 32)
    model.eval()
    z = model.encode_image(x[None], normalize=True)
    assert z.shape == (1, 16) and torch.allclose(z.norm(dim=-1), torch.ones(1))
    t = model.encode_text(tokenizer(["a red heart"]), normalize=True)
    assert t.shape == (1, 16)


def test_forward_returns_features_losses_and_routing_stats(tiny_model, tiny_tokenizer):
    images, tokens = _batch(tiny_tokenizer)
    out = tiny_model.train()(images, tokens)
    assert out["image_features"].shape == out["text_features"].shape == (6, 16)
    assert out["aux_loss"].ndim == 0 and out["aux_loss"] > 0
    assert set(out["aux_terms"]) >= {"image/importance", "text/global_entropy", "text/zloss"}
    (layer,) = out["routing"]  # depth 2: block 1 is the only MoE block
    # Both modalities went through the one routing call; padding is not counted.
    assert layer["image"]["tokens"].item() == 6 * image_tokens(tiny_model.config)  # 16 patches (+ a class token)
    assert layer["text"]["tokens"].item() == int((tokens != 0).sum())
    assert set(out["drop_rate"]) == {"image", "text"}


def test_aux_loss_is_the_sum_over_moe_layers_and_terms_their_mean(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer, depth=4).train()  # blocks 1 and 3 are MoE
    per_layer = []
    for layer in model.moe_layers():
        layer.register_forward_hook(lambda m, args, out: per_layer.append(out[1]))
    out = model(*_batch(tiny_tokenizer))
    assert len(per_layer) == 2
    assert out["aux_loss"].item() == pytest.approx(sum(a["loss"].item() for a in per_layer), rel=1e-6)
    for name, value in out["aux_terms"].items():
        assert value.item() == pytest.approx(sum(a["terms"][name].item() for a in per_layer) / 2, rel=1e-6)


SYNCING_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::masked_select",
               "aten::unique", "aten::_unique2", "aten::unique_consecutive")


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-checkpointing"])
def test_a_training_step_never_reads_a_tensor_back_to_the_host(tiny_tokenizer, monkeypatch, checkpointing):
    """On a GPU every read-back (item, tolist, nonzero, boolean indexing...) stalls the stream.
    Counted on CPU: the profiler sees the ATen ops that read back; tolist/numpy are patched."""
    from torch.profiler import ProfilerActivity, profile

    model = make_tiny_model(tiny_tokenizer, depth=4).train()
    model.set_grad_checkpointing(checkpointing)
    images, tokens = _batch(tiny_tokenizer)
    assert (tokens == 0).any(), "the batch should have padded text"
    read_backs = []
    for method in ("tolist", "numpy"):
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method, lambda self, *a, _o=original, _m=method, **k: (
            read_backs.append(_m), _o(self, *a, **k))[1])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss = LIMoELoss()(model(images, tokens))["loss"]
        loss.backward()
    syncs = {e.key: e.count for e in prof.key_averages() if e.key in SYNCING_OPS}
    assert syncs == {} and read_backs == []
    assert model.moe_layers()[0].gate.wg.weight.grad is not None


def test_moe_blocks_are_every_other_block_by_default():
    config = get_config("limoe-b-16")
    assert config.moe.moe_layers(config.depth) == [1, 3, 5, 7, 9, 11]
    assert get_config("limoe-b-16", moe={"placement": "last 2"}).moe.moe_layers(12) == [10, 11]
    with pytest.raises(ValueError, match="outside"):
        get_config("limoe-b-16", moe={"placement": "3,12"})


def test_the_demo_preset_has_a_shared_expert_beside_narrow_experts_in_its_last_two_blocks():
    """limoe-nano's layout (docs/quality.md, round 22): 16 experts 256 wide and a 256-wide shared
    expert in blocks 2 and 3 (its FLOPs against the dense twin: the parametrized test below)."""
    config = get_config("limoe-nano")
    assert config.moe.moe_layers(config.depth) == [2, 3]
    model = limoe.LIMoE(config)
    assert [b.is_moe for b in model.blocks] == [False, False, True, True]
    assert [b.shared_mlp is not None for b in model.blocks] == [False, False, True, True]


@pytest.mark.parametrize("preset", ["limoe-ti-16", "limoe-nano"])  # limoe-nano: narrow experts + a shared one
def test_dense_twin_has_same_backbone_and_flops_per_token(preset):
    sparse, dense = get_config(preset), get_config(f"{preset}-dense")
    assert dense.moe.num_experts == 0 and (dense.width, dense.depth) == (sparse.width, sparse.depth)
    f_sparse, f_dense = flops_per_pair(sparse), flops_per_pair(dense)
    router = sum(f_sparse[m + "_parts"]["router"] for m in ("image", "text"))
    assert f_sparse["total"] - router == pytest.approx(f_dense["total"])


def test_active_parameters_count_k_experts_per_moe_layer(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer)
    dense = make_tiny_model(tiny_tokenizer, name="limoe-nano-dense")
    counts, dense_counts = count_parameters(model), count_parameters(dense)
    router = sum(layer.gate.wg.weight.numel() for layer in model.moe_layers())
    assert counts["active_per_token"] == dense_counts["total"] + router
    assert counts["total"] > counts["active_per_token"]


@pytest.mark.parametrize("modality", ["image", "text"])
def test_eval_embedding_does_not_depend_on_the_rest_of_the_batch(tiny_tokenizer, modality):
    # A tight training capacity would drop tokens; eval routing is dropless.
    model = make_tiny_model(tiny_tokenizer, moe={"capacity_factor": 0.5, "eval_capacity_factor": 0.5}).eval()
    images, tokens = _batch(tiny_tokenizer, n=8)
    with torch.no_grad():
        if modality == "image":
            alone, batched = model.encode_image(images[:1]), model.encode_image(images)[:1]
        else:
            alone, batched = model.encode_text(tokens[:1]), model.encode_text(tokens)[:1]
    torch.testing.assert_close(alone, batched, rtol=1e-5, atol=1e-5)


def test_capacity_limited_eval_routing_can_depend_on_the_batch(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer).eval()
    model.set_eval_routing(dropless=False, capacity_factor=0.25)
    images, tokens = _batch(tiny_tokenizer, n=8)
    with torch.no_grad():
        out = model(images, tokens)
    assert out["drop_rate"]["image"] > 0


def test_gradients_reach_router_experts_and_both_embeddings(tiny_model, tiny_tokenizer):
    images, tokens = _batch(tiny_tokenizer, n=8)
    out = tiny_model.train()(images, tokens)
    loss = LIMoELoss()(out)["loss"]
    loss.backward()
    layer = tiny_model.moe_layers()[0]
    assert layer.gate.wg.weight.grad.abs().sum() > 0
    used = out["routing"][0]["image"]["kept"] + out["routing"][0]["text"]["kept"]
    for e, expert in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
        if used[e] > 0:
            assert expert.fc1.weight.grad.abs().sum() > 0, f"expert {e}"
    assert tiny_model.patch_embed.weight.grad.abs().sum() > 0
    assert tiny_model.token_embed.weight.grad.abs().sum() > 0
    assert tiny_model.logit_scale.grad is not None


def test_experts_start_from_different_weights(tiny_model):
    experts = tiny_model.moe_layers()[0].deepspeed_moe.experts.deepspeed_experts
    assert not torch.equal(experts[0].fc1.weight, experts[1].fc1.weight)


@pytest.mark.parametrize("expert_type", ["mlp", "swiglu"])
def test_xavier_init_sets_the_blocks_linears_and_keeps_routers_and_embeddings(tiny_tokenizer, expert_type):
    """init: xavier gives each block matrix (k and v, gate and up each on their own)
    xavier-uniform bounds and zero biases; the routers and embeddings are drawn as before."""
    torch_init = make_tiny_model(tiny_tokenizer, moe={"expert_type": expert_type}, init="torch")
    xavier = make_tiny_model(tiny_tokenizer, moe={"expert_type": expert_type}, init="xavier")
    block = xavier.blocks[1]
    experts = block.mlp.deepspeed_moe.experts.deepspeed_experts
    fused = [block.attn.kv.weight] + ([e.gate_up.weight for e in experts] if expert_type == "swiglu" else [])
    matrices = [block.attn.q.weight, block.attn.out.weight] + [w for f in fused for w in f.chunk(2)]
    matrices += [p for e in experts for n, p in e.named_parameters() if n.endswith("weight") and "gate_up" not in n]
    for w in matrices:
        bound = (6 / sum(w.shape)) ** 0.5
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert all(not b.any() for n, b in xavier.blocks.named_parameters() if n.endswith("bias"))
    assert any(b.any() for n, b in torch_init.blocks.named_parameters() if n.endswith("bias"))
    router = block.mlp.deepspeed_moe.gate.wg.weight
    torch.testing.assert_close(router, torch_init.blocks[1].mlp.deepspeed_moe.gate.wg.weight)
    torch.testing.assert_close(xavier.token_embed.weight, torch_init.token_embed.weight)
    second = "down" if expert_type == "swiglu" else "fc2"  # each expert's second matrix
    assert not torch.equal(getattr(experts[0], second).weight, getattr(experts[1], second).weight)
    with pytest.raises(ValueError, match="init"):
        make_tiny_model(tiny_tokenizer, init="he")
    # The demo's preset and its dense twin start from xavier; the others keep PyTorch's default.
    assert get_config("limoe-nano").init == get_config("limoe-nano-dense").init == "xavier"
    assert get_config("limoe-b-16").init == "torch"


@pytest.mark.parametrize("expert_type", ["mlp", "swiglu"])
def test_scaled_normal_init_scales_down_what_writes_to_the_residual_stream(tiny_tokenizer, expert_type):
    """init: scaled_normal (open_clip's text tower): q / k / v std width^-0.5, an MLP's first
    matrix (2 width)^-0.5, attention output and the MLP's second width^-0.5 (2 depth)^-0.5;
    attention biases zero; routers and embeddings drawn as with torch."""
    torch_init = make_tiny_model(tiny_tokenizer, moe={"expert_type": expert_type}, init="torch")
    model = make_tiny_model(tiny_tokenizer, moe={"expert_type": expert_type}, init="scaled_normal")
    width, depth = model.config.width, model.config.depth
    first, second = ("gate_up", "down") if expert_type == "swiglu" else ("fc1", "fc2")
    block = model.blocks[1]
    experts = block.mlp.deepspeed_moe.experts.deepspeed_experts
    want = [(block.attn.q.weight, width ** -0.5), (block.attn.kv.weight, width ** -0.5),
            (block.attn.out.weight, (width * 2 * depth) ** -0.5)]
    want += [(getattr(e, first).weight, (2 * width) ** -0.5) for e in experts]
    want += [(getattr(e, second).weight, (width * 2 * depth) ** -0.5) for e in experts]
    for w, std in want:
        assert abs(w.std().item() / std - 1) < 0.15, (tuple(w.shape), w.std().item(), std)
    assert not (block.attn.q.bias.any() or block.attn.kv.bias.any() or block.attn.out.bias.any())
    assert not torch.equal(getattr(experts[0], second).weight, getattr(experts[1], second).weight)
    torch.testing.assert_close(block.mlp.deepspeed_moe.gate.wg.weight, torch_init.blocks[1].mlp.deepspeed_moe.gate.wg.weight)
    torch.testing.assert_close(model.token_embed.weight, torch_init.token_embed.weight)


def test_pre_norm_normalises_the_embedded_sequence_of_the_modalities_it_names(tiny_tokenizer):
    """pre_norm: [image] LayerNorms the image's embedded sequence (open_clip's ln_pre) and
    leaves the text's alone; off, the model has no such module. limoe-nano has it on."""
    images, tokens = _batch(tiny_tokenizer)
    plain = make_tiny_model(tiny_tokenizer, pre_norm=[])
    model = make_tiny_model(tiny_tokenizer, pre_norm=["image"])
    assert plain.image_pre_norm is None and plain.text_pre_norm is None and model.text_pre_norm is None
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == 2 * model.config.width
    width = (model.config.width,)  # LayerNorms draw no random numbers: the embeddings match plain's
    torch.testing.assert_close(model._embed_image(images), F.layer_norm(plain._embed_image(images), width))
    torch.testing.assert_close(model._embed_text(tokens), plain._embed_text(tokens))
    out = model.train()(images, tokens)
    LIMoELoss()(out)["loss"].backward()
    assert model.image_pre_norm.weight.grad is not None
    both = make_tiny_model(tiny_tokenizer, pre_norm=["image", "text"])
    torch.testing.assert_close(both._embed_text(tokens), F.layer_norm(plain._embed_text(tokens), width))
    with pytest.raises(ValueError, match="pre_norm"):
        make_tiny_model(tiny_tokenizer, pre_norm=["audio"])
    # The demo's preset and its dense twin have it since round 14; the GPU presets do not.
    assert get_config("limoe-nano").pre_norm == get_config("limoe-nano-dense").pre_norm == ["image"]
    assert get_config("limoe-b-16").pre_norm == []


def test_swiglu_experts_and_grouped_query_attention_run(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer, heads=4, kv_heads=2, moe={"expert_type": "swiglu", "k": 2})
    images, tokens = _batch(tiny_tokenizer)
    out = model.train()(images, tokens)
    LIMoELoss()(out)["loss"].backward()
    assert model.blocks[0].attn.kv.weight.shape[0] == 2 * 2 * 8


def test_modality_specific_parts_are_the_shared_ones_copied_for_the_text(tiny_tokenizer):
    """Text copies of the norms, attention and dense MLPs, started equal to the shared
    ones, give the shared model's outputs; moving a text copy moves the text features only."""
    images, tokens = _batch(tiny_tokenizer)
    shared = make_tiny_model(tiny_tokenizer).eval()
    own = make_tiny_model(tiny_tokenizer, modality_specific=["norms", "attention", "mlp"]).eval()
    dense = [i for i, b in enumerate(own.blocks) if not b.is_moe]
    assert dense == [0] and own.blocks[1].text_mlp is None  # the experts stay shared
    extra = sum(p.numel() for p in own.parameters()) - sum(p.numel() for p in shared.parameters())
    per_block = sum(p.numel() for m in (shared.blocks[0].norm1, shared.blocks[0].norm2, shared.blocks[0].attn)
                    for p in m.parameters())
    dense_mlp = sum(p.numel() for p in shared.blocks[0].mlp.parameters())
    assert extra == per_block * len(own.blocks) + dense_mlp * len(dense)
    assert flops_per_pair(own.config) == flops_per_pair(shared.config)
    state = shared.state_dict()
    for i in range(len(own.blocks)):
        for part in ("norm1", "norm2", "attn") + (("mlp",) if i in dense else ()):
            for key, value in shared.blocks[i].get_submodule(part).state_dict().items():
                state[f"blocks.{i}.text_{part}.{key}"] = value
    own.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(own.encode_text(tokens), shared.encode_text(tokens))
        torch.testing.assert_close(own(images, tokens)["image_features"], shared(images, tokens)["image_features"])
        for move in (lambda: own.blocks[0].text_norm1.weight.mul_(2.0),
                     lambda: own.blocks[1].text_attn.q.weight.mul_(0.5),
                     lambda: [p.mul_(0.5) for p in own.blocks[0].text_mlp.parameters()]):
            before = own.encode_image(images), own.encode_text(tokens)
            move()
            torch.testing.assert_close(own.encode_image(images), before[0])
            assert not torch.allclose(own.encode_text(tokens), before[1])
    own.train()
    LIMoELoss()(own(images, tokens))["loss"].backward()
    assert own.blocks[0].text_norm2.weight.grad is not None and own.blocks[0].text_attn.out.weight.grad is not None
    assert all(p.grad is not None for p in own.blocks[0].text_mlp.parameters())
    only_norms = make_tiny_model(tiny_tokenizer, modality_specific="norms").blocks[0]
    assert only_norms.text_attn is None and only_norms.text_mlp is None
    with pytest.raises(ValueError, match="modality_specific"):
        make_tiny_model(tiny_tokenizer, modality_specific=["experts"])


def test_fine_grained_experts_spend_one_full_experts_flops(tiny_tokenizer):
    """8 experts of half width with k = 2 against 4 full-width experts with k = 1: the
    same expert weight matrices and, but for the router, the same FLOPs, counted and analytic."""
    from limoe.flops import measured_flops_per_pair

    full = make_tiny_model(tiny_tokenizer, moe={"num_experts": 4})
    fine = make_tiny_model(tiny_tokenizer, moe={"num_experts": 8, "k": 2, "expert_mlp_dim": 32})
    assert fine.config.expert_hidden == 32 and full.config.expert_hidden == 64
    layer = fine.moe_layers()[0].deepspeed_moe.experts.deepspeed_experts[0]
    assert layer.fc1.weight.shape == (32, 32)
    dense_blocks = [b for b in fine.blocks if not b.is_moe]
    assert dense_blocks and all(b.mlp.fc1.weight.shape == (64, 32) for b in dense_blocks)

    def expert_weights(model):
        return sum(p.numel() for layer in model.moe_layers() for p in layer.experts.parameters() if p.dim() == 2)

    assert expert_weights(fine) == expert_weights(full)
    f_full, f_fine = flops_per_pair(full.config), flops_per_pair(fine.config)
    for m in ("image", "text"):
        assert f_fine[m + "_parts"]["mlp"] == f_full[m + "_parts"]["mlp"]
        assert f_fine[m + "_parts"]["router"] == 2 * f_full[m + "_parts"]["router"]
    assert measured_flops_per_pair(fine) == pytest.approx(measured_flops_per_pair(full), rel=0.02)
    images, tokens = _batch(tiny_tokenizer)
    LIMoELoss()(fine.train()(images, tokens))["loss"].backward()
    with pytest.raises(ValueError, match="expert_mlp_dim"):
        make_tiny_model(tiny_tokenizer, moe={"expert_mlp_dim": -1})


def test_a_shared_expert_adds_a_dense_mlp_every_token_passes_through(tiny_tokenizer):
    """A half-width shared expert beside 8 half-width experts at k = 1 spends what 4 full
    experts at k = 1 spend (counted and analytic); it is a dense parameter (not an expert's:
    every rank holds it whole), and its output adds to the experts' for every token."""
    from limoe.flops import count_parameters, measured_flops_per_pair

    full = make_tiny_model(tiny_tokenizer, moe={"num_experts": 4})
    shared = make_tiny_model(tiny_tokenizer, moe={"num_experts": 8, "expert_mlp_dim": 32,
                                                  "shared_expert_mlp_dim": 32})
    moe_blocks = [b for b in shared.blocks if b.is_moe]
    assert moe_blocks and all(b.shared_mlp.fc1.weight.shape == (32, 32) for b in moe_blocks)
    assert all(b.shared_mlp is None for b in shared.blocks if not b.is_moe)
    assert all(b.shared_mlp is None for b in full.blocks)
    f_full, f_shared = flops_per_pair(full.config), flops_per_pair(shared.config)
    for m in ("image", "text"):
        assert f_shared[m + "_parts"]["mlp"] == f_full[m + "_parts"]["mlp"]
    assert measured_flops_per_pair(shared) == pytest.approx(measured_flops_per_pair(full), rel=0.02)
    counts = count_parameters(shared)
    shared_params = sum(p.numel() for b in moe_blocks for p in b.shared_mlp.parameters())
    per_expert = sum(p.numel() for p in moe_blocks[0].mlp.experts.deepspeed_experts[0].parameters())
    assert counts["experts"] == len(moe_blocks) * 8 * per_expert  # the shared MLP is not an expert
    assert counts["active_per_token"] == counts["total"] - len(moe_blocks) * 7 * per_expert
    assert shared_params == len(moe_blocks) * per_expert

    # The block's output is the residual after attention plus the routed and the shared outputs.
    block = moe_blocks[0]
    seen = {}
    block.mlp.register_forward_hook(lambda mod, inp, out: seen.update(h=inp[0], routed=out[0]))
    block.register_forward_hook(lambda mod, inp, out: seen.update(seqs=inp[0], out=out[0]))
    images, tokens = _batch(tiny_tokenizer)
    with torch.no_grad():
        shared.eval().encode_image(images)
        (x,), (y,) = seen["seqs"], seen["out"]
        mid = (x + block.attn(block.norm1(x), causal=False)).reshape(-1, x.shape[-1])
        assert torch.allclose(y.reshape(mid.shape), mid + seen["routed"] + block.shared_mlp(seen["h"]), atol=1e-5)
    LIMoELoss()(shared.train()(images, tokens))["loss"].backward()
    assert all(p.grad is not None for b in moe_blocks for p in b.shared_mlp.parameters())
    with pytest.raises(ValueError, match="shared_expert_mlp_dim"):
        make_tiny_model(tiny_tokenizer, moe={"shared_expert_mlp_dim": -1})



def hidden_and_output(mlp, x):
    """An MLP's hidden activations of x (where dropout applies) and its output Linear, by hand."""
    if hasattr(mlp, "fc1"):
        return F.gelu(mlp.fc1(x)), mlp.fc2
    gate, up = mlp.gate_up(x).chunk(2, dim=-1)
    return F.silu(gate) * up, mlp.down


@pytest.mark.parametrize("kind", ["mlp", "swiglu"])
def test_mlp_dropout_drops_hidden_activations_in_training_only(kind):
    from limoe.layers import make_mlp

    torch.manual_seed(0)
    mlp, plain = make_mlp(kind, 8, 16, dropout=0.5), make_mlp(kind, 8, 16)
    plain.load_state_dict(mlp.state_dict())
    x = torch.randn(5, 8)
    torch.testing.assert_close(mlp.eval()(x), plain.eval()(x))
    mlp.train()
    torch.manual_seed(1)
    y = mlp(x)
    hidden, out = hidden_and_output(mlp, x)
    torch.manual_seed(1)
    torch.testing.assert_close(y, out(F.dropout(hidden, 0.5, True)))
    assert not torch.allclose(y, plain(x))


@pytest.mark.parametrize("kind", ["mlp", "swiglu"])
def test_grouped_experts_drop_the_same_hidden_activations(kind):
    """The batched path (CUDA's) drops what each expert's own forward would, given one draw
    over the stacked [E, N, hidden] activations; in eval it equals the per-expert path."""
    from limoe.layers import make_mlp

    torch.manual_seed(0)
    experts = [make_mlp(kind, 8, 16, dropout=0.3) for _ in range(3)]
    x = torch.randn(3, 4, 8)
    per_expert = torch.stack([e.eval()(xe) for e, xe in zip(experts, x)])
    torch.testing.assert_close(type(experts[0]).grouped_forward(experts, x), per_expert)
    for e in experts:
        e.train()
    torch.manual_seed(2)
    y = type(experts[0]).grouped_forward(experts, x)
    hidden, outs = zip(*(hidden_and_output(e, xe) for e, xe in zip(experts, x)))
    hidden = torch.stack(hidden)
    torch.manual_seed(2)
    dropped = F.dropout(hidden, 0.3, True)
    torch.testing.assert_close(y, torch.stack([out(h) for out, h in zip(outs, dropped)]))


def test_model_dropout_rates_reach_dense_mlps_and_experts_and_leave_eval_alone(tiny_tokenizer):
    images, tokens = _batch(tiny_tokenizer)
    plain = make_tiny_model(tiny_tokenizer)
    both = make_tiny_model(tiny_tokenizer, mlp_dropout=0.1)
    switch = make_tiny_model(tiny_tokenizer, mlp_dropout=0.1, moe={"expert_dropout": 0.4})

    def rates(model):
        dense = {b.mlp.dropout for b in model.blocks if not b.is_moe}
        experts = {e.dropout for layer in model.moe_layers() for e in layer.experts.deepspeed_experts}
        return dense, experts

    assert rates(plain) == ({0.0}, {0.0})
    assert rates(both) == ({0.1}, {0.1})  # expert_dropout None: the experts follow mlp_dropout
    assert rates(switch) == ({0.1}, {0.4})
    # The same seed draws the same weights; eval (and so every export) is unchanged.
    for model in (both, switch):
        with torch.no_grad():
            for a, b in zip(plain.eval()(images, tokens).values(), model.eval()(images, tokens).values()):
                if isinstance(a, torch.Tensor):
                    torch.testing.assert_close(a, b)
    with torch.no_grad():
        first, second = (switch.train()(images, tokens)["image_features"] for _ in range(2))
    assert not torch.allclose(first, second)
    for bad in ({"mlp_dropout": 1.0}, {"mlp_dropout": -0.1}, {"moe": {"expert_dropout": 1.5}}):
        with pytest.raises(ValueError, match="dropout"):
            make_tiny_model(tiny_tokenizer, **bad)

def test_grad_checkpointing_gives_same_gradients(tiny_tokenizer):
    images, tokens = _batch(tiny_tokenizer)
    grads = []
    for ckpt in (False, True):
        # No router noise (so no V-MoE load loss): both runs route alike.
        no_noise = {"noise_std": 0.0, "image": {"load": 0.0}, "text": {"load": 0.0}}
        model = make_tiny_model(tiny_tokenizer, moe=no_noise).train()
        model.set_grad_checkpointing(ckpt)
        LIMoELoss()(model(images, tokens))["loss"].backward()
        grads.append(model.moe_layers()[0].gate.wg.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_grad_checkpointing_recomputes_the_same_dropout_and_router_noise(tiny_tokenizer):
    """Recomputing a block in backward draws the dropout masks and router noise it drew in the
    forward pass (the checkpoint restores the RNG state), so the gradients are unchanged."""
    images, tokens = _batch(tiny_tokenizer)
    grads = []
    for ckpt in (False, True):
        model = make_tiny_model(tiny_tokenizer, mlp_dropout=0.3).train()
        model.set_grad_checkpointing(ckpt)
        torch.manual_seed(5)
        LIMoELoss()(model(images, tokens))["loss"].backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_logit_scale_is_clamped(tiny_model):
    with torch.no_grad():
        tiny_model.logit_scale.fill_(10.0)
    tiny_model.clamp_logit_scale()
    assert tiny_model.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-5)


def test_bad_config_values_name_the_field():
    with pytest.raises(ValueError, match="kv_heads"):
        get_config("limoe-nano", kv_heads=3)
    with pytest.raises(ValueError, match="unknown model config keys"):
        limoe.LIMoEConfig.from_dict({"widht": 3})
    with pytest.raises(ValueError, match="unknown model"):
        get_config("limoe-z-99")


# -- export / load ---------------------------------------------------------------------


def test_export_round_trip_gives_identical_outputs(tmp_path, tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer).eval()
    images, tokens = _batch(tiny_tokenizer)
    limoe.save(model, tiny_tokenizer, tmp_path / "export")
    loaded, preprocess, tokenizer = limoe.load(tmp_path / "export")
    assert not loaded.training
    assert torch.equal(tokenizer(["red cat"]), tiny_tokenizer(["red cat"]))
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images), rtol=0, atol=0)
        torch.testing.assert_close(loaded.encode_text(tokens), model.encode_text(tokens), rtol=0, atol=0)


def test_export_holds_no_pickle(tiny_export):
    names = sorted(p.name for p in tiny_export.iterdir())
    assert "model.safetensors" in names and "config.json" in names and "tokenizer.model" in names
    assert not any(n.endswith((".pt", ".pth", ".bin", ".pkl")) for n in names)


def test_truncated_weights_give_an_error_naming_the_file(tiny_export):
    weights = tiny_export / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(limoe.ExportError, match="model.safetensors.*truncated"):
        limoe.load(tiny_export)


def test_missing_files_are_named(tiny_export):
    (tiny_export / "tokenizer.model").unlink()
    with pytest.raises(limoe.ExportError, match="tokenizer.model: missing"):
        limoe.load(tiny_export)
    (tiny_export / "config.json").unlink()
    with pytest.raises(limoe.ExportError, match="config.json: missing"):
        limoe.load(tiny_export)


def test_config_that_does_not_match_the_weights_is_reported(tiny_export):
    path = tiny_export / "config.json"
    doc = json.loads(path.read_text())
    doc["model"]["embed_dim"] = 24
    path.write_text(json.dumps(doc))
    with pytest.raises(limoe.ExportError, match="shape"):
        limoe.load(tiny_export)
    path.write_text("{not json")
    with pytest.raises(limoe.ExportError, match="config.json: not a valid"):
        limoe.load(tiny_export)


def test_expert_sharding_round_trips(tiny_model):
    full = tiny_model.state_dict()
    shards = [limoe.checkpoint.shard_experts(full, r, 2, 4) for r in range(2)]
    assert len([k for k in shards[0] if "deepspeed_experts" in k]) * 2 == len(
        [k for k in full if "deepspeed_experts" in k])
    back = limoe.checkpoint.gather_experts(shards)
    assert set(back) == set(full) and all(torch.equal(back[k], full[k]) for k in full)
