"""The LIMoE mixture-of-experts layer, built on DeepSpeed's MoE.

`LIMoELayer` is a `deepspeed.moe.layer.MoE`, so the DeepSpeed engine finds
it: experts live in expert-parallel groups (`ep_size`), their gradients are
reduced over the expert-data-parallel group, and engine checkpoints save
them per expert. Two parts are replaced:

- the gate, `LIMoEGate`, routes as LIMOE.md says (routing.py) and returns
  the 7-tuple DeepSpeed 0.19.8 expects with `sparse_routes=True`;
- the experts, `GroupedExperts`, run all local experts with batched matmuls
  instead of a Python loop over small ones.

The token dispatch itself (gather into [E, C, d] buffers, all-to-all across
the expert-parallel group, weighted gather back) is DeepSpeed's.

Without a process group (ep_size=1) the layer runs as a plain module, for
inference, evaluation and the API.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from deepspeed.moe.experts import Experts
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TopKGate

from . import routing
from .config import MODALITIES, MoEConfig
from .routing import IGNORE


class LIMoEGate(TopKGate):
    """fp32 router with noisy top-k, capacity, BPR and per-modality aux losses."""

    def __init__(self, width: int, config: MoEConfig):
        super().__init__(width, config.num_experts, k=config.k, capacity_factor=config.capacity_factor,
                         eval_capacity_factor=config.eval_capacity_factor, min_capacity=0,
                         noisy_gate_policy=None, drop_tokens=True, use_rts=False)
        self.config = config
        self.dropless_eval = config.eval_dropless
        nn.init.normal_(self.wg.weight, std=0.02)

    def capacity(self, num_tokens: int) -> int | None:
        if self.training:
            return routing.expert_capacity(num_tokens, self.num_experts, self.k, self.capacity_factor)
        if self.dropless_eval:
            return None
        return routing.expert_capacity(num_tokens, self.num_experts, self.k, self.eval_capacity_factor)

    @property
    def num_experts(self) -> int:
        return self.wg.weight.shape[0]

    def forward(self, input: torch.Tensor, used_token: torch.Tensor | None = None,
                sparse_routes: bool = True, use_tutel: bool = False):
        """`used_token` carries each token's modality id (routing.IMAGE/TEXT/IGNORE)."""
        if not sparse_routes or use_tutel:
            raise ValueError("LIMoEGate only supports DeepSpeed's sparse-route dispatch")
        modality = used_token
        if modality is None:
            modality = torch.zeros(input.shape[0], dtype=torch.long, device=input.device)
        logits = torch.nn.functional.linear(input.float(), self.wg.weight.float())
        probs = routing.router_probs(logits, self.config.noise_std, self.training)
        valid = modality != IGNORE
        routes = routing.assign_routes(probs, self.k, self.capacity(input.shape[0]),
                                       batch_priority=self.config.batch_priority_routing,
                                       valid=valid, renormalize=self.config.renormalize_gates)
        capacity = routes.capacity
        if self.ep_group is not None and dist.is_initialized() and dist.get_world_size(self.ep_group) > 1:
            # Every rank of an expert-parallel group must agree on the buffer size.
            c = torch.tensor(capacity, device=input.device)
            dist.all_reduce(c, op=dist.ReduceOp.MAX, group=self.ep_group)
            capacity = int(c.item())
        aux = self.aux(logits, probs, modality, routes)
        return (aux, capacity, self.num_experts, routes.expert.int(), routes.position.int(), routes.gate,
                routes.counts)

    def aux(self, logits, probs, modality, routes) -> dict:
        """Weighted aux loss for this layer, its unweighted terms and routing statistics."""
        total = probs.sum() * 0.0
        terms, stats = {}, {}
        for mid, name in enumerate(MODALITIES):
            sel = modality == mid
            weights = getattr(self.config, name)
            p = probs[sel]
            mterms = routing.modality_aux_losses(p, logits[sel], weights.global_entropy_experts)
            for term, value in mterms.items():
                terms[f"{name}/{term}"] = value
                total = total + getattr(weights, term) * value
            with torch.no_grad():
                routes_m = routes.expert[:, sel]
                kept = routes_m >= 0
                stats[name] = {
                    "tokens": sel.sum(),
                    "routes": torch.tensor(routes_m.numel(), device=probs.device),
                    "dropped": (~kept).sum(),
                    "assigned": torch.bincount(p.argmax(-1), minlength=self.num_experts)
                    if p.shape[0] else torch.zeros(self.num_experts, dtype=torch.long, device=probs.device),
                    "kept": torch.bincount(routes_m[kept], minlength=self.num_experts),
                    "entropy_sum": routing.entropy(p).sum(),
                }
        return {"loss": total, "terms": terms, "stats": stats}


class GroupedExperts(Experts):
    """DeepSpeed's expert container (same parameter names, so engine checkpoints
    work), computing all local experts with one batched matmul per weight."""

    def __init__(self, expert: nn.Module, num_local_experts: int, expert_group_name: str):
        super().__init__(expert, num_local_experts, expert_group_name)
        # deepcopy made identical experts; give each its own initialisation.
        for e in self.deepspeed_experts:
            for m in e.modules():
                if isinstance(m, nn.Linear):
                    m.reset_parameters()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        # inputs: [ep_size, num_local_experts, capacity, d] -> expert-major batches
        G, L, C, D = inputs.shape
        x = inputs.transpose(0, 1).reshape(L, G * C, D)
        y = type(self.deepspeed_experts[0]).grouped_forward(list(self.deepspeed_experts), x)
        return y.reshape(L, G, C, D).transpose(0, 1)


class LIMoELayer(MoE):
    """Mixture of `num_experts` copies of `expert`, routed by LIMoEGate."""

    def __init__(self, width: int, expert: nn.Module, config: MoEConfig, ep_size: int = 1):
        if config.num_experts % ep_size:
            raise ValueError(f"num_experts={config.num_experts} is not divisible by ep_size={ep_size}")
        super().__init__(hidden_size=width, expert=expert, num_experts=config.num_experts, ep_size=ep_size,
                         k=config.k, capacity_factor=config.capacity_factor,
                         eval_capacity_factor=config.eval_capacity_factor, min_capacity=0, use_rts=False)
        self.deepspeed_moe.gate = LIMoEGate(width, config)
        self.deepspeed_moe.experts = GroupedExperts(expert, self.num_local_experts, self.expert_group_name)

    @property
    def gate(self) -> LIMoEGate:
        return self.deepspeed_moe.gate

    def forward(self, x: torch.Tensor, modality: torch.Tensor):
        """x: [S, d] tokens of both modalities; modality: [S] ids. Returns (y, aux dict).

        Dropped routes contribute zero, so the caller's residual carries them on.
        """
        y = self.deepspeed_moe(x, modality)
        return y, self.deepspeed_moe.l_aux
