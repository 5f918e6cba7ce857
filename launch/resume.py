"""Resuming a run from a checkpoint, on the layout that wrote it or on another one.

A checkpoint's layout is (world size, ep_size, ZeRO stage). On the same layout
DeepSpeed's `engine.load_checkpoint` restores everything. On another one (a node
lost, 8 GPUs grown to 16, ep_size changed) DeepSpeed 0.19.8 cannot: its ZeRO
loader refuses a different data-parallel world size, and its universal-checkpoint
converter (`deepspeed.checkpoint.ds_to_universal`) does not support native MoE
layers: it merges the expert shards of different expert-parallel ranks, which
share local parameter names, into one tensor (and fails on the shapes). So the
elastic path here reshards itself:

1. Weights: `engine.load_checkpoint(load_optimizer_states=False)`. DeepSpeed
   reads the non-expert weights, and each rank reads the expert files of the
   experts it now owns (they are stored per global expert id, whatever the
   ep_size that wrote them); also the LR scheduler and the engine's step counters.
2. Optimizer: every old rank's ZeRO file holds its flat fp32 partition of each
   parameter group, the AdamW moments of that partition, and a map from
   parameter name to the fragment of the partition it occupies
   (`param_slice_mappings`). A parameter's fragments, in the order of the ranks
   of its data-parallel group, are the parameter flattened. Expert parameters
   are named with local ids on their expert-parallel rank (old rank % old
   ep_size), renamed to global ids here. Each new rank copies, for the part of
   each parameter its ZeRO partition holds, the fp32 master weight and both
   moments from the old fragments that cover it (memory-mapped files: a rank
   reads only what it needs), and the step count.
3. Check: the module weights (read by DeepSpeed from the model files) must
   equal the restored fp32 master weights rounded to the module's dtype,
   parameter by parameter; any difference is an error, not a warning.

Where the optimizer state cannot be moved (a checkpoint written with ZeRO stage
0, whose optimizer files are per expert-parallel rank and unnamed), the
weights and schedule are still restored, the optimizer starts from zero
moments, and the log says so with a warning.

The data position: `TrainState` (optimizer steps, the data epoch and the
micro-batches drawn in it per rank, samples seen) is restored as saved. The
schedule is a function of the optimizer step only, so the learning rate
continues. Each rank's samples are drawn from a stream seeded by (seed, data
epoch, rank, worker), so with a new world size the ranks draw new, equally
random samples of the same epoch; what is kept is the position in steps: the
epoch ends at the same optimizer step as it would have (the next periodic
checkpoint), and `samples_seen` continues from the saved count.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from limoe.checkpoint import EXPERT_KEY

from .export import CLIENT_KEY, MODEL_STATES

log = logging.getLogger("limoe.train")

ZERO_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed here; the message says why."""


@dataclass(frozen=True)
class Layout:
    world_size: int
    ep_size: int
    zero_stage: int

    def describe(self) -> str:
        return f"{self.world_size} rank(s), ep_size {self.ep_size}, ZeRO {self.zero_stage}"


def _torch_load(path: Path) -> dict:
    """A checkpoint file of our own training, memory-mapped (only the tensors used are read);
    weights_only with the three DeepSpeed classes its optimizer files contain allowed."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    try:
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated, or not written by our training
        raise ResumeError(f"{path}: unreadable checkpoint file ({type(e).__name__}: {e})") from e


def saved_state(folder: Path) -> dict:
    """Our client state (TrainState fields, model config, layout) from a checkpoint folder."""
    states = _torch_load(folder / MODEL_STATES)
    client = states.get(CLIENT_KEY)
    if not isinstance(client, dict):
        raise ResumeError(f"{folder / MODEL_STATES}: no '{CLIENT_KEY}' client state (not written by limoe training)")
    client = dict(client)
    client.setdefault("zero_stage", states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    return client


def saved_layout(client: dict) -> Layout:
    return Layout(int(client["world_size"]), int(client["ep_size"]), int(client["zero_stage"]))


def load_checkpoint(engine, load_dir: Path, tag: str, layout: Layout, num_experts: int) -> dict:
    """Restore `engine` from checkpoint `load_dir/tag`; returns our client state.

    The same layout: DeepSpeed's own load. Another one: the elastic path above."""
    folder = Path(load_dir) / tag
    client = saved_state(folder)
    old = saved_layout(client)
    if old == layout:
        path, _ = engine.load_checkpoint(str(load_dir), tag=tag)
        if path is None:
            raise ResumeError(f"could not load checkpoint {folder}")
        return client
    log.warning("checkpoint %s was written by %s; this run has %s: resharding", folder, old.describe(),
                layout.describe())
    path, _ = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=False,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise ResumeError(f"could not load checkpoint {folder}")
    restore_lr(engine)
    zero_files = sorted_zero_files(folder)
    if not zero_files:
        log.warning("checkpoint %s has no ZeRO optimizer files (written with ZeRO stage 0): its AdamW state "
                    "cannot be resharded; the weights and schedule are restored, the optimizer STARTS AGAIN "
                    "from zero moments", folder)
        return client
    if len(zero_files) != old.world_size:
        raise ResumeError(f"checkpoint {folder} has {len(zero_files)} ZeRO optimizer files for "
                          f"{old.world_size} ranks (incomplete?)")
    restored = restore_optimizer(engine, zero_files, old.ep_size, num_experts)
    log.info("resharded checkpoint %s onto %s: fp32 master weights, AdamW moments and step (%d) of %d "
             "parameter(s) restored; module weights equal the master weights", folder, layout.describe(),
             restored["step"], restored["parameters"])
    return client


