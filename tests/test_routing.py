"""Routing rules of docs/model.md: capacity, assignment order, BPR, dropping, aux losses."""
import math

import pytest
import torch

from limoe import routing
from limoe.config import LIMoEConfig, MoEConfig
from limoe.moe import LIMoEGate, LIMoELayer
from limoe.layers import MLP
from limoe.routing import IGNORE, IMAGE, TEXT, TokenGroups


def test_capacity_is_ceil_k_s_cf_over_e_rounded_up_to_multiple_of_4():
    assert routing.expert_capacity(10, 4, 1, 1.0) == 4  # ceil(2.5) = 3 -> 4
    assert routing.expert_capacity(100, 8, 2, 1.25) == 32  # ceil(31.25) = 32
    assert routing.expert_capacity(100, 8, 1, 1.0) == 16  # ceil(12.5) = 13 -> 16
    assert routing.expert_capacity(1, 8, 1, 1.0) == 4


@pytest.mark.parametrize("num_tokens, experts, k, factor", [(10, 4, 1, 1.0), (100, 8, 2, 1.25), (100, 8, 1, 1.0),
                                                            (1, 8, 1, 1.0), (50_000, 32, 2, 0.5), (4097, 8, 1, 1.0)])
def test_capacity_on_the_device_equals_the_host_formula(num_tokens, experts, k, factor):
    on_device = routing.expert_capacity_tensor(torch.tensor(num_tokens), experts, k, factor)
    assert on_device.item() == routing.expert_capacity(num_tokens, experts, k, factor)


def _all_to_expert_zero(top1):
    """probs where every token's first choice is expert 0 with the given probability."""
    top1 = torch.tensor(top1)
    rest = (1 - top1) / 3
    return torch.stack([top1, rest, rest, rest], dim=1)


def test_bpr_keeps_the_tokens_with_highest_router_probability():
    probs = _all_to_expert_zero([0.40, 0.90, 0.50, 0.95, 0.60, 0.85, 0.45, 0.70])
    routes = routing.assign_routes(probs, k=1, capacity=4, batch_priority=True)
    kept = (routes.expert[0] == 0).nonzero().flatten().tolist()
    assert sorted(kept) == [1, 3, 5, 7]  # probs .90 .95 .85 .70
    # The most confident token gets slot 0.
    assert routes.position[0, 3] == 0


def test_without_bpr_the_earliest_tokens_win():
    probs = _all_to_expert_zero([0.40, 0.90, 0.50, 0.95, 0.60, 0.85, 0.45, 0.70])
    routes = routing.assign_routes(probs, k=1, capacity=4, batch_priority=False)
    assert (routes.expert[0] == 0).nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert routes.position[0, :4].tolist() == [0, 1, 2, 3]


def test_dropped_routes_have_no_expert_and_zero_gate():
    probs = _all_to_expert_zero([0.5, 0.6, 0.7, 0.8, 0.9])
    routes = routing.assign_routes(probs, k=1, capacity=4, batch_priority=True)
    assert routes.expert[0, 0] == -1 and routes.gate[0, 0] == 0
    assert routes.counts.tolist() == [4, 0, 0, 0]


def test_all_first_choices_are_placed_before_any_second_choice():
    # Tokens 0-3: first choice expert 1 (very confident), second choice expert 0.
    # Tokens 4-7: first choice expert 0 (less confident).
    probs = torch.tensor([[0.3, 0.6, 0.05, 0.05]] * 4 + [[0.4, 0.3, 0.15, 0.15]] * 4)
    routes = routing.assign_routes(probs, k=2, capacity=4, batch_priority=True)
    # Expert 0's four slots all go to first choices, although tokens 0-3 rank higher under BPR.
    assert routes.expert[0, 4:].tolist() == [0, 0, 0, 0]
    assert (routes.expert[1, :4] == -1).all()
    assert routes.expert[0, :4].tolist() == [1, 1, 1, 1]


