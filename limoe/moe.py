"""The LIMoE mixture-of-experts layer, in plain PyTorch.

`LIMoELayer` has three parts:

- the gate, `LIMoEGate`, routes as docs/model.md says (routing.py): fp32
  router, noisy top-k, capacity from the routed tokens, Batch Priority
  Routing, per-modality auxiliary losses and statistics;
- the experts, `GroupedExperts`, run all local experts with batched matmuls
  on CUDA and one after another on CPU;
- the dispatch, in the layer itself:
  * with a capacity (training by default, or capacity-limited eval) tokens go into
    [E, C, d] expert buffers and back, and every data movement, forward and
    backward, is a single row gather (`DispatchTokens`, `CombineExperts`);
    the buffer size C is a function of the batch shape only, so
    expert-parallel ranks agree on it without talking and the step never
    waits for the GPU;
  * dropless (inference; training with `moe.train_dropless`): the routes
    are sorted by expert and each expert
    runs on exactly its rows (row slices on CPU, a grouped matmul on CUDA),
    so skewed routing costs what the routed tokens cost, not E times the
    busiest expert's buffer.

The layer knows nothing of other processes. With ep_size > 1 it holds
num_experts / ep_size experts, and launch/expert_parallel.py gives it the
exchange of tokens with the ranks that hold the others (`expert_parallel`)
and makes it the MoE layer DeepSpeed's engine looks for. Parameter names
follow DeepSpeed's MoE (`deepspeed_moe.gate.wg`,
`deepspeed_moe.experts.deepspeed_experts.<i>`): that is the checkpoint format
of exports and engine checkpoints.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import routing
from .config import MODALITIES, MoEConfig
from .routing import RouterOutput, Routes, TokenGroups


class LIMoEGate(nn.Module):
    """fp32 router with noisy top-k, capacity, BPR and per-modality aux losses.

    `wg` is named as in DeepSpeed's TopKGate, so checkpoints keep their names."""

    def __init__(self, width: int, config: MoEConfig):
        super().__init__()
        self.config = config
        self.k = config.k
        self.capacity_factor = config.capacity_factor
        self.eval_capacity_factor = config.eval_capacity_factor
        self.dropless_eval = config.eval_dropless
        self.dropless_train = config.train_dropless
        self.wg = nn.Linear(width, config.num_experts, bias=False)
        nn.init.normal_(self.wg.weight, std=0.02)

    @property
    def num_experts(self) -> int:
        return self.wg.weight.shape[0]

    def active_capacity_factor(self) -> float | None:
        """The capacity factor routing uses now; None when dropless (eval by default)."""
        if self.training:
            return None if self.dropless_train else self.capacity_factor
        return None if self.dropless_eval else self.eval_capacity_factor

    def buffer_capacity(self, num_tokens: int) -> int:
        """Slots per expert in the dispatch buffer: the capacity of `num_tokens` routed tokens,
        padding counted. A Python int of the batch shape, so every expert-parallel rank gets
        the same one without communication; the capacity routing enforces (from the tokens
        actually routed) is never larger."""
        return routing.expert_capacity(num_tokens, self.num_experts, self.k, self.active_capacity_factor())

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The clean fp32 router logits [S, E] of tokens x [S, d]."""
        return F.linear(x.float(), self.wg.weight.float())

    def forward(self, x: torch.Tensor, token_groups: TokenGroups) -> tuple[Routes, dict]:
        """Route the tokens x [S, d]. Returns the routes and this layer's aux dict
        (weighted loss, unweighted terms, statistics), all without a host sync."""
        logits = self.router_logits(x)
        router = routing.route_logits(logits, self.config.noise_std, self.training)
        factor = self.active_capacity_factor()
        capacity = None if factor is None else routing.expert_capacity_tensor(
            token_groups.num_routed, self.num_experts, self.k, factor)
        routes = routing.assign_routes(router.probs, self.k, capacity,
                                       batch_priority=self.config.batch_priority_routing,
                                       valid=token_groups.valid, renormalize=self.config.renormalize_gates,
                                       straight_through=self.config.straight_through_gates,
                                       first=token_groups.masks.get(self.config.priority_modality))
        return routes, self.aux(router, token_groups, routes)

    def aux(self, router: RouterOutput, token_groups: TokenGroups, routes: Routes) -> dict:
        """Weighted aux loss for this layer, its unweighted terms and routing statistics."""
        total = router.logits.sum() * 0.0
        terms, stats = {}, {}
        first_choice = router.probs.argmax(-1)
        kept = routes.expert >= 0  # [k, S]
        for name in MODALITIES:
            mask = token_groups.masks[name]
            weights = getattr(self.config, name)
            for term, value in routing.modality_aux_losses(router, self.k, weights.global_entropy_experts,
                                                           mask).items():
                terms[f"{name}/{term}"] = value
                if getattr(weights, term):
                    total = total + getattr(weights, term) * value
            with torch.no_grad():
                tokens = mask.sum()
                stats[name] = {
                    "tokens": tokens,
                    "routes": tokens * self.k,
                    "dropped": (~kept & mask).sum(),
                    "assigned": self.count_per_expert(first_choice, mask),
                    "kept": self.count_per_expert(routes.expert, kept & mask),
                    "entropy_sum": (routing.entropy(router.probs) * mask).sum(),
                }
        return {"loss": total, "terms": terms, "stats": stats}

    def count_per_expert(self, expert: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Like bincount(expert[mask], minlength=E), without a host sync."""
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=expert.device)
        mask = mask.expand_as(expert)
        return counts.scatter_add_(0, expert.clamp_min(0).reshape(-1), mask.reshape(-1).long())


