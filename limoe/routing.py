"""LIMoE routing: noisy top-k, expert capacity, Batch Priority Routing, aux losses.

Pure tensor functions (no modules, no process groups), so each rule in
docs/model.md can be read and tested on its own. All math here is fp32, and
nothing here reads a tensor back to the host: a training step's routing never
waits for the GPU.

Shapes: S tokens, E experts, k choices per token. Each auxiliary loss takes
the tokens of one modality, either as its own [S_m, E] tensor or as the
whole call's [S, E] tensor with a `mask` [S] that marks the modality's tokens
(the MoE layer uses masks, so grouping by modality needs no host sync).

Which router output feeds what follows V-MoE (google-research/vmoe,
`vmoe/nn/routing.py`, `NoisyTopExpertsPerItemRouter`): tokens are routed by
the softmax of the NOISY logits, which are also the gates; the importance
loss (and here the entropy losses and z-loss) use the CLEAN softmax / logits;
the load loss compares the clean logits with each token's noisy threshold.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import MODALITIES

# Modality ids carried by every token (the index into MODALITIES). Padding text
# tokens carry IGNORE: they are never dispatched and never enter a loss or a statistic.
IMAGE, TEXT, IGNORE = 0, 1, -1


@dataclass
class TokenGroups:
    """The tokens of one routing call grouped by modality: built once per forward from the
    modality ids and shared by every MoE layer. Masks, not index lists, so building and
    using them never reads a tensor back to the host."""

    modality: torch.Tensor  # [S] int64: IMAGE, TEXT or IGNORE
    valid: torch.Tensor  # [S] bool: routed at all (not padding)
    masks: dict[str, torch.Tensor]  # modality name -> [S] bool
    num_routed: torch.Tensor  # 0-dim int64: valid.sum(), what capacity counts

    @classmethod
    def from_modality(cls, modality: torch.Tensor) -> "TokenGroups":
        valid = modality != IGNORE
        masks = {name: modality == mid for mid, name in enumerate(MODALITIES)}
        return cls(modality=modality, valid=valid, masks=masks, num_routed=valid.sum())


# -- capacity ------------------------------------------------------------------------------


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
    """C = ceil(k * S * cf / E), rounded up to a multiple of 4 (at least 4)."""
    capacity = math.ceil(k * num_tokens * capacity_factor / num_experts)
    return max(4, 4 * math.ceil(capacity / 4))


def expert_capacity_tensor(num_tokens: torch.Tensor, num_experts: int, k: int,
                           capacity_factor: float) -> torch.Tensor:
    """`expert_capacity` of a 0-dim token count that stays on its device (no host sync).
    In float64, so it equals the Python formula for any realistic count."""
    capacity = torch.ceil(num_tokens.double() * (k * capacity_factor) / num_experts)
    return (4 * torch.ceil(capacity / 4)).clamp_min(4).long()


# -- router --------------------------------------------------------------------------------


@dataclass
class RouterOutput:
    logits: torch.Tensor  # [S, E] fp32, clean
    noisy_logits: torch.Tensor  # [S, E] logits + N(0, sigma^2) in training; the clean logits otherwise
    probs: torch.Tensor  # softmax(noisy_logits): what routes the tokens and gates the experts
    clean_probs: torch.Tensor  # softmax(logits): importance and entropy losses
    sigma: float  # the noise's standard deviation, noise_std / E (also at eval: the load loss needs it)


def route_logits(logits: torch.Tensor, noise_std: float, training: bool) -> RouterOutput:
    """Add training noise N(0, (noise_std / E)^2) to fp32 router logits and take both softmaxes."""
    logits = logits.float()
    sigma = noise_std / logits.shape[-1]
    noisy = logits + torch.randn_like(logits) * sigma if training and sigma > 0 else logits
    clean_probs = torch.softmax(logits, dim=-1)
    probs = clean_probs if noisy is logits else torch.softmax(noisy, dim=-1)
    return RouterOutput(logits=logits, noisy_logits=noisy, probs=probs, clean_probs=clean_probs, sigma=sigma)


# -- assignment ------------------------------------------------------------------------------


@dataclass
class Routes:
    """Where every (choice, token) goes. Dropped routes have expert == -1 and gate == 0."""

    expert: torch.Tensor  # [k, S] int64
    position: torch.Tensor  # [k, S] int64, slot inside the expert's buffer (its rank among the expert's routes)
    gate: torch.Tensor  # [k, S] fp32 combine weight
    capacity: int | torch.Tensor | None  # the limit applied (None: dropless)
    counts: torch.Tensor  # [E] number of routes each expert received (kept)


def assign_routes(
    probs: torch.Tensor,
    k: int,
    capacity: int | torch.Tensor | None,
    batch_priority: bool = True,
    valid: torch.Tensor | None = None,
    renormalize: bool = False,
    first: torch.Tensor | None = None,
    straight_through: bool = False,
) -> Routes:
    """Assign tokens to expert slots.

    All first choices are placed before any second choice. Within a choice
    level, tokens are ranked by their top-1 probability (Batch Priority
    Routing) or by position. A route past its expert's capacity is dropped.
    `capacity` is a Python int or a 0-dim tensor (kept on its device);
    `capacity=None` is dropless: every route is kept.
    `valid` [S] bool marks tokens to route at all (False = padding).
    `first` [S] bool marks tokens that take the slots before all others within
    each choice level (`moe.priority_modality`); among themselves, and among the
    rest, the order above holds.
    `straight_through`: the gates' values are the chosen probabilities renormalised to
    sum 1 (at k = 1, 1: a kept token's expert output enters at a dense MLP's scale), their
    gradient that of the chosen probabilities (`moe.straight_through_gates`).
    """
    num_tokens, num_experts = probs.shape
    top_p, top_e = probs.topk(k, dim=-1)  # [S, k]
    if straight_through:  # the renormalised values, the raw probabilities' gradient
        gates = top_p + (top_p / top_p.sum(-1, keepdim=True) - top_p).detach()
    else:
        gates = top_p / top_p.sum(-1, keepdim=True) if renormalize and k > 1 else top_p
    top_e, gates = top_e.t(), gates.t()  # [k, S]
    if valid is None:
        valid = torch.ones(num_tokens, dtype=torch.bool, device=probs.device)

    if batch_priority:
        order = torch.argsort(top_p[:, 0], descending=True, stable=True)
    else:
        order = torch.arange(num_tokens, device=probs.device)
    if first is not None:  # a stable sort on the group keeps each group's order
        order = order[torch.argsort((~first[order]).to(torch.uint8), stable=True)]

    # One-hot of each route's expert, in assignment order: (choice level, priority), laid out
    # [E, k*S] so the running count per expert is a scan along the last (contiguous) dim: on
    # CUDA a scan along dim 0 of a [k*S, E] tensor ran one thread per column (2.9 ms for 16k
    # tokens on an H200, half of the layer's time; docs/benchmarks.md). A comparison, not
    # F.one_hot, which reads the max back to the host on CPU.
    ordered_e = top_e[:, order].reshape(1, k * num_tokens)  # [1, k*S]
    ordered_valid = valid[order].repeat(k).unsqueeze(0)
    experts = torch.arange(num_experts, device=probs.device).unsqueeze(1)  # [E, 1]
    onehot = ((ordered_e == experts) & ordered_valid).long()  # [E, k*S]
    ordered_pos = (torch.cumsum(onehot, dim=1) - 1).gather(0, ordered_e).view(k, num_tokens)

    position = torch.empty_like(ordered_pos)
    position[:, order] = ordered_pos
    kept = valid.expand(k, -1).clone()
    if capacity is not None:
        kept &= position < capacity
    expert = torch.where(kept, top_e, torch.full_like(top_e, -1))
    position = torch.where(kept, position, torch.zeros_like(position))
    gates = torch.where(kept, gates, torch.zeros_like(gates))
    # scatter_add over all routes, weighted by kept: no boolean indexing, so no GPU sync.
    counts = torch.zeros(num_experts, dtype=torch.long, device=probs.device)
    counts.scatter_add_(0, top_e.reshape(-1), kept.reshape(-1).long())
    return Routes(expert=expert, position=position, gate=gates, capacity=capacity, counts=counts)


# ---------------------------------------------------------------------------
# Auxiliary losses, each over the tokens of one modality.


def _token_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the token dimension (dim 0) of the masked tokens; 0 when there are none."""
    if mask is None:
        return x.mean(0) if x.shape[0] else x.sum(0)
    w = mask.to(x.dtype)
    w = w.reshape(-1, *([1] * (x.ndim - 1)))
    return (x * w).sum(0) / w.sum().clamp_min(1)