def restore_lr(engine) -> None:
    """The scheduler's state is loaded, but the optimizer's groups still hold the rate of step 0
    (normally they come back with the optimizer state): give them the scheduler's current rates."""
    scheduler = engine.lr_scheduler
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr


def sorted_zero_files(folder: Path) -> list[Path]:
    """The ZeRO optimizer files of a checkpoint, in the order of the ranks that wrote them."""
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := ZERO_FILE.match(p.name))]
    ranks = sorted(r for r, _ in found)
    if ranks != list(range(len(ranks))):
        raise ResumeError(f"checkpoint {folder}: ZeRO optimizer files for ranks {ranks} (expected 0..{len(ranks) - 1})")
    return [p for _, p in sorted(found)]


def global_name(name: str, ep_rank: int, ep_size: int, num_experts: int) -> str:
    """An expert parameter's name with its global expert id (names of the others unchanged)."""
    m = EXPERT_KEY.match(name)
    if m is None:
        return name
    return f"{m.group(1)}{ep_rank * (num_experts // ep_size) + int(m.group(2))}{m.group(3)}"


@dataclass
class Fragment:
    """A piece of one parameter (flattened) held by one old rank: `numel` values at `offset` in
    the parameter, at `start` in that rank's flat partition of group `group`."""

    rank: int
    group: int
    start: int
    numel: int
    offset: int = 0


class OldOptimizerState:
    """The ZeRO files of the ranks that wrote a checkpoint, indexed by global parameter name."""

    def __init__(self, zero_files: list[Path], ep_size: int, num_experts: int):
        self.partitions = []  # per old rank, per group: {"fp32", "exp_avg", "exp_avg_sq"} flat tensors
        self.fragments: dict[str, list[Fragment]] = {}
        steps = set()
        for rank, path in enumerate(zero_files):
            state = _torch_load(path).get("optimizer_state_dict", {})
            try:
                fp32 = state["single_partition_of_fp32_groups"]
                base = state["base_optimizer_state"]["state"]
                mappings = state["param_slice_mappings"]
            except (KeyError, TypeError) as e:
                raise ResumeError(f"{path}: not a ZeRO stage 1/2 optimizer file (missing {e})") from e
            groups = []
            for g, flat in enumerate(fp32):
                moments = base.get(g, {})
                if "exp_avg" not in moments:  # saved before the first optimizer step
                    raise ResumeError(f"{path}: group {g} has no AdamW state")
                groups.append({"fp32": flat, "exp_avg": moments["exp_avg"], "exp_avg_sq": moments["exp_avg_sq"]})
                steps.add(float(moments["step"]))
            self.partitions.append(groups)
            for g, mapping in enumerate(mappings):
                for name, address in mapping.items():
                    key = global_name(name, rank % ep_size, ep_size, num_experts)
                    self.fragments.setdefault(key, []).append(Fragment(rank, g, address.start, address.numel))
        if len(steps) != 1:
            raise ResumeError(f"the ranks' optimizer files disagree on the step count: {sorted(steps)}")
        self.step = steps.pop()
        for pieces in self.fragments.values():  # rank order = order of the pieces in the parameter
            offset = 0
            for piece in pieces:
                piece.offset = offset
                offset += piece.numel

    def numel(self, name: str) -> int:
        pieces = self.fragments.get(name)
        return pieces[-1].offset + pieces[-1].numel if pieces else 0

    def read(self, name: str, key: str, start: int, numel: int) -> torch.Tensor:
        """Values [start, start + numel) of the flattened parameter `name`'s `key` state."""
        out = torch.empty(numel, dtype=torch.float32)
        filled = 0
        for piece in self.fragments[name]:
            lo, hi = max(start, piece.offset), min(start + numel, piece.offset + piece.numel)
            if lo >= hi:
                continue
            flat = self.partitions[piece.rank][piece.group][key]
            out[lo - start:hi - start] = flat[piece.start + lo - piece.offset:piece.start + hi - piece.offset]
            filled += hi - lo
        if filled != numel:
            raise ResumeError(f"{name}: the checkpoint's optimizer files cover {filled} of {numel} values")
        return out


