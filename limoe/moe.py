"""The LIMoE mixture-of-experts layer, built on DeepSpeed's MoE.

`LIMoELayer` is a `deepspeed.moe.layer.MoE`, so the DeepSpeed engine finds
it: experts live in expert-parallel groups (`ep_size`), their gradients are
reduced over the expert-data-parallel group, and engine checkpoints save
them per expert. Two parts are replaced:

- the gate, `LIMoEGate`, routes as LIMOE.md says (routing.py) and returns
  the 7-tuple DeepSpeed 0.19.8 expects with `sparse_routes=True`;
- the experts, `GroupedExperts`, run all local experts with batched matmuls
  instead of a Python loop over small ones;
- the dispatch, `ExpertDispatch` (a DeepSpeed `MOELayer`): tokens go into
  [E, C, d] expert buffers, through DeepSpeed's all-to-all over the
  expert-parallel group, and back, as in DeepSpeed, but every data movement,
  forward and backward, is a single row gather (`DispatchTokens`,
  `CombineExperts`). A slot holds at most one route, so the adjoint of each
  gather is again a gather: no zero-filled scatter-add, no padded copies.

Without a process group (ep_size=1) the layer runs as a plain module, for
inference, evaluation and the API.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from deepspeed.moe.experts import Experts
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import MOELayer, TopKGate, _AllToAll
from deepspeed.utils import groups
from deepspeed.utils.bwc import bwc_tensor_model_parallel_world_size

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
        # Group the tokens by modality with one sort and one host sync in all
        # (a boolean mask per modality and statistic would sync a GPU each time).
        ids = torch.arange(IGNORE, len(MODALITIES), device=modality.device)
        sizes = (modality.unsqueeze(1) == ids).sum(0).tolist()  # [IGNORE, IMAGE, TEXT]
        order = torch.argsort(modality, stable=True)
        start = sizes[0]
        for mid, name in enumerate(MODALITIES):
            index = order[start:start + sizes[mid + 1]]
            start += sizes[mid + 1]
            weights = getattr(self.config, name)
            p = probs.index_select(0, index)
            mterms = routing.modality_aux_losses(p, logits.index_select(0, index), weights.global_entropy_experts)
            for term, value in mterms.items():
                terms[f"{name}/{term}"] = value
                total = total + getattr(weights, term) * value
            with torch.no_grad():
                routes_m = routes.expert.index_select(1, index)
                kept = routes_m >= 0
                stats[name] = {
                    "tokens": torch.full((), index.numel(), dtype=torch.long, device=probs.device),
                    "routes": torch.full((), routes_m.numel(), dtype=torch.long, device=probs.device),
                    "dropped": (~kept).sum(),
                    "assigned": self.count_per_expert(p.argmax(-1)),
                    "kept": self.count_per_expert(routes_m, kept),
                    "entropy_sum": routing.entropy(p).sum(),
                }
        return {"loss": total, "terms": terms, "stats": stats}

    def count_per_expert(self, expert: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Like bincount(expert[mask], minlength=E), without a host sync."""
        ones = torch.ones_like(expert) if mask is None else mask.long()
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=expert.device)
        return counts.scatter_add_(0, expert.clamp_min(0).reshape(-1), ones.reshape(-1))