def test_dropless_keeps_every_route():
    probs = _all_to_expert_zero([0.5] * 37)
    routes = routing.assign_routes(probs, k=1, capacity=None)
    assert (routes.expert[0] == 0).all() and routes.capacity is None
    assert routes.counts.tolist() == [37, 0, 0, 0]
    assert sorted(routes.position[0].tolist()) == list(range(37))


def test_a_capacity_tensor_drops_like_the_same_int():
    probs = _all_to_expert_zero([0.40, 0.90, 0.50, 0.95, 0.60, 0.85, 0.45, 0.70])
    as_int = routing.assign_routes(probs, k=1, capacity=4)
    as_tensor = routing.assign_routes(probs, k=1, capacity=torch.tensor(4))
    assert torch.equal(as_int.expert, as_tensor.expert) and torch.equal(as_int.gate, as_tensor.gate)


def test_padding_tokens_are_never_routed():
    probs = _all_to_expert_zero([0.9, 0.8, 0.7])
    valid = torch.tensor([True, False, True])
    routes = routing.assign_routes(probs, k=1, capacity=4, valid=valid)
    assert routes.expert[0].tolist() == [0, -1, 0]
    assert routes.position[0, 2] == 1  # the padding token took no slot


def test_gates_are_chosen_probs_not_renormalised_by_default():
    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0]])
    routes = routing.assign_routes(probs, k=2, capacity=4)
    assert torch.allclose(routes.gate[:, 0], torch.tensor([0.5, 0.3]))
    routes = routing.assign_routes(probs, k=2, capacity=4, renormalize=True)
    assert torch.allclose(routes.gate[:, 0], torch.tensor([0.625, 0.375]))


def test_straight_through_gates_combine_at_one_with_the_probabilities_gradient():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.5, 3.0, 0.0]], requires_grad=True)
    probs = torch.softmax(logits, -1)
    routes = routing.assign_routes(probs, k=1, capacity=4, straight_through=True)
    assert torch.allclose(routes.gate, torch.ones(1, 2))
    weights = torch.tensor([0.7, -1.3])
    (routes.gate[0] * weights).sum().backward()
    st_grad = logits.grad.clone()

    logits.grad = None
    raw = routing.assign_routes(torch.softmax(logits, -1), k=1, capacity=4)
    assert not torch.allclose(raw.gate, torch.ones(1, 2))
    (raw.gate[0] * weights).sum().backward()
    assert torch.allclose(st_grad, logits.grad) and st_grad.abs().sum() > 0

    # k = 2: the values are renormalised to sum 1; a dropped route still weighs 0.
    two = routing.assign_routes(torch.tensor([[0.5, 0.3, 0.2, 0.0]]), k=2, capacity=4, straight_through=True)
    assert torch.allclose(two.gate[:, 0], torch.tensor([0.625, 0.375]))
    dropped = routing.assign_routes(_all_to_expert_zero([0.9, 0.8]), k=1, capacity=1, straight_through=True)
    assert dropped.gate[0].tolist() == [1.0, 0.0]


# -- auxiliary losses on a hand-computed example --------------------------------------

PROBS = torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])


def _h(p):
    return -sum(x * math.log(x) for x in p)


def test_importance_loss_by_hand():
    # Imp = [1.7, 1.3]: mean 1.5, population std 0.2
    assert routing.importance_loss(PROBS).item() == pytest.approx((0.2 / 1.5) ** 2, rel=1e-5)


def test_switch_load_loss_by_hand():
    # first choices e0, e0, e1 -> f = [2/3, 1/3]; P = [1.7/3, 1.3/3]
    expected = 2 * (2 / 3 * 1.7 / 3 + 1 / 3 * 1.3 / 3)
    assert routing.switch_load_loss(PROBS).item() == pytest.approx(expected, rel=1e-5)