def zero_groups(optimizer):
    """(flat fp32 partitions, lists of module parameters) of a DeepSpeed ZeRO 1/2 or bf16 optimizer."""
    if hasattr(optimizer, "single_partition_of_fp32_groups"):
        return optimizer.single_partition_of_fp32_groups, optimizer.bit16_groups
    if hasattr(optimizer, "fp32_groups_flat_partition"):
        return optimizer.fp32_groups_flat_partition, optimizer.bf16_groups
    return None


def restore_optimizer(engine, zero_files: list[Path], old_ep_size: int, num_experts: int) -> dict:
    """Copy the old ranks' fp32 master weights and AdamW state into this rank's optimizer."""
    from deepspeed.utils import groups as ds_groups

    old = OldOptimizerState(zero_files, old_ep_size, num_experts)
    names = {p: n for n, p in engine.module.named_parameters()}
    moe_layers = engine.module.moe_layers()
    ep_size = engine.module.moe_layers()[0].ep_size if moe_layers else 1
    ep_rank = ds_groups._get_expert_parallel_rank(moe_layers[0].expert_group_name) if ep_size > 1 else 0

    def key_of(param) -> str:
        name = global_name(names[param], ep_rank, ep_size, num_experts)
        if old.numel(name) != param.numel():
            raise ResumeError(f"{name}: {old.numel(name)} values in the checkpoint's optimizer files, "
                              f"{param.numel()} in this model (a different model config?)")
        return name

    optimizer = engine.optimizer
    base = getattr(optimizer, "optimizer", optimizer)
    step = torch.tensor(old.step)
    layout = zero_groups(optimizer)
    count = 0
    if layout is not None:
        flats, params_per_group = layout
        for flat, params in zip(flats, params_per_group):
            moments = {"exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
            for param in params:
                mapping = param._hp_mapping
                if mapping is None:  # no part of this parameter in this rank's partition
                    continue
                name = key_of(param)
                lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
                mapping.hp_fragment.data.copy_(old.read(name, "fp32", lp.start, lp.numel))
                for key, buffer in moments.items():
                    buffer.narrow(0, hp.start, hp.numel).copy_(old.read(name, key, lp.start, lp.numel))
                module_part = param.data.flatten().narrow(0, lp.start, lp.numel)
                if not torch.equal(module_part, mapping.hp_fragment.data.to(param.dtype)):
                    raise ResumeError(f"{name}: the module weights in the checkpoint differ from its fp32 master "
                                      "weights in the optimizer files (files of different checkpoints mixed?)")
                count += 1
            base.state[flat] = {"step": step.clone(), **moments}
        optimizer._hp_optimizer_states_linked = False  # DeepSpeed links the moments to the parameters lazily
    elif isinstance(base, torch.optim.Optimizer):  # ZeRO stage 0: the torch optimizer on the full parameters
        for group in base.param_groups:
            for param in group["params"]:
                name = key_of(param)
                state = {key: old.read(name, key, 0, param.numel()).view_as(param).to(param.dtype)
                         for key in ("exp_avg", "exp_avg_sq")}
                if not torch.equal(param.data, old.read(name, "fp32", 0, param.numel()).view_as(param).to(param.dtype)):
                    raise ResumeError(f"{name}: the module weights in the checkpoint differ from its fp32 master "
                                      "weights in the optimizer files (files of different checkpoints mixed?)")
                base.state[param] = {"step": step.clone(), **state}
                count += 1
    else:
        raise ResumeError(f"cannot reshard into a {type(optimizer).__name__} optimizer")
    return {"step": int(old.step), "parameters": count}