class GroupedExperts(Experts):
    """DeepSpeed's expert container (same parameter names, so engine checkpoints
    work). On CUDA all local experts run as one batched matmul per weight: one
    big kernel instead of E small ones keeps the GPU busy. On CPU they run one
    after another: each expert's [C, 4d] activations stay in cache, and no
    stacked copy of the weights is made (docs/benchmarks.md has the numbers).
    `batched=True/False` overrides the choice."""

    def __init__(self, expert: nn.Module, num_local_experts: int, expert_group_name: str,
                 batched: bool | None = None):
        super().__init__(expert, num_local_experts, expert_group_name)
        self.batched = batched
        # deepcopy made identical experts; give each its own initialisation.
        for e in self.deepspeed_experts:
            for m in e.modules():
                if isinstance(m, nn.Linear):
                    m.reset_parameters()

    def forward(self, inputs: torch.Tensor, filled: torch.Tensor | None = None) -> torch.Tensor:
        """inputs: [ep_size, num_local_experts, capacity, d]. `filled` [num_local_experts]
        (only with ep_size 1): expert e's slots past filled[e] are empty, so the loop skips
        them; dropless inference sizes every buffer for the busiest expert."""
        G, L, C, D = inputs.shape
        x = inputs.transpose(0, 1).reshape(L, G * C, D)
        if x.is_cuda if self.batched is None else self.batched:
            y = type(self.deepspeed_experts[0]).grouped_forward(list(self.deepspeed_experts), x)
            return y.reshape(L, G, C, D).transpose(0, 1)
        rows = [G * C] * L if filled is None or G != 1 else filled.tolist()
        # unbind, not x[i]: its backward stacks the E gradients once instead of
        # adding E full-size zero-padded ones.
        outs = []
        for xe, expert, n in zip(x.unbind(0), self.deepspeed_experts, rows):
            ye = expert(xe[:n]) if n < G * C else expert(xe)
            outs.append(ye if n == G * C else torch.cat([ye, ye.new_zeros(G * C - n, D)]))
        return torch.stack(outs).reshape(L, G, C, D).transpose(0, 1)


# ---------------------------------------------------------------------------
# Token dispatch. The [E * C] slots of the expert buffer and the [k, S] routes
# are matched one to one (dropped routes and empty slots are matched to
# nothing), so moving rows either way, and both backward passes, are gathers.


@dataclass
class SlotMap:
    """Which route fills each slot of the flat [E * C] expert buffer, and the inverse."""

    route_slot: torch.Tensor  # [k, S] slot of each route (0 where dropped)
    route_kept: torch.Tensor  # [k, S] bool
    slot_token: torch.Tensor  # [E * C] token that fills each slot (0 where empty)
    slot_filled: torch.Tensor  # [E * C] bool
    slot_gate: torch.Tensor  # [E * C] combine weight of the route in each slot (0 where empty)

    @classmethod
    def build(cls, expert: torch.Tensor, position: torch.Tensor, gate: torch.Tensor, num_experts: int,
              capacity: int) -> "SlotMap":
        k, num_tokens = expert.shape
        num_slots = num_experts * capacity
        kept = expert >= 0
        route_slot = torch.where(kept, expert.long() * capacity + position.long(), 0)
        # Dropped routes write to one scratch slot past the end, which is cut off.
        target = torch.where(kept, route_slot, num_slots).reshape(-1)
        token = torch.arange(num_tokens, device=expert.device).repeat(k)
        slot_token = torch.full((num_slots + 1,), -1, dtype=torch.long, device=expert.device)
        slot_token.scatter_(0, target, token)
        slot_gate = gate.new_zeros(num_slots + 1).scatter_(0, target, gate.detach().reshape(-1))
        slot_token = slot_token[:num_slots]
        filled = slot_token >= 0
        return cls(route_slot=route_slot, route_kept=kept, slot_token=slot_token.clamp_min(0),
                   slot_filled=filled, slot_gate=slot_gate[:num_slots])


