"""The LIMoE layer's gather-only token dispatch gives the same outputs and
gradients as obviously-correct references: a per-token loop over the routes,
DeepSpeed's stock `_sparse_encode` / `_sparse_decode`, and, across two gloo
processes, the same layer with its experts split over an expert-parallel group
(launch/expert_parallel.py).
"""
import dataclasses
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import _route_slots, _sparse_decode, _sparse_encode

from launch.distributed import free_port
from launch.expert_parallel import as_deepspeed_moe
from limoe.checkpoint import shard_experts
from limoe.config import MoEConfig
from limoe.layers import MLP, SwiGLU
from limoe.moe import CombineExperts, DispatchTokens, LIMoELayer, SlotMap
from limoe.routing import IGNORE, IMAGE, TEXT, TokenGroups

WIDTH, HIDDEN = 16, 32


def make_layer(seed=0, expert=MLP, ep_size=1, batched=None, **moe):
    torch.manual_seed(seed)
    # No router noise: the routes are a function of the input, so reruns route alike.
    config = MoEConfig(**{"num_experts": 4, "noise_std": 0.0, **moe})
    layer = LIMoELayer(WIDTH, expert(WIDTH, HIDDEN), config, ep_size=ep_size)
    layer.deepspeed_moe.experts.batched = batched  # None: batched matmuls on CUDA only
    return layer


def make_tokens(num_tokens=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, WIDTH, generator=g)
    modality = torch.full((num_tokens,), IMAGE)
    modality[num_tokens // 2:] = TEXT
    modality[-3:] = IGNORE  # text padding
    return x, modality


def reference_forward(layer, x, modality):
    """Per-token loop: y[t] = sum over t's kept routes of gate * expert(x[t])."""
    routes, _ = layer.gate(x, TokenGroups.from_modality(modality))
    expert, gate = routes.expert, routes.gate
    experts = layer.deepspeed_moe.experts.deepspeed_experts
    rows = []
    for t in range(x.shape[0]):
        y = x.new_zeros(x.shape[1])
        for choice in range(expert.shape[0]):
            e = int(expert[choice, t])
            if e >= 0:
                y = y + gate[choice, t] * experts[e](x[t:t + 1])[0]
        rows.append(y)
    return torch.stack(rows), expert


def outputs_and_grads(run, layer, x, modality):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = run(layer, x, modality)
    # A fixed random cotangent so every output element matters.
    cotangent = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    (y * cotangent).sum().backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), x.grad.clone(), grads


def assert_same_as_reference(layer, x, modality):
    layer.train()
    y, gx, grads = outputs_and_grads(lambda m, a, b: m(a, b)[0], layer, x, modality)
    y_ref, gx_ref, grads_ref = outputs_and_grads(lambda m, a, b: reference_forward(m, a, b)[0],
                                                 layer, x, modality)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-6, msg=name)


# The experts run one after another on CPU and as batched matmuls on CUDA; both
# ways are checked here (batched=True forces the CUDA way on CPU).
both_expert_modes = pytest.mark.parametrize("batched", [False, True], ids=["loop", "batched"])


@both_expert_modes
def test_top1_with_dropped_tokens_matches_per_token_loop(batched):
    layer = make_layer(capacity_factor=0.5, batched=batched)
    x, modality = make_tokens()
    _, expert = reference_forward(layer, x, modality)
    assert (expert[:, modality != IGNORE] < 0).any(), "the capacity should drop some tokens"
    assert_same_as_reference(layer, x, modality)


@both_expert_modes
def test_top2_with_dropped_second_choices_matches_per_token_loop(batched):
    layer = make_layer(k=2, capacity_factor=0.75, batched=batched)
    x, modality = make_tokens()
    _, expert = reference_forward(layer, x, modality)
    assert (expert[1, modality != IGNORE] < 0).any() and (expert[1] >= 0).any()
    assert_same_as_reference(layer, x, modality)


@both_expert_modes
def test_swiglu_experts_match_per_token_loop(batched):
    layer = make_layer(expert=SwiGLU, capacity_factor=0.5, batched=batched)
    assert_same_as_reference(layer, *make_tokens())