def _vmoe_load_by_hand(clean, noisy, sigma, k):
    """V-MoE's load loss in plain Python: threshold = k-th largest noisy logit,
    P = 1 - Phi((threshold - clean) / sigma), Load = mean over tokens, CV^2 over experts."""
    p = []
    for c_row, n_row in zip(clean, noisy):
        threshold = sorted(n_row, reverse=True)[k - 1]
        p.append([1 - 0.5 * (1 + math.erf((threshold - c) / sigma / math.sqrt(2))) for c in c_row])
    load = [sum(col) / len(p) for col in zip(*p)]
    mean = sum(load) / len(load)
    var = sum((x - mean) ** 2 for x in load) / len(load)
    return var / mean ** 2


CLEAN = [[1.0, 0.0, -0.5], [0.0, 1.0, 0.2], [0.5, 0.0, 0.1], [0.3, 0.3, 0.9]]
NOISY = [[1.1, -0.1, -0.4], [0.2, 0.9, 0.1], [0.4, 0.3, 0.0], [0.2, 0.5, 0.8]]


@pytest.mark.parametrize("k", [1, 2])
def test_vmoe_load_loss_by_hand(k):
    got = routing.load_loss(torch.tensor(CLEAN), torch.tensor(NOISY), sigma=0.5, k=k)
    assert got.item() == pytest.approx(_vmoe_load_by_hand(CLEAN, NOISY, 0.5, k), rel=1e-5)


def test_vmoe_load_loss_is_undefined_without_noise():
    with pytest.raises(ValueError, match="needs router noise"):
        routing.load_loss(torch.tensor(CLEAN), torch.tensor(CLEAN), sigma=0.0, k=1)