class DispatchTokens(torch.autograd.Function):
    """buffer[slot] = x[token in slot]; empty slots are zero. x: [S, d] -> [E * C, d]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, slots: SlotMap) -> torch.Tensor:
        ctx.slots = slots
        return x.index_select(0, slots.slot_token).masked_fill_(~slots.slot_filled.unsqueeze(1), 0)

    @staticmethod
    def backward(ctx, grad_buffer: torch.Tensor):
        slots = ctx.slots
        grad_x = None
        for slot, kept in zip(slots.route_slot, slots.route_kept):  # k choices
            g = grad_buffer.index_select(0, slot).masked_fill_(~kept.unsqueeze(1), 0)
            grad_x = g if grad_x is None else grad_x.add_(g)
        return grad_x, None


class CombineExperts(torch.autograd.Function):
    """y[t] = sum over t's routes of gate * buffer[slot].

    buffer: [E * C, d] expert outputs; gate: [k, S] fp32 (receives a gradient),
    0 on dropped routes as LIMoEGate makes it, so a dropped token gets 0. With
    k > 1 the sum accumulates in fp32, as DeepSpeed's decode does.
    """

    @staticmethod
    def forward(ctx, buffer: torch.Tensor, gate: torch.Tensor, slots: SlotMap) -> torch.Tensor:
        ctx.slots = slots
        ctx.save_for_backward(buffer)
        if gate.shape[0] == 1:  # one route per token: gather, weight in place
            return buffer.index_select(0, slots.route_slot[0]).mul_(gate[0].unsqueeze(1))
        y = buffer.new_zeros(gate.shape[1], buffer.shape[1], dtype=torch.float32)
        for slot, g in zip(slots.route_slot, gate):
            y.addcmul_(buffer.index_select(0, slot), g.unsqueeze(1))
        return y.to(buffer.dtype)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        slots = ctx.slots
        (buffer,) = ctx.saved_tensors
        # The gradient each slot sees, before the gate: grad_y of the token in it.
        grad_slot = grad_y.index_select(0, slots.slot_token)
        grad_gate = None
        if ctx.needs_input_grad[1]:
            dot = (grad_slot.float() * buffer.float()).sum(-1)  # fp32, as DeepSpeed's decode
            grad_gate = torch.where(slots.route_kept, dot[slots.route_slot], 0.0)
        grad_buffer = grad_slot.mul_(slots.slot_gate.unsqueeze(1))  # empty slots: gate 0
        return grad_buffer.to(buffer.dtype), grad_gate, None


class ExpertDispatch(MOELayer):
    """DeepSpeed's MOELayer (gate, experts, all-to-all over the expert-parallel
    group) with the gather-only token dispatch above."""

    def forward(self, x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        if bwc_tensor_model_parallel_world_size(groups.mpu) > 1:
            raise ValueError("LIMoE experts do not support tensor model parallelism")
        d_model = x.shape[-1]
        tokens = x.reshape(-1, d_model)
        self.l_aux, capacity, num_experts, expert, position, gate, self.exp_counts = self.gate(tokens, modality)
        slots = SlotMap.build(expert, position, gate, num_experts, int(capacity))
        buffer = DispatchTokens.apply(tokens, slots)
        if self.ep_size > 1:
            buffer = _AllToAll.apply(self.ep_group, buffer.view(num_experts, -1, d_model))
        filled = self.exp_counts if self.ep_size == 1 else None
        out = self.experts(buffer.view(self.ep_size, self.num_local_experts, -1, d_model), filled)
        if self.ep_size > 1:
            out = _AllToAll.apply(self.ep_group, out.reshape(num_experts, -1, d_model))
        y = CombineExperts.apply(out.reshape(-1, d_model), gate, slots)
        return y.reshape(x.shape)


class LIMoELayer(MoE):
    """Mixture of `num_experts` copies of `expert`, routed by LIMoEGate."""

    def __init__(self, width: int, expert: nn.Module, config: MoEConfig, ep_size: int = 1):
        if config.num_experts % ep_size:
            raise ValueError(f"num_experts={config.num_experts} is not divisible by ep_size={ep_size}")
        super().__init__(hidden_size=width, expert=expert, num_experts=config.num_experts, ep_size=ep_size,
                         k=config.k, capacity_factor=config.capacity_factor,
                         eval_capacity_factor=config.eval_capacity_factor, min_capacity=0, use_rts=False)
        self.deepspeed_moe = ExpertDispatch(
            LIMoEGate(width, config), GroupedExperts(expert, self.num_local_experts, self.expert_group_name),
            self.expert_group_name, ep_size, self.num_local_experts)

    @property
    def gate(self) -> LIMoEGate:
        return self.deepspeed_moe.gate

    def forward(self, x: torch.Tensor, modality: torch.Tensor):
        """x: [S, d] tokens of both modalities; modality: [S] ids. Returns (y, aux dict).

        Dropped routes contribute zero, so the caller's residual carries them on.
        """
        y = self.deepspeed_moe(x, modality)
        return y, self.deepspeed_moe.l_aux