def test_dropless_eval_matches_per_token_loop():
    layer = make_layer().eval()
    x, modality = make_tokens()
    with torch.no_grad():
        y, _ = layer(x, modality)
        y_ref, expert = reference_forward(layer, x, modality)
    assert (expert[:, modality != IGNORE] >= 0).all()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)


@both_expert_modes
def test_dropless_training_keeps_every_route_and_matches_per_token_loop(batched):
    """moe.train_dropless: in training no route is dropped, even when the routing is skewed
    past any capacity, and outputs and gradients are the per-token loop's."""
    layer = make_layer(batched=batched, train_dropless=True)
    x, modality = make_tokens()
    towards = F.normalize(torch.ones(WIDTH), dim=0)
    x = x + 2 * towards  # most tokens now prefer expert 0
    with torch.no_grad():
        layer.gate.wg.weight[0] = 2 * towards
    layer.train()
    routes, aux = layer.gate(x, TokenGroups.from_modality(modality))
    assert routes.capacity is None and (routes.expert[:, modality != IGNORE] >= 0).all()
    assert int(routes.counts.max()) > x.shape[0] // 4 * 2, "expert 0 should take more than twice its share"
    assert all(int(aux["stats"][m]["dropped"]) == 0 for m in ("image", "text"))
    assert_same_as_reference(layer, x, modality)
    capped = make_layer(batched=batched)
    capped.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert (capped.train().gate(x, TokenGroups.from_modality(modality))[0].expert[:, modality != IGNORE] < 0).any()
    with pytest.raises(ValueError, match="train_dropless needs ep_size 1"):
        make_layer(ep_size=2, train_dropless=True)


def test_straight_through_gates_make_identical_experts_the_dense_mlp_and_train_the_router():
    """With `straight_through_gates` every kept token's expert output enters at weight 1: if all
    experts are one MLP, the layer is that MLP (the dense twin) and only the router's gradient
    tells the experts apart. Without it, the output is scaled by the token's gate."""
    layer = make_layer(straight_through_gates=True)
    experts = layer.deepspeed_moe.experts.deepspeed_experts
    for e in experts[1:]:
        e.load_state_dict(experts[0].state_dict())
    x, modality = make_tokens()
    routed = modality != IGNORE
    layer.eval()
    with torch.no_grad():
        dense = experts[0](x)
        y, _ = layer(x, modality)
        torch.testing.assert_close(y[routed], dense[routed], rtol=1e-5, atol=1e-6)
        layer.gate.config = dataclasses.replace(layer.gate.config, straight_through_gates=False)
        y_raw, _ = layer(x, modality)
        assert (y_raw[routed].norm(dim=1) < 0.99 * dense[routed].norm(dim=1)).all()
    layer.gate.config = dataclasses.replace(layer.gate.config, straight_through_gates=True)
    layer.train()
    assert_same_as_reference(layer, x, modality)  # gradients as the per-token loop's, router included
    y, _ = layer(x, modality)
    y.square().sum().backward()
    assert layer.gate.wg.weight.grad.abs().sum() > 0


def test_dropped_and_padding_tokens_get_exactly_zero_output_and_no_gradient():
    layer = make_layer(capacity_factor=0.5).train()
    x, modality = make_tokens()
    x.requires_grad_()
    expert = layer.gate(x, TokenGroups.from_modality(modality))[0].expert
    dropped = (expert < 0).all(0)
    assert dropped[modality == IGNORE].all() and dropped[modality != IGNORE].any()
    y, _ = layer(x, modality)
    assert (y[dropped] == 0).all()
    # A dropped token reaches the output only through its own (zeroed) gate, so
    # without the aux loss it gets no gradient at all.
    (y * torch.randn(y.shape)).sum().backward()
    assert (x.grad[dropped] == 0).all() and (x.grad[~dropped] != 0).any()


