"""Expert parallelism, applied to a built model from outside it (torchtitan's `parallelize`).

limoe/moe.py's `LIMoELayer` is plain PyTorch and runs its local experts only.
For training, `apply_expert_parallel` turns each MoE layer, in place, into a
`DeepSpeedMoELayer`: its class changes (as FSDP2's `fully_shard` changes a
module's), so it is the same module with the same gate, experts and
parameter names, and now also a `deepspeed.moe.layer.MoE`. DeepSpeed's engine
finds it by that class: `deepspeed.initialize` calls its
`set_deepspeed_parallelism`, which makes the expert-parallel and
expert-data-parallel groups and gives the layer its `ExpertParallel`; the
expert parameters carry DeepSpeed's `allreduce=False` and `group_name`, so
their gradients are reduced over the expert-data-parallel group and the
optimizer keeps them in groups of their own; engine checkpoints save them one
file per global expert.

`ExpertParallel` moves the tokens between the ranks of a group, each holding
num_experts / ep_size experts: all-to-all of the [E, C, d] buffers (training,
with a backward) and, for dropless inference, of the routed rows with per-rank
sizes (no padding).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from deepspeed.utils.bwc import bwc_tensor_model_parallel_world_size

from limoe.moe import GroupedExperts, LIMoELayer


class AllToAll(torch.autograd.Function):
    """all_to_all_single in equal parts over `group`; the backward is the same exchange."""

    @staticmethod
    def forward(ctx, group, x: torch.Tensor) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, AllToAll.apply(ctx.group, grad)


def exchange_rows(rows: torch.Tensor, send_sizes: list[int], recv_sizes: list[int], group) -> torch.Tensor:
    """all_to_all with per-rank sizes: rows[sum(send_sizes[:q]) : ...] go to rank q."""
    out = rows.new_empty(sum(recv_sizes), rows.shape[1])
    dist.all_to_all_single(out, rows.contiguous(), output_split_sizes=recv_sizes,
                           input_split_sizes=send_sizes, group=group)
    return out


class ExpertParallel:
    """A MoE layer's way to the experts of the `size` ranks of `group` (rank q holds global
    experts q * local .. (q + 1) * local - 1)."""

    def __init__(self, group, size: int):
        self.group = group
        self.size = size

    def run_buffer(self, experts: GroupedExperts, buffer: torch.Tensor) -> torch.Tensor:
        """buffer [E, C, d], this rank's slots for every global expert -> the experts' outputs, same layout."""
        num_experts, _, d_model = buffer.shape
        received = AllToAll.apply(self.group, buffer)
        out = experts(received.view(self.size, experts.num_local_experts, -1, d_model))
        return AllToAll.apply(self.group, out.reshape(num_experts, -1, d_model))

    def run_rows(self, experts: GroupedExperts, rows: torch.Tensor, sizes: list[int],
                 counts: torch.Tensor) -> torch.Tensor:
        """Rows sorted by global expert, sizes[e] (= counts[e]) for expert e -> the ranks that hold
        the experts -> back, with per-rank sizes (no padding). Inference only: the exchange has no
        backward."""
        if torch.is_grad_enabled() and rows.requires_grad:
            raise RuntimeError("dropless routing across an expert-parallel group is for inference: "
                               "run it under torch.no_grad(), or train with a capacity factor")
        ep, local = self.size, experts.num_local_experts
        # recv_counts[q, e]: rows rank q sends to this rank's local expert e.
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts.contiguous(), group=self.group)
        recv = recv_counts.view(ep, local).tolist()
        send_sizes = [sum(sizes[q * local:(q + 1) * local]) for q in range(ep)]
        recv_sizes = [sum(r) for r in recv]
        received = exchange_rows(rows, send_sizes, recv_sizes, self.group)
        # Received rows come grouped by source rank, then by local expert: regroup by expert.
        starts, start = [], 0
        for q in range(ep):
            starts.append([])
            for e in range(local):
                starts[q].append(start)
                start += recv[q][e]
        index = torch.cat([torch.arange(starts[q][e], starts[q][e] + recv[q][e])
                           for e in range(local) for q in range(ep)]).to(rows.device)
        expert_sizes = [sum(recv[q][e] for q in range(ep)) for e in range(local)]
        out = experts.forward_rows(received.index_select(0, index), expert_sizes)
        back = torch.empty_like(out).index_copy_(0, index, out)
        return exchange_rows(back, recv_sizes, send_sizes, self.group)


class DeepSpeedMoELayer(LIMoELayer, MoE):
    """A LIMoELayer that DeepSpeed's engine takes for one of its MoE layers. Made by
    `as_deepspeed_moe` from a built layer, never constructed (MoE.__init__ does not run)."""

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by deepspeed.initialize: the groups, as MoE makes them, and the layer's exchange."""
        if bwc_tensor_model_parallel_world_size(groups.mpu) > 1:
            raise ValueError("LIMoE experts do not support tensor model parallelism")
        if self.expert_group_name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(
                self.ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel_)
        if self.ep_size > 1:
            self.expert_parallel = ExpertParallel(groups._get_expert_parallel_group(self.expert_group_name),
                                                  self.ep_size)


def as_deepspeed_moe(layer: LIMoELayer) -> DeepSpeedMoELayer:
    """Make `layer` a DeepSpeedMoELayer in place (same parameters, same names); returns it."""
    layer.__class__ = DeepSpeedMoELayer
    # What DeepSpeed's engine, checkpointing and optimizer helpers read of an MoE layer and its experts.
    layer.expert_group_name = f"ep_size_{layer.ep_size}"
    layer.enable_expert_tensor_parallelism = False
    for param in layer.experts.parameters():
        param.allreduce = False
        param.group_name = layer.expert_group_name
    return layer


def apply_expert_parallel(model):
    """Every MoE layer of `model` becomes a DeepSpeedMoELayer; call it before building the optimizer's
    parameter groups and before deepspeed.initialize (both read what it sets). Returns the model."""
    for layer in model.moe_layers():
        as_deepspeed_moe(layer)
    return model