def _cv_squared(x: torch.Tensor) -> torch.Tensor:
    """(std / mean)^2 over experts, population variance; 0 for an all-zero vector.
    Written out: Tensor.var reads a scalar back to the host on CPU."""
    mean = x.mean()
    return (x - mean).square().mean() / mean.square().clamp_min(1e-18)


def importance_loss(probs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(std_e Imp / mean_e Imp)^2 with Imp_e = sum_i p_ie (V-MoE, over the clean softmax).
    A sum and a mean over tokens give the same coefficient of variation."""
    return _cv_squared(_token_mean(probs, mask))


def load_loss(logits: torch.Tensor, noisy_logits: torch.Tensor, sigma: float, k: int,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """V-MoE's load loss (`_load_auxiliary_loss`): threshold_i = token i's k-th largest NOISY
    logit; P_ie = 1 - Phi((threshold_i - logit_ie) / sigma) with the CLEAN logit, the
    probability that expert e would be among i's top-k if the noise were drawn again;
    Load_e = mean_i P_ie; loss = (std_e Load / mean_e Load)^2."""
    if sigma <= 0:
        raise ValueError("V-MoE's load loss needs router noise (sigma > 0): set moe.noise_std > 0, or "
                         "balance with the noise-free switch_load term instead")
    threshold = noisy_logits.topk(k, dim=-1).values[:, -1:]  # [S, 1]
    noise_to_win = (threshold - logits) / sigma
    p = 0.5 * torch.erfc(noise_to_win / math.sqrt(2))  # 1 - Phi(z)
    return _cv_squared(_token_mean(p, mask))


def switch_load_loss(probs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """E * sum_e f_e P_e, f_e = share of first choices on e, P_e = mean prob (Switch / GShard form;
    V-MoE's `_gshard_auxiliary_loss`). 1 when perfectly balanced."""
    num_experts = probs.shape[-1]
    first = (probs.argmax(-1, keepdim=True) == torch.arange(num_experts, device=probs.device)).to(probs.dtype)
    return num_experts * (_token_mean(first, mask) * _token_mean(probs, mask)).sum()


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-9))).sum(-1)