def random_routes(num_tokens, num_experts, k, capacity, seed):
    """Routes as the gate makes them: distinct experts per token, slots unique per expert, some dropped."""
    g = torch.Generator().manual_seed(seed)
    expert = torch.stack([torch.randperm(num_experts, generator=g)[:k] for _ in range(num_tokens)]).t()
    position = torch.zeros_like(expert)
    fill = [0] * num_experts
    for choice in range(k):
        for t in range(num_tokens):
            e = int(expert[choice, t])
            position[choice, t] = fill[e]
            fill[e] += 1
    expert = torch.where(position < capacity, expert, -1)
    position = torch.where(expert >= 0, position, 0)
    gate = torch.where(expert >= 0, torch.rand(k, num_tokens, generator=g), 0.0)
    return expert.int(), position.int(), gate


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 2])
def test_dispatch_and_combine_match_deepspeed_sparse_encode_decode(k, dtype):
    num_tokens, num_experts, capacity, d = 24, 4, 5 * k, 5
    expert, position, gate = random_routes(num_tokens, num_experts, k, capacity, seed=k)
    assert (expert < 0).any()
    x = torch.randn(num_tokens, d).to(dtype)
    weights = torch.randn(num_experts * capacity, d).to(dtype)  # stands in for the experts: a row-wise scale

    def run(ours):
        xs, gs = x.clone().requires_grad_(), gate.clone().requires_grad_()
        if ours:
            slots = SlotMap.build(expert, position, gs, num_experts, capacity)
            buffer = DispatchTokens.apply(xs, slots)
            y = CombineExperts.apply(buffer * weights, gs, slots)
        else:
            slots = _route_slots(expert, position, num_experts, capacity)
            buffer = _sparse_encode(xs, slots, num_experts, capacity).view(-1, d)
            y = _sparse_decode(buffer * weights, slots, gs, num_tokens)
        assert y.dtype == dtype
        (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
        return buffer.detach(), y.detach(), xs.grad, gs.grad

    for ours, stock in zip(run(True), run(False)):
        torch.testing.assert_close(ours, stock)


def test_layer_is_a_deepspeed_moe_with_expert_names_deepspeed_checkpoints_use():
    layer = as_deepspeed_moe(make_layer())  # as launch/ hands it to DeepSpeed
    assert isinstance(layer, MoE)
    names = {n for n, _ in layer.named_parameters()}
    assert {f"deepspeed_moe.experts.deepspeed_experts.{i}.fc1.weight" for i in range(4)} <= names


# ---------------------------------------------------------------------------
# Expert parallelism: two gloo ranks, each holding half of the experts.


def _expert_parallel_rank(rank, world_size, port, full_state, result_queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world_size))
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    layer = as_deepspeed_moe(make_layer(ep_size=world_size, capacity_factor=0.5))
    layer.load_state_dict(shard_experts(full_state, rank, world_size, num_experts=4))
    layer.set_deepspeed_parallelism()
    layer.train()
    x, modality = make_tokens(seed=10 + rank)  # each rank has its own tokens
    y, gx, grads = outputs_and_grads(lambda m, a, b: m(a, b)[0], layer, x, modality)
    # Dropless inference: the ranks route different numbers of tokens, exchanged without padding.
    layer.eval()
    with torch.no_grad():
        y_eval = layer(*make_tokens(num_tokens=30 + 17 * rank, seed=20 + rank))[0]
    # numpy pickles by value, so the results outlive this process.
    result_queue.put((rank, y.numpy(), gx.numpy(), {n: g.numpy() for n, g in grads.items()}, y_eval.numpy()))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_expert_parallel_layer_matches_one_process_layer():
    full = make_layer(capacity_factor=0.5)
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_expert_parallel_rank, args=(rank, 2, port, full.state_dict(), queue))
             for rank in range(2)]
    for p in procs:
        p.start()
    results, dropless = {}, {}
    for _ in procs:
        rank, y, gx, grads, y_eval = queue.get(timeout=180)
        results[rank] = (torch.from_numpy(y), torch.from_numpy(gx),
                         {n: torch.from_numpy(g) for n, g in grads.items()})
        dropless[rank] = torch.from_numpy(y_eval)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    from launch.deepspeed_compat import remove_shm_buffers

    remove_shm_buffers(port)  # DeepSpeed's CPU all-reduce buffers (see launch/deepspeed_compat.py)

    full.train()
    reference, expert_grads = {}, {}
    for rank in (0, 1):
        x, modality = make_tokens(seed=10 + rank)
        reference[rank] = outputs_and_grads(lambda m, a, b: m(a, b)[0], full, x, modality)
        for name, g in reference[rank][2].items():
            if ".deepspeed_experts." in name:
                expert_grads[name] = expert_grads.get(name, 0) + g
    for rank in (0, 1):
        y, gx, grads = results[rank]
        y_ref, gx_ref, grads_ref = reference[rank]
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
        # An expert's gradient lives on the rank that owns it and sums both ranks' tokens;
        # the router's is this rank's own (the engine all-reduces it over data parallel).
        owned = shard_experts(expert_grads, rank, 2, num_experts=4)
        assert len(grads) == len(owned) + sum(".deepspeed_experts." not in n for n in grads_ref)
        for name, g in grads.items():
            expected = owned[name] if ".deepspeed_experts." in name else grads_ref[name]
            torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-6, msg=name)
    full.eval()
    with torch.no_grad():
        for rank in (0, 1):
            want = full(*make_tokens(num_tokens=30 + 17 * rank, seed=20 + rank))[0]
            torch.testing.assert_close(dropless[rank], want, rtol=1e-5, atol=1e-6)