class GroupedExperts(nn.Module):
    """The local experts. On CUDA they run as one batched matmul per weight: one
    big kernel instead of E small ones keeps the GPU busy. On CPU they run one
    after another: each expert's [C, 4d] activations stay in cache, and no
    stacked copy of the weights is made (docs/benchmarks.md has the numbers).
    `batched=True/False` overrides the choice."""

    def __init__(self, expert: nn.Module, num_local_experts: int, batched: bool | None = None):
        super().__init__()
        # The checkpoint format's name (DeepSpeed's Experts).
        self.deepspeed_experts = nn.ModuleList([copy.deepcopy(expert) for _ in range(num_local_experts)])
        self.num_local_experts = num_local_experts
        self.batched = batched
        # deepcopy made identical experts; give each its own initialisation.
        for e in self.deepspeed_experts:
            for m in e.modules():
                if isinstance(m, nn.Linear):
                    m.reset_parameters()

    def use_batched(self, x: torch.Tensor) -> bool:
        return x.is_cuda if self.batched is None else self.batched

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs: [source ranks, num_local_experts, capacity, d] -> the same shape."""
        G, L, C, D = inputs.shape
        x = inputs.transpose(0, 1).reshape(L, G * C, D)
        if self.use_batched(x):
            y = type(self.deepspeed_experts[0]).grouped_forward(list(self.deepspeed_experts), x)
        else:
            # unbind, not x[i]: its backward stacks the E gradients once instead of
            # adding E full-size zero-padded ones.
            y = torch.stack([expert(xe) for xe, expert in zip(x.unbind(0), self.deepspeed_experts)])
        return y.reshape(L, G, C, D).transpose(0, 1)

    def forward_rows(self, rows: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """rows [R, d] sorted by local expert, sizes[e] of them for expert e -> [R, d].
        Each expert computes exactly its rows: a grouped matmul on CUDA (bf16), slices elsewhere,
        in chunks of at most an even share of the rows, so a busy expert's activations take no
        more memory than a balanced router's would."""
        kind = type(self.deepspeed_experts[0])
        if self.use_batched(rows) and rows.dtype == torch.bfloat16 and hasattr(kind, "grouped_rows_forward"):
            return kind.grouped_rows_forward(list(self.deepspeed_experts), rows, sizes)
        chunk = max(256, -(-rows.shape[0] // max(1, len(sizes))))
        outs = [expert(piece) for xe, expert in zip(rows.split(sizes), self.deepspeed_experts)
                for piece in xe.split(chunk) if piece.shape[0]]
        return torch.cat(outs) if outs else rows.clone()


# ---------------------------------------------------------------------------
# Token dispatch with a capacity. The [E * C] slots of the expert buffer and the
# [k, S] routes are matched one to one (dropped routes and empty slots are matched
# to nothing), so moving rows either way, and both backward passes, are gathers.


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


# ---------------------------------------------------------------------------
# Dropless dispatch (inference, or training with moe.train_dropless): routes sorted
# by expert, no buffers.


@dataclass
class SortedRoutes:
    """The kept routes sorted by expert: route r reads token `token[r]`, is weighted by
    `gate[r]`, and `sizes[e]` consecutive routes belong to expert e."""

    token: torch.Tensor  # [R] int64
    gate: torch.Tensor  # [R] fp32
    sizes: list[int]  # [E] host ints: sorting for dropless routing reads the counts once

    @classmethod
    def build(cls, routes: Routes) -> "SortedRoutes":
        k, num_tokens = routes.expert.shape
        sizes = routes.counts.tolist()
        flat = routes.expert.reshape(-1)
        # Dropped (padding) routes have expert -1 and sort first; cut them off.
        order = torch.argsort(flat, stable=True)[flat.numel() - sum(sizes):]
        return cls(token=order % num_tokens, gate=routes.gate.reshape(-1)[order], sizes=sizes)

    def combine(self, rows: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """y[t] = sum over t's routes of gate * rows[route], accumulated in fp32."""
        y = rows.new_zeros(num_tokens, rows.shape[1], dtype=torch.float32)
        y.index_add_(0, self.token, rows.float() * self.gate.unsqueeze(1))
        return y.to(rows.dtype)


class LIMoELayer(nn.Module):
    """Mixture of `num_experts` copies of `expert`, routed by LIMoEGate; holds
    num_experts / ep_size of them (the expert-parallel rank's share)."""

    def __init__(self, width: int, expert: nn.Module, config: MoEConfig, ep_size: int = 1):
        super().__init__()
        if config.num_experts % ep_size:
            raise ValueError(f"num_experts={config.num_experts} is not divisible by ep_size={ep_size}")
        if config.train_dropless and ep_size > 1:
            raise ValueError(f"moe.train_dropless needs ep_size 1, got {ep_size}: the dropless exchange between "
                             "expert-parallel ranks has no backward. Train with a capacity factor, or without "
                             "expert parallelism")
        self.num_experts = config.num_experts
        self.ep_size = ep_size
        self.num_local_experts = config.num_experts // ep_size
        # The layer used to be a DeepSpeed MoE, whose constructor initialised a router it did not
        # keep; drawing the same random numbers keeps each seed's initial weights as they were.
        torch.empty(config.num_experts, width).uniform_()
        # The checkpoint format's name for the gate and experts (DeepSpeed MoE's).
        self.deepspeed_moe = nn.ModuleDict({"gate": LIMoEGate(width, config),
                                            "experts": GroupedExperts(expert, self.num_local_experts)})
        self.expert_parallel = None  # the exchange with the other ranks' experts, set from launch/

    @property
    def gate(self) -> LIMoEGate:
        return self.deepspeed_moe.gate

    @property
    def experts(self) -> GroupedExperts:
        return self.deepspeed_moe.experts

    def forward(self, x: torch.Tensor, token_groups: TokenGroups | torch.Tensor) -> tuple[torch.Tensor, dict]:
        """x: [S, d] tokens of both modalities; `token_groups` from their modality ids (or the
        [S] ids themselves). Returns (y, this layer's aux dict: weighted loss, unweighted terms,
        statistics).

        Dropped routes contribute zero, so the caller's residual carries them on. The aux dict is
        returned, not kept on the module: with gradient checkpointing the recomputation stops
        early, so a kept one would hold the recomputed router graph alive until the next forward.
        """
        if self.ep_size > 1 and self.expert_parallel is None:
            raise RuntimeError(f"this MoE layer holds {self.num_local_experts} of {self.num_experts} experts "
                               f"(ep_size {self.ep_size}): launch.expert_parallel must give it its "
                               "expert-parallel group first")
        if isinstance(token_groups, torch.Tensor):
            token_groups = TokenGroups.from_modality(token_groups)
        tokens = x.reshape(-1, x.shape[-1])
        routes, aux = self.gate(tokens, token_groups)
        if routes.capacity is None:
            y = self.dropless(tokens, routes)
        else:
            y = self.with_capacity(tokens, routes)
        return y.reshape(x.shape), aux

    def with_capacity(self, tokens: torch.Tensor, routes: Routes) -> torch.Tensor:
        d_model = tokens.shape[-1]
        slots = SlotMap.build(routes.expert, routes.position, routes.gate, self.num_experts,
                              self.gate.buffer_capacity(tokens.shape[0]))
        buffer = DispatchTokens.apply(tokens, slots)
        if self.expert_parallel is None:
            out = self.experts(buffer.view(1, self.num_local_experts, -1, d_model))
        else:
            out = self.expert_parallel.run_buffer(self.experts, buffer.view(self.num_experts, -1, d_model))
        return CombineExperts.apply(out.reshape(-1, d_model), routes.gate, slots)

    def dropless(self, tokens: torch.Tensor, routes: Routes) -> torch.Tensor:
        """Every route reaches its expert; each expert computes exactly its rows."""
        sorted_routes = SortedRoutes.build(routes)
        rows = tokens.index_select(0, sorted_routes.token)
        if self.expert_parallel is None:
            out = self.experts.forward_rows(rows, sorted_routes.sizes)
        else:
            out = self.expert_parallel.run_rows(self.experts, rows, sorted_routes.sizes, routes.counts)
        return sorted_routes.combine(out, tokens.shape[0])
