"""LIMoE routing: noisy top-k, expert capacity, Batch Priority Routing, aux losses.

Pure tensor functions (no modules, no process groups), so each rule in
LIMOE.md can be read and tested on its own. All math here is fp32.

Shapes: S tokens, E experts, k choices per token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Modality ids carried by every token. Padding text tokens carry IGNORE: they
# are never dispatched and never enter a loss or a statistic.
IMAGE, TEXT, IGNORE = 0, 1, -1


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
    """C = ceil(k * S * cf / E), rounded up to a multiple of 4."""
    capacity = math.ceil(k * num_tokens * capacity_factor / num_experts)
    return max(4, 4 * math.ceil(capacity / 4))


@dataclass
class Routes:
    """Where every (choice, token) goes. Dropped routes have expert == -1 and gate == 0."""

    expert: torch.Tensor  # [k, S] int64
    position: torch.Tensor  # [k, S] int64, slot inside the expert's buffer
    gate: torch.Tensor  # [k, S] fp32 combine weight
    capacity: int
    counts: torch.Tensor  # [E] number of routes each expert received (kept)


def router_probs(logits: torch.Tensor, noise_std: float, training: bool) -> torch.Tensor:
    """softmax(logits + N(0, (noise_std / E)^2)) in fp32; noise only in training."""
    logits = logits.float()
    if training and noise_std > 0:
        logits = logits + torch.randn_like(logits) * (noise_std / logits.shape[-1])
    return torch.softmax(logits, dim=-1)


def assign_routes(
    probs: torch.Tensor,
    k: int,
    capacity: int | None,
    batch_priority: bool = True,
    valid: torch.Tensor | None = None,
    renormalize: bool = False,
) -> Routes:
    """Assign tokens to expert slots.

    All first choices are placed before any second choice. Within a choice
    level, tokens are ranked by their top-1 probability (Batch Priority
    Routing) or by position. A route past its expert's capacity is dropped.
    `capacity=None` is dropless: every route is kept.
    `valid` [S] bool marks tokens to route at all (False = padding).
    """
    num_tokens, num_experts = probs.shape
    top_p, top_e = probs.topk(k, dim=-1)  # [S, k]
    gates = top_p / top_p.sum(-1, keepdim=True) if renormalize and k > 1 else top_p
    top_e, gates = top_e.t(), gates.t()  # [k, S]
    if valid is None:
        valid = torch.ones(num_tokens, dtype=torch.bool, device=probs.device)

    if batch_priority:
        order = torch.argsort(top_p[:, 0], descending=True, stable=True)
    else:
        order = torch.arange(num_tokens, device=probs.device)

    # One-hot of each route's expert, in assignment order: (choice level, priority).
    ordered_e = top_e[:, order]  # [k, S]
    ordered_valid = valid[order].expand(k, -1)
    onehot = F.one_hot(ordered_e, num_experts) * ordered_valid.unsqueeze(-1)  # [k, S, E]
    onehot = onehot.reshape(k * num_tokens, num_experts)
    ordered_pos = (torch.cumsum(onehot, dim=0) - 1).gather(1, ordered_e.reshape(-1, 1)).view(k, num_tokens)

    position = torch.empty_like(ordered_pos)
    position[:, order] = ordered_pos
    kept = valid.expand(k, -1).clone()
    if capacity is None:
        capacity = int(position.max().item()) + 1 if kept.any() else 1
    else:
        kept &= position < capacity
    expert = torch.where(kept, top_e, torch.full_like(top_e, -1))
    position = torch.where(kept, position, torch.zeros_like(position))
    gates = torch.where(kept, gates, torch.zeros_like(gates))
    # scatter_add over all routes, weighted by kept: no boolean indexing, so no GPU sync.
    counts = torch.zeros(num_experts, dtype=torch.long, device=probs.device)
    counts.scatter_add_(0, top_e.reshape(-1), kept.reshape(-1).long())
    return Routes(expert=expert, position=position, gate=gates, capacity=capacity, counts=counts)


# ---------------------------------------------------------------------------
# Auxiliary losses, each over the tokens of one modality (probs [S_m, E]).


def importance_loss(probs: torch.Tensor) -> torch.Tensor:
    """(std_e Imp / mean_e Imp)^2 with Imp_e = sum_i p_ie (V-MoE)."""
    importance = probs.sum(0)
    return (importance.std(unbiased=False) / importance.mean().clamp_min(1e-9)) ** 2


def load_loss(probs: torch.Tensor) -> torch.Tensor:
    """E * sum_e f_e P_e, f_e = share of first choices on e, P_e = mean prob (Switch form)."""
    num_experts = probs.shape[-1]
    first = F.one_hot(probs.argmax(-1), num_experts).float().mean(0)
    return num_experts * (first * probs.mean(0)).sum()


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-9))).sum(-1)


def local_entropy_loss(probs: torch.Tensor) -> torch.Tensor:
    """mean_i H(p_i): minimising it makes each token commit to an expert."""
    return entropy(probs).mean()


def global_entropy_loss(probs: torch.Tensor, threshold_experts: float) -> torch.Tensor:
    """max(0, log(threshold_experts) - H(mean_i p_i)): spread over >= ~threshold experts."""
    return torch.relu(math.log(threshold_experts) - entropy(probs.mean(0)))


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    return (torch.logsumexp(logits.float(), dim=-1) ** 2).mean()


def modality_aux_losses(probs: torch.Tensor, logits: torch.Tensor, threshold_experts: float) -> dict:
    """All auxiliary terms for one modality's tokens (unweighted)."""
    if probs.shape[0] == 0:
        zero = probs.sum() * 0.0
        return {"importance": zero, "load": zero, "local_entropy": zero, "global_entropy": zero,
                "zloss": zero}
    return {
        "importance": importance_loss(probs),
        "load": load_loss(probs),
        "local_entropy": local_entropy_loss(probs),
        "global_entropy": global_entropy_loss(probs, threshold_experts),
        "zloss": z_loss(logits),
    }