def test_dropless_experts_compute_only_their_own_rows():
    """Dropless inference sorts the routes by expert: each expert runs on exactly the rows
    routed to it, so the rows computed equal the routed tokens, however skewed the routing."""
    layer = make_layer().eval()
    with torch.no_grad():  # 70% of the tokens prefer expert 0
        layer.gate.wg.weight.mul_(0.01)
        layer.gate.wg.weight[0] += 0.5
    x, modality = make_tokens(num_tokens=200)
    x[:140] = x[:140].abs()
    rows_seen = []
    hooks = [expert.register_forward_hook(lambda m, args, out: rows_seen.append(args[0].shape[0]))
             for expert in layer.experts.deepspeed_experts]
    with torch.no_grad():
        y, _ = layer(x, modality)
        for hook in hooks:
            hook.remove()
        y_ref, expert = reference_forward(layer, x, modality)
    routed = int((modality != IGNORE).sum())
    assert sum(rows_seen) == routed
    assert max(rows_seen) >= 0.6 * routed, "the test needs a skewed router"
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)


def test_aligned_groups_hold_every_row_once_at_aligned_starts():
    from limoe.layers import GROUP_ALIGN, align_groups

    rows = torch.arange(23, dtype=torch.float32).unsqueeze(1).repeat(1, 3)
    sizes = [5, 0, 17, 1]
    buffer, offsets, place, group = align_groups(rows, sizes)
    assert offsets.dtype == torch.int32 and offsets.tolist() == [8, 8, 32, 40]
    assert torch.equal(buffer.index_select(0, place), rows)
    assert buffer.shape[0] - rows.shape[0] < GROUP_ALIGN * len(sizes)
    assert group.tolist() == [0] * 8 + [2] * 24 + [3] * 8
    padding = torch.ones(buffer.shape[0], dtype=torch.bool)
    padding[place] = False
    assert torch.all(buffer[padding] == 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="grouped matmul kernels need CUDA")
@pytest.mark.parametrize("expert", [MLP, SwiGLU])
def test_cuda_grouped_dropless_matches_the_expert_loop(expert):
    layer = make_layer(expert=expert).eval().to("cuda", torch.bfloat16)
    x, modality = make_tokens(num_tokens=300)
    x, modality = x.to("cuda", torch.bfloat16), modality.to("cuda")
    with torch.no_grad():
        layer.experts.batched = True
        grouped, _ = layer(x, modality)
        layer.experts.batched = False
        loop, _ = layer(x, modality)
    torch.testing.assert_close(grouped.float(), loop.float(), rtol=2e-2, atol=2e-2)