def local_entropy_loss(probs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """mean_i H(p_i): minimising it makes each token commit to an expert (LIMoE)."""
    return _token_mean(entropy(probs), mask)


def global_entropy_loss(probs: torch.Tensor, threshold_experts: float,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """max(0, log(S_m) - H(mean_i p_i)), S_m = threshold_experts (LIMoE): the modality is pushed to
    spread over at least about S_m experts, and no further."""
    return torch.relu(math.log(threshold_experts) - entropy(_token_mean(probs, mask)))


def z_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """mean_i (logsumexp_e logits_ie)^2 (router z-loss)."""
    return _token_mean(torch.logsumexp(logits.float(), dim=-1) ** 2, mask)


def modality_aux_losses(router: RouterOutput, k: int, threshold_experts: float | None,
                        mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Every auxiliary term for one modality's tokens (unweighted). A term whose formula is
    undefined here is 0: load without router noise, global entropy without a threshold
    (the config refuses a non-zero weight for either)."""
    zero = router.logits.sum() * 0.0
    return {
        "importance": importance_loss(router.clean_probs, mask),
        "load": load_loss(router.logits, router.noisy_logits, router.sigma, k, mask) if router.sigma > 0 else zero,
        "switch_load": switch_load_loss(router.probs, mask),
        "local_entropy": local_entropy_loss(router.clean_probs, mask),
        "global_entropy": (global_entropy_loss(router.clean_probs, threshold_experts, mask)
                           if threshold_experts else zero),
        "zloss": z_loss(router.logits, mask),
    }