def test_masked_losses_equal_the_losses_of_the_masked_tokens():
    logits = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    noisy = logits + 0.1 * torch.randn(10, 4, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([True, False] * 5)
    probs = torch.softmax(logits, -1)
    pairs = [
        (routing.importance_loss(probs, mask), routing.importance_loss(probs[mask])),
        (routing.load_loss(logits, noisy, 0.25, 1, mask), routing.load_loss(logits[mask], noisy[mask], 0.25, 1)),
        (routing.switch_load_loss(probs, mask), routing.switch_load_loss(probs[mask])),
        (routing.local_entropy_loss(probs, mask), routing.local_entropy_loss(probs[mask])),
        (routing.global_entropy_loss(probs, 3.0, mask), routing.global_entropy_loss(probs[mask], 3.0)),
        (routing.z_loss(logits, mask), routing.z_loss(logits[mask])),
    ]
    for masked, selected in pairs:
        assert masked.item() == pytest.approx(selected.item(), rel=1e-5, abs=1e-7)


def test_local_entropy_loss_by_hand():
    expected = (_h([0.8, 0.2]) + _h([0.6, 0.4]) + _h([0.3, 0.7])) / 3
    assert routing.local_entropy_loss(PROBS).item() == pytest.approx(expected, rel=1e-5)


def test_global_entropy_loss_is_thresholded_by_hand():
    h_mean = _h([1.7 / 3, 1.3 / 3])
    assert routing.global_entropy_loss(PROBS, 2.0).item() == pytest.approx(max(0, math.log(2) - h_mean), abs=1e-6)
    # A modality already spread over more than the threshold gets no push.
    assert routing.global_entropy_loss(PROBS, 1.5).item() == 0.0


def test_z_loss_by_hand():
    logits = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    expected = (math.log(math.e + math.e ** 2) ** 2 + math.log(2) ** 2) / 2
    assert routing.z_loss(logits).item() == pytest.approx(expected, rel=1e-5)


def _gate(num_experts=4, **moe):
    torch.manual_seed(0)
    moe = {"noise_std": 0.0, "image": {"load": 0.0}, "text": {"load": 0.0}, **moe}
    config = LIMoEConfig(width=8, heads=2, mlp_dim=16, moe={"num_experts": num_experts, **moe}).moe
    return LIMoEGate(8, config).train()


def _aux(gate, x, modality):
    return gate(x, TokenGroups.from_modality(modality))[1]


def test_gate_terms_are_computed_per_modality():
    gate = _gate()
    x = torch.randn(12, 8)
    modality = torch.tensor([IMAGE] * 8 + [TEXT] * 3 + [IGNORE])
    aux = _aux(gate, x, modality)
    logits = x @ gate.wg.weight.t()
    probs = torch.softmax(logits, -1)
    text = probs[8:11]
    assert aux["terms"]["text/importance"].item() == pytest.approx(routing.importance_loss(text).item(), rel=1e-5)
    assert aux["terms"]["text/local_entropy"].item() == pytest.approx(
        routing.local_entropy_loss(text).item(), rel=1e-5)
    assert aux["terms"]["image/switch_load"].item() == pytest.approx(
        routing.switch_load_loss(probs[:8]).item(), rel=1e-5)
    assert aux["stats"]["text"]["tokens"].item() == 3


def test_gate_routes_by_the_noisy_softmax_and_balances_on_the_clean_one():
    """As V-MoE: importance (and the entropy losses) see softmax(logits); the load loss
    compares clean logits with the noisy threshold; tokens are routed by the noisy softmax."""
    gate = _gate(noise_std=4.0, capacity_factor=4.0, image={"load": 0.005})  # nothing dropped
    x = torch.randn(64, 8)
    modality = torch.full((64,), IMAGE)
    torch.manual_seed(5)
    routes, aux = gate(x, TokenGroups.from_modality(modality))
    logits = x @ gate.wg.weight.t()
    torch.manual_seed(5)
    noisy = logits + torch.randn_like(logits) * (4.0 / 4)
    assert torch.equal(routes.expert[0], torch.softmax(noisy, -1).argmax(-1))
    clean = torch.softmax(logits, -1)
    assert aux["terms"]["image/importance"].item() == pytest.approx(routing.importance_loss(clean).item(), rel=1e-5)
    assert aux["terms"]["image/load"].item() == pytest.approx(
        routing.load_loss(logits, noisy, 1.0, 1).item(), rel=1e-5)


def test_text_losses_do_not_change_when_image_tokens_change():
    gate = _gate()
    x = torch.randn(12, 8)
    modality = torch.tensor([IMAGE] * 8 + [TEXT] * 4)
    first = _aux(gate, x, modality)["terms"]
    x2 = x.clone()
    x2[:8] = torch.randn(8, 8) * 5
    second = _aux(gate, x2, modality)["terms"]
    for name in first:
        if name.startswith("text/"):
            assert torch.equal(first[name], second[name]), name
    assert not torch.equal(first["image/importance"], second["image/importance"])


def test_weighted_total_uses_per_modality_weights():
    gate = _gate()
    for name in ("image", "text"):
        w = getattr(gate.config, name)
        w.importance, w.load, w.local_entropy, w.global_entropy, w.zloss = 0, 0, 0, 0, 0
    gate.config.text.switch_load = 2.0
    x, modality = torch.randn(12, 8), torch.tensor([IMAGE] * 8 + [TEXT] * 4)
    aux = _aux(gate, x, modality)
    assert aux["loss"].item() == pytest.approx(2.0 * aux["terms"]["text/switch_load"].item(), rel=1e-6)


def test_capacity_counts_routed_tokens_not_padding():
    """16 image tokens + 16 text positions of which 12 are padding, 2 experts, cf 1:
    C = ceil(20 / 2) = 10 -> 12 slots (counting the padding would give 16)."""
    gate = _gate(num_experts=2, capacity_factor=1.0)
    with torch.no_grad():
        gate.wg.weight.copy_(torch.stack([torch.ones(8), -torch.ones(8)]))  # every token prefers expert 0
    x = torch.rand(32, 8) + 0.1
    modality = torch.tensor([IMAGE] * 16 + [TEXT] * 4 + [IGNORE] * 12)
    routes, _ = gate(x, TokenGroups.from_modality(modality))
    assert routes.counts.tolist() == [12, 0]
    assert routes.capacity.item() == routing.expert_capacity(20, 2, 1, 1.0) == 12
    assert gate.buffer_capacity(32) == 16  # the dispatch buffer is sized by the batch shape


@pytest.mark.parametrize("bad, match", [
    ({"text": {"global_entropy": 0.05}}, "needs moe.text.global_entropy_experts"),
    ({"text": {"global_entropy": 0.05, "global_entropy_experts": 1.0}}, "1 < S_m <= num_experts=4"),
    ({"image": {"global_entropy_experts": 5}}, "1 < S_m <= num_experts=4"),
    ({"noise_std": 0.0}, "moe.image.load=0.005 needs router noise"),
    ({"text": {"importance": -1}}, "moe.text.importance must be a finite number >= 0"),
    ({"text": {"zloss": float("nan")}}, "moe.text.zloss must be a finite number >= 0"),
])
def test_aux_loss_settings_are_validated(bad, match):
    with pytest.raises(ValueError, match=match):
        LIMoEConfig(width=8, heads=2, mlp_dim=16, moe={"num_experts": 4, **bad})


def test_global_entropy_with_an_explicit_threshold_is_accepted():
    config = LIMoEConfig(width=8, heads=2, mlp_dim=16,
                         moe={"num_experts": 4, "text": {"global_entropy": 0.05, "global_entropy_experts": 2.5}})
    assert config.moe.text.global_entropy_experts == 2.5


def test_dropped_tokens_get_zero_moe_output():
    torch.manual_seed(0)
    config = MoEConfig(num_experts=4, capacity_factor=0.25, noise_std=0.0)
    layer = LIMoELayer(8, MLP(8, 16), config).train()
    x = torch.randn(64, 8)
    modality = torch.full((64,), IMAGE)
    experts = layer.gate(x, TokenGroups.from_modality(modality))[0].expert[0]
    y, aux = layer(x, modality)
    dropped = experts < 0
    assert dropped.any() and (~dropped).any()
    assert torch.all(y[dropped] == 0)
    assert torch.all(y[~dropped].abs().sum(-1) > 0)
    assert aux["stats"]["image"]["dropped"].item() == int(dropped.sum())


def test_a_priority_modality_takes_the_slots_first_then_bpr_within_it():
    # Tokens 0-5 image, 6-7 text; all want expert 0; the text tokens are the least confident.
    probs = _all_to_expert_zero([0.90, 0.95, 0.85, 0.80, 0.75, 0.70, 0.30, 0.40])
    text = torch.tensor([False] * 6 + [True] * 2)
    plain = routing.assign_routes(probs, k=1, capacity=4, batch_priority=True)
    assert (plain.expert[0, 6:] == -1).all()  # BPR alone drops both text tokens
    routes = routing.assign_routes(probs, k=1, capacity=4, batch_priority=True, first=text)
    assert (routes.expert[0] == 0).nonzero().flatten().tolist() == [0, 1, 6, 7]
    assert routes.position[0, 7] == 0 and routes.position[0, 6] == 1  # text by BPR, then image by BPR
    assert routes.position[0, 1] == 2 and routes.position[0, 0] == 3
    no_bpr = routing.assign_routes(probs, k=1, capacity=4, batch_priority=False, first=text)
    assert (no_bpr.expert[0] == 0).nonzero().flatten().tolist() == [0, 1, 6, 7]  # text, then earliest


def test_the_gate_gives_the_priority_modality_its_slots():
    gate = _gate(num_experts=2, capacity_factor=1.0, priority_modality="text")
    with torch.no_grad():
        gate.wg.weight.copy_(torch.stack([torch.ones(8), -torch.ones(8)]))  # every token prefers expert 0
    x = torch.rand(20, 8) + 0.1
    x[16:] *= 0.01  # the text tokens are the least confident: BPR alone would drop them
    modality = torch.tensor([IMAGE] * 16 + [TEXT] * 4)
    routes, _ = gate(x, TokenGroups.from_modality(modality))
    assert (routes.expert[0, 16:] == 0).all()
    with pytest.raises(ValueError, match="priority_modality"):
        LIMoEConfig(moe={"priority_modality": "audio"})
