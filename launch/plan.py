"""`limoe plan CONFIG`: what a training config needs on each device, before anything is launched.

For a training config (with the same overrides `limoe train` takes) and a device memory
size, the plan gives per device (rank):

- parameters: non-expert ones, replicated on every rank, and expert ones, sharded over
  the expert-parallel group (each rank holds num_experts / ep_size experts of every MoE layer);
- model states under ZeRO 0, 1 and 2 with DeepSpeed's semantics: stage 1 partitions the
  optimizer states, stage 2 also the gradients; weights are never partitioned (stage 3 is
  not supported with MoE). Non-expert parameters are partitioned over all world_size ranks,
  expert parameters over their expert-data-parallel group of world_size / ep_size ranks;
- bytes per parameter: bf16 weights 2 + gradients 2 + optimizer 12 (DeepSpeed's fp32
  master copy + AdamW's two fp32 moments); fp32 weights 4 + gradients 4 + optimizer 8
  under ZeRO 0 (torch AdamW updates the weights themselves) or 12 under ZeRO 1/2
  (DeepSpeed keeps an fp32 copy of the partition even for an fp32 model);
- DeepSpeed's gradient reduce buckets (ds_config reduce_bucket_size elements, twice with
  overlap_comm), allocated during the backward under ZeRO 1/2;
- activations at the configured per-device batch, with and without gradient checkpointing
  (limoe.flops.activation_bytes counts what the model keeps: attention, MLPs, the MoE
  router and [E, C, d] dispatch buffers at the training capacity factor, image patches and
  text tokens), plus the backward's workspace;
- the peak: the largest of three moments of a step (the start of the backward, the gradient
  reduction at its end, the optimizer step), each the sum of what is alive then;
- all-to-all bytes per step, FLOPs per step and the step time at a given utilisation.

It says whether the peak fits the device and, if not, what to change, with the numbers.
benchmarks/plan_check.py compares the predicted peaks with measured ones on CPU.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass

# A share of device memory the plan leaves free: the CUDA context, NCCL buffers and the
# allocator's fragmentation on a GPU; Python, torch and DeepSpeed themselves on a CPU.
RESERVE = 0.10
# Dense BF16 tensor-core peak of an H100 / H200 SXM (no sparsity): the default for bf16 plans.
H100_BF16_TFLOPS = 989.0
FP32_MASTER = MOMENT = 4  # bytes: DeepSpeed's fp32 master copy; each of AdamW's two fp32 moments
ENGINE_ALLREDUCE_ELEMENTS = int(5e8)  # DeepSpeed's engine all-reduces ZeRO 0 gradients in flat buffers this big
UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
         "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


def parse_size(text: str) -> int:
    """'80GB' -> 80e9 bytes, '24GiB' -> 24 * 2**30 (decimal GB, binary GiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]I?B|B)?\s*", str(text), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"not a memory size: {text!r} (write e.g. 80GB or 24GiB)")
    return int(float(m.group(1)) * UNITS[(m.group(2) or "").upper()])


def human_bytes(n: float) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}" if abs(n) < 10 * div else f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"


def human_count(n: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


# -- what the arithmetic needs ----------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """One training setup, reduced to what memory, communication and FLOPs depend on."""

    model: object  # LIMoEConfig
    nonexpert_params: int  # parameters every rank holds (router weights included)
    expert_params: int  # all experts of all MoE layers together (ep_size 1)
    batch: int  # pairs per device per micro-batch
    accum_freq: int
    num_procs: int  # ranks per node
    num_nodes: int
    ep_size: int
    zero_stage: int
    precision: str  # fp32 | bf16
    grad_checkpointing: bool
    device: str  # cpu | cuda
    reduce_bucket_size: int = int(5e8)  # elements (DeepSpeed's default)
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    communication_bytes: int | None = None  # bytes per element of the gradient reduction; None = grad dtype

    @property
    def world_size(self) -> int:
        return self.num_procs * self.num_nodes

    @property
    def element_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4

    @property
    def batched_experts(self) -> bool:
        return self.device == "cuda"  # GroupedExperts batches the experts on CUDA, loops on CPU

    def replace(self, **changes) -> "Setup":
        return dataclasses.replace(self, **changes)


def parameter_counts(model_config) -> dict:
    """limoe.flops.count_parameters of the model, built on the meta device (no memory)."""
    import torch

    from limoe.flops import count_parameters
    from limoe.model import LIMoE

    with torch.device("meta"):
        model = LIMoE(model_config)
    return count_parameters(model)


def setup_from_config(config) -> tuple[Setup, list[str]]:
    """A Setup from a checked TrainConfig, and notes on what was assumed."""
    from pathlib import Path

    from .ds_config import build_ds_config

    notes = []
    vocab = context = None
    if config.data.tokenizer and Path(config.data.tokenizer).is_file():
        from limoe.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(config.data.tokenizer)
        vocab, context = tokenizer.vocab_size, tokenizer.context_length
        notes.append(f"vocabulary {vocab} and context {context} from the tokenizer {config.data.tokenizer}")
    else:
        vocab = config.data.tokenizer_vocab_size
        notes.append(f"vocabulary {vocab} (data.tokenizer_vocab_size: `limoe train` trains that tokenizer)")
    model_config = copy.copy(config).fit_tokenizer(vocab, context)  # planning leaves `config` as it was
    params = parameter_counts(model_config)
    p = config.parallel
    device = p.accelerator
    if device == "auto":
        device = "cuda" if config.train.precision == "bf16" else "cpu"
        notes.append(f"parallel.accelerator is auto: planned for {device} (from train.precision)")
    ds = build_ds_config(config)
    zero = ds.get("zero_optimization", {})
    comm = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2}.get(str(ds.get("communication_data_type")))
    setup = Setup(
        model=model_config, nonexpert_params=params["total"] - params["experts"], expert_params=params["experts"],
        batch=config.train.batch_size, accum_freq=config.train.accum_freq, num_procs=p.num_procs,
        num_nodes=p.num_nodes, ep_size=p.ep_size, zero_stage=p.zero_stage, precision=config.train.precision,
        grad_checkpointing=config.train.grad_checkpointing, device=device,
        reduce_bucket_size=int(zero.get("reduce_bucket_size", 5e8)),
        overlap_comm=bool(zero.get("overlap_comm", False)),
        contiguous_gradients=bool(zero.get("contiguous_gradients", True)), communication_bytes=comm)
    return setup, notes


# -- memory ------------------------------------------------------------------------------------


def model_state_bytes(s: Setup) -> dict:
    """Weights, gradients and optimizer states on one rank, split into non-expert and expert.

    Returns {"nonexpert": {...}, "expert": {...}} with parameters (held), partition (the
    share this rank's optimizer updates), weights, gradients and optimizer bytes.
    """
    groups = {
        # name: (parameters on this rank, size of the group its ZeRO partitions are taken over)
        "nonexpert": (s.nonexpert_params, s.world_size),
        "expert": (s.expert_params // s.ep_size, s.world_size // s.ep_size),
    }
    b = s.element_bytes
    # fp32 under ZeRO 0: torch AdamW steps the fp32 weights in place; otherwise DeepSpeed's fp32 copy.
    optimizer_per_param = 2 * MOMENT + (0 if s.precision == "fp32" and s.zero_stage == 0 else FP32_MASTER)
    out = {}
    for name, (held, dp) in groups.items():
        partition = math.ceil(held / dp)
        out[name] = {
            "parameters": held,
            "partition_over": dp,
            "partition": partition,
            "weights": held * b,
            "gradients": (partition if s.zero_stage >= 2 else held) * b,
            "optimizer": (partition if s.zero_stage >= 1 else held) * optimizer_per_param,
        }
    return out


def reduce_bucket_bytes(s: Setup) -> tuple[int, int]:
    """(allocated, touched) bytes of DeepSpeed's gradient reduce buckets under ZeRO 1/2.

    DeepSpeed allocates reduce_bucket_size elements of the gradient dtype (two with
    overlap_comm) at the first gradient of a step. A GPU commits all of it; on a CPU only
    the pages the gradients are copied into become resident (at most the rank's gradients).
    """
    if s.zero_stage == 0 or not s.contiguous_gradients:
        return 0, 0
    buffers = 2 if s.overlap_comm else 1
    held = s.nonexpert_params + s.expert_params // s.ep_size
    allocated = buffers * s.reduce_bucket_size * s.element_bytes
    touched = buffers * min(s.reduce_bucket_size, held) * s.element_bytes
    return allocated, touched


def activation_plan(s: Setup, grad_checkpointing: bool | None = None) -> dict:
    from limoe.flops import activation_bytes

    ckpt = s.grad_checkpointing if grad_checkpointing is None else grad_checkpointing
    return activation_bytes(s.model, s.batch, dtype_bytes=s.element_bytes, grad_checkpointing=ckpt,
                            batched_experts=s.batched_experts, ep_size=s.ep_size, world_size=s.world_size)


def memory_plan(s: Setup) -> dict:
    """Every memory term on one rank and the peak of a training step.

    The peak is the largest of three moments, each the sum of what is alive then:
      backward   weights + optimizer + buckets + activations (kept + the backward's worst
                 block) + the gradients that already exist then (see live_grads);
      reduction  weights + optimizer + all gradients + buckets + the filled bucket's copy
                 in the communication dtype (ds_config communication_data_type); under
                 ZeRO 0 the engine's flat copy of the gradients instead of the bucket;
      step       weights + optimizer + gradients + the fp32 gradient partition DeepSpeed
                 hands the optimizer and AdamW's temporary (ZeRO 1/2), or AdamW's
                 temporaries (ZeRO 0).
    Whatever the activations leave alive after the backward (`held_after_backward` of
    limoe.flops.activation_bytes; nothing, since the MoE layer stopped keeping its aux loss)
    is added to the reduction and step moments.
    """
    states = model_state_bytes(s)
    weights = sum(g["weights"] for g in states.values())
    gradients = sum(g["gradients"] for g in states.values())
    optimizer = sum(g["optimizer"] for g in states.values())
    partition = sum(g["partition"] for g in states.values())
    held = sum(g["parameters"] for g in states.values())
    buckets, buckets_touched = reduce_bucket_bytes(s)
    act = activation_plan(s)
    # Gradients alive during the backward: a gradient-accumulation window's, or nearly all of them
    # when checkpointing recomputes the first blocks last; ZeRO 2 moves each into the reduce bucket
    # as it is made and keeps only its partition once a full bucket has been reduced.
    spills = s.zero_stage >= 2 and s.reduce_bucket_size < held
    live_grads = gradients if (s.accum_freq > 1 or s.grad_checkpointing or spills) else 0
    if s.zero_stage >= 1:
        filled = min(s.reduce_bucket_size, held) if buckets else 0  # the bucket's contents at the reduction
        flat_copy = 0
    else:  # the engine flattens the gradients into up to 5e8-element buffers to all-reduce them
        filled = min(ENGINE_ALLREDUCE_ELEMENTS, held) if s.world_size > 1 else 0
        flat_copy = filled * s.element_bytes
    comm_copy = filled * s.communication_bytes if s.communication_bytes not in (None, s.element_bytes) else 0
    if s.zero_stage >= 1:
        step_workspace = partition * (4 + 4)  # fp32 gradient partition + AdamW's sqrt(v) temporary
    else:
        step_workspace = held * 4 if s.device == "cuda" else 0  # foreach AdamW on CUDA; per tensor on CPU
        if s.precision == "bf16":
            step_workspace += held * 4  # DeepSpeed's fp32 gradient copy for its fp32 master weights
    base = weights + optimizer
    stale = act["held_after_backward"]
    phases = {
        "backward": base + buckets + act["peak"] + live_grads,
        "reduction": base + gradients + buckets + flat_copy + comm_copy + stale,
        "step": base + gradients + step_workspace + stale,
    }
    peak_phase = max(phases, key=phases.get)
    # What a CPU really makes resident: the untouched pages of the buckets take no RAM.
    untouched = buckets - buckets_touched if s.device == "cpu" else 0
    resident = {k: v - (untouched if k in ("backward", "reduction") else 0) for k, v in phases.items()}
    return {
        "states": states, "weights": weights, "gradients": gradients, "optimizer": optimizer,
        "reduce_buckets": buckets, "reduce_buckets_touched": buckets_touched,
        "communication_copy": comm_copy + flat_copy, "step_workspace": step_workspace, "activations": act,
        "phases": phases, "peak_phase": peak_phase, "peak": phases[peak_phase], "peak_resident": max(resident.values()),
    }


# -- communication, FLOPs, time ------------------------------------------------------------------


def all_to_all_bytes(s: Setup) -> dict:
    """Bytes one rank sends in the MoE all-to-alls of one optimizer step.

    Each MoE layer moves its [E, C, d] buffer twice in the forward (dispatch to the experts,
    combine back) and twice in the backward (their gradients), plus twice more when
    checkpointing recomputes the forward; (ep_size - 1) / ep_size of it leaves the rank.
    """
    from limoe.flops import expert_capacity_rows

    c = s.model
    moe_layers = len(c.moe.moe_layers(c.depth))
    tokens = s.batch * (c.num_patches + c.context_length)
    if not moe_layers:
        return {"moe_layers": 0, "buffer": None, "per_transfer": 0, "per_layer_step": 0, "per_step": 0}
    experts, capacity = expert_capacity_rows(c, tokens)
    buffer_bytes = experts * capacity * c.width * s.element_bytes
    per_transfer = buffer_bytes * (s.ep_size - 1) // s.ep_size
    transfers = 4 + (2 if s.grad_checkpointing else 0)
    per_layer_step = per_transfer * transfers * s.accum_freq
    return {"moe_layers": moe_layers, "buffer": [experts, capacity, c.width], "buffer_bytes": buffer_bytes,
            "per_transfer": per_transfer, "transfers_per_micro_batch": transfers,
            "per_layer_step": per_layer_step, "per_step": per_layer_step * moe_layers}


def flops_plan(s: Setup, peak_tflops: float | None, utilisation: float) -> dict:
    """FLOPs of one optimizer step on one rank and the step time at `utilisation` of the peak."""
    from limoe.flops import flops_per_pair

    forward = flops_per_pair(s.model)["total"] * s.batch * s.accum_freq
    model_flops = 3 * forward  # forward + backward (2x forward)
    executed = model_flops + (forward if s.grad_checkpointing else 0)  # checkpointing reruns the forward
    out = {"forward": forward, "model_flops": model_flops, "executed": executed,
           "global_batch": s.batch * s.accum_freq * s.world_size, "step_time_s": None, "pairs_per_s": None}
    if peak_tflops:
        t = executed / (utilisation * peak_tflops * 1e12)
        out.update(step_time_s=t, pairs_per_s=out["global_batch"] / t,
                   model_flops_utilisation=utilisation * model_flops / executed)
    return out


# -- the plan and what to change ---------------------------------------------------------------


def capacity(s: Setup, device_memory: int) -> int:
    """Bytes the plan lets one rank use: the device less RESERVE (a CPU's RAM is shared by its ranks)."""
    usable = device_memory * (1 - RESERVE)
    return int(usable / s.num_procs) if s.device == "cpu" else int(usable)


def fits(s: Setup, device_memory: int) -> tuple[bool, dict]:
    memory = memory_plan(s)
    need = memory["peak_resident"] if s.device == "cpu" else memory["peak"]
    return need <= capacity(s, device_memory), memory


def largest_batch(s: Setup, device_memory: int, limit: int = 1 << 16) -> int:
    """The largest per-device batch whose peak fits (0 if not even 1 does)."""
    if not fits(s.replace(batch=1), device_memory)[0]:
        return 0
    low, high = 1, 2
    while high <= limit and fits(s.replace(batch=high), device_memory)[0]:
        low, high = high, high * 2
    while high - low > 1:  # low fits, high does not
        mid = (low + high) // 2
        low, high = (mid, high) if fits(s.replace(batch=mid), device_memory)[0] else (low, mid)
    return low


def suggestions(s: Setup, device_memory: int, peak_tflops: float | None, utilisation: float) -> list[dict]:
    """Changes that bring the peak under the device memory, each with its numbers."""
    candidates = []
    if s.zero_stage < 2:
        candidates.append(({"parallel.zero_stage": 2}, s.replace(zero_stage=2)))
    if not s.grad_checkpointing:
        candidates.append(({"train.grad_checkpointing": True}, s.replace(grad_checkpointing=True)))
    batch = s.batch // 2
    while batch >= 1:  # the largest smaller batch that fits, the same pairs per optimizer step
        if s.batch % batch == 0:
            trial = s.replace(batch=batch, accum_freq=s.accum_freq * s.batch // batch)
            if fits(trial, device_memory)[0] or batch == 1:
                candidates.append(({"train.batch_size": batch, "train.accum_freq": trial.accum_freq}, trial))
                break
        batch //= 2
    experts = s.model.moe.num_experts
    for ep in range(s.ep_size + 1, min(experts, s.world_size) + 1):
        if experts % ep == 0 and s.world_size % ep == 0:
            candidates.append(({"parallel.ep_size": ep}, s.replace(ep_size=ep)))
            break
    if not any(fits(trial, device_memory)[0] for _, trial in candidates):
        both = s.replace(zero_stage=max(2, s.zero_stage), grad_checkpointing=True)
        candidates.append(({"parallel.zero_stage": both.zero_stage, "train.grad_checkpointing": True}, both))
    out = []
    for change, trial in candidates:
        ok, memory = fits(trial, device_memory)
        out.append({"set": change, "peak": memory["peak"], "peak_resident": memory["peak_resident"], "fits": ok,
                    "step_time_s": flops_plan(trial, peak_tflops, utilisation)["step_time_s"]})
    return out


def plan(config, device_memory: int, utilisation: float = 0.4, peak_tflops: float | None = None) -> dict:
    """The whole plan of a checked TrainConfig, as plain data (what --json prints)."""
    s, notes = setup_from_config(config)
    if peak_tflops is None and s.precision == "bf16" and s.device == "cuda":
        peak_tflops = H100_BF16_TFLOPS
        notes.append(f"peak {H100_BF16_TFLOPS:g} TFLOP/s: dense bf16 of an H100/H200 SXM (--peak-tflops to change)")
    ok, memory = fits(s, device_memory)
    stages = {}
    for stage in (0, 1, 2):
        for ckpt in (False, True):
            trial_fits, m = fits(s.replace(zero_stage=stage, grad_checkpointing=ckpt), device_memory)
            stages[f"zero{stage}{'_ckpt' if ckpt else ''}"] = {
                "zero_stage": stage, "grad_checkpointing": ckpt, "gradients": m["gradients"],
                "optimizer": m["optimizer"], "reduce_buckets": m["reduce_buckets"],
                "activations": m["activations"]["peak"], "peak": m["peak"], "peak_resident": m["peak_resident"],
                "fits": trial_fits}
    return {
        "config": config.name, "model": s.model.name, "capacity_factor": s.model.moe.capacity_factor,
        "notes": notes,
        "setup": {k: v for k, v in dataclasses.asdict(s).items() if k != "model"} | {
            "world_size": s.world_size, "batched_experts": s.batched_experts},
        "device_memory": device_memory, "usable_per_rank": capacity(s, device_memory), "reserve": RESERVE,
        "memory": memory, "fits": ok, "stages": stages, "largest_batch": largest_batch(s, device_memory),
        "all_to_all": all_to_all_bytes(s),
        "flops": flops_plan(s, peak_tflops, utilisation), "utilisation": utilisation, "peak_tflops": peak_tflops,
        "suggestions": [] if ok else suggestions(s, device_memory, peak_tflops, utilisation),
    }


# -- printing ----------------------------------------------------------------------------------


def _set_flags(change: dict) -> str:
    return " ".join(f"--set {k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in change.items())


def format_plan(p: dict) -> str:
    s, m = p["setup"], p["memory"]
    cpu = s["device"] == "cpu"
    lines = [
        f"plan: {p['config']} ({p['model']}), {s['world_size']} ranks ({s['num_nodes']} node(s) x {s['num_procs']}), "
        f"ep_size {s['ep_size']}, ZeRO {s['zero_stage']}, {s['precision']}, {s['device']}",
        f"  batch {s['batch']} pairs per device x accum_freq {s['accum_freq']} x {s['world_size']} ranks = "
        f"{p['flops']['global_batch']} pairs per step; gradient checkpointing "
        f"{'on' if s['grad_checkpointing'] else 'off'}",
    ]
    lines += [f"  ({note})" for note in p["notes"]]
    ne, ex = m["states"]["nonexpert"], m["states"]["expert"]
    total_params = s["nonexpert_params"] + s["expert_params"]
    lines += [
        "",
        f"parameters: {human_count(total_params)} in all; non-expert {human_count(s['nonexpert_params'])} on every "
        f"rank; experts {human_count(s['expert_params'])}, {human_count(ex['parameters'])} on each rank "
        f"(1/{s['ep_size']})",
        "",
        f"{'memory per device':48s}{'non-expert':>12s}{'expert':>12s}{'total':>12s}",
    ]

    def row(label, key=None, total=None, extra=""):
        cells = [ne[key], ex[key], ne[key] + ex[key]] if key else [None, None, total]
        lines.append(f"  {label:46s}" + "".join(f"{human_bytes(v) if v is not None else '':>12s}" for v in cells)
                     + (f"  {extra}" if extra else ""))
    b = 2 if s["precision"] == "bf16" else 4
    split = f"/{ne['partition_over']} | /{ex['partition_over']}"
    states = "m, v" if s["precision"] == "fp32" and s["zero_stage"] == 0 else "fp32 master, m, v"
    row(f"weights ({s['precision']}, {b} B/param)", "weights")
    row(f"gradients ({s['precision']}, {split if s['zero_stage'] >= 2 else 'full'})", "gradients")
    row(f"optimizer ({states}: {split if s['zero_stage'] >= 1 else 'full'})", "optimizer")
    if m["reduce_buckets"]:
        touched = f"; {human_bytes(m['reduce_buckets_touched'])} touched on CPU" if cpu else ""
        row(f"ZeRO reduce buckets ({2 if s['overlap_comm'] else 1} x {s['reduce_bucket_size']:.0e} x {b} B)",
            total=m["reduce_buckets"], extra=touched.lstrip("; "))
    act = m["activations"]
    parts = act["parts"]
    row(f"activations (batch {s['batch']}, checkpointing {'on' if s['grad_checkpointing'] else 'off'})",
        total=act["kept"], extra=f"kept, + {human_bytes(act['backward'])} in the backward")
    shown = [("attention", "attention"), ("mlp", "dense MLPs"), ("moe_buffers", "MoE [E, C, d] buffers x2"),
             ("experts", "expert hiddens"), ("shared_expert", "shared expert"), ("router", "router"),
             ("head", "heads + loss"), ("inputs", "inputs")]
    a2a = p["all_to_all"]
    listed = [f"{label} {human_bytes(parts[key])}" for key, label in shown if parts.get(key)]
    lines.append("    kept without checkpointing: " + ", ".join(listed[:4]) + ",")
    lines.append("      " + ", ".join(listed[4:]))
    if a2a["buffer"]:
        e, cap, d = a2a["buffer"]
        lines.append(f"    MoE dispatch buffer [E={e}, C={cap}, d={d}] per layer and rank "
                     f"({human_bytes(a2a['buffer_bytes'])}; capacity factor {p['capacity_factor']:g})")
    phases = m["phases"]
    lines += [
        "  peak of a step: " + ", ".join(f"{k} {human_bytes(v)}" for k, v in phases.items())
        + f" -> {human_bytes(m['peak'])} ({m['peak_phase']})",
    ]
    if cpu:
        lines.append(f"  resident on CPU: {human_bytes(m['peak_resident'])} per rank, "
                     f"{human_bytes(m['peak_resident'] * s['num_procs'])} for the node's {s['num_procs']} rank(s)")
    need = m["peak_resident"] if cpu else m["peak"]
    where = (f"{human_bytes(p['device_memory'])} of RAM shared by {s['num_procs']} rank(s)" if cpu
             else f"a {human_bytes(p['device_memory'])} device")
    verdict = "fits" if p["fits"] else "does NOT fit"
    lines += ["", f"{verdict}: {human_bytes(need)} per rank of {human_bytes(p['usable_per_rank'])} usable "
                  f"({where}, {p['reserve']:.0%} kept free); the largest train.batch_size that fits is "
                  f"{p['largest_batch']:,}", "",
              "ZeRO stage x checkpointing      gradients    optimizer      buckets  activations  peak of step  fits"]
    for key, st in p["stages"].items():
        peak = st["peak_resident"] if cpu else st["peak"]
        mark = " <- this config" if (st["zero_stage"], st["grad_checkpointing"]) == (
            s["zero_stage"], s["grad_checkpointing"]) else ""
        lines.append(f"  ZeRO {st['zero_stage']}, checkpointing {'on ' if st['grad_checkpointing'] else 'off'}"
                     f"{human_bytes(st['gradients']):>14s} {human_bytes(st['optimizer']):>12s} "
                     f"{human_bytes(st['reduce_buckets']):>12s} {human_bytes(st['activations']):>12s} "
                     f"{human_bytes(peak):>12s}  {'yes' if st['fits'] else 'no'}{mark}")
    lines.append("")
    if a2a["moe_layers"] and s["ep_size"] > 1:
        lines.append(f"all-to-all per step and rank: {human_bytes(a2a['per_step'])} sent "
                     f"({a2a['moe_layers']} MoE layers x {a2a['transfers_per_micro_batch']} transfers "
                     f"[dispatch + combine, forward and backward"
                     f"{', recomputed forward' if s['grad_checkpointing'] else ''}] x {s['accum_freq']} "
                     f"micro-batch(es)"
                     f" x {human_bytes(a2a['per_transfer'])}; {human_bytes(a2a['per_layer_step'])} per layer)")
    elif a2a["moe_layers"]:
        lines.append("all-to-all: none (ep_size 1: every rank holds all experts)")
    f = p["flops"]
    passes = ("4: forward, backward (2x) and the recomputed forward" if s["grad_checkpointing"]
              else "3: forward and backward (2x)")
    lines.append(f"FLOPs per step and device: {human_count(f['executed'])}FLOP executed "
                 f"({human_count(f['forward'])} forward x {passes})")
    if f["step_time_s"]:
        mfu = f" (model-FLOPs utilisation {f['model_flops_utilisation']:.0%})" if s["grad_checkpointing"] else ""
        lines.append(f"step time at {p['utilisation']:.0%} of {p['peak_tflops']:g} TFLOP/s: {f['step_time_s']:.3g} s, "
                     f"{f['pairs_per_s']:,.0f} pairs/s in all{mfu}")
    else:
        lines.append("step time: give --peak-tflops (the device's peak FLOP/s) to estimate it")
    if p["suggestions"]:
        lines += ["", "to make it fit, change one of:"]
        for sug in p["suggestions"]:
            peak = sug["peak_resident"] if cpu else sug["peak"]
            t = f", step {sug['step_time_s']:.3g} s" if sug["step_time_s"] else ""
            lines.append(f"  {_set_flags(sug['set']):70s} peak {human_bytes(peak)}{t}"
                         f"  {'fits' if sug['fits'] else 'still too big'}")
    return "\n".join(lines)


def run_plan(args) -> int:
    from .train_config import ConfigError, load_config, overrides_from_args

    try:
        device_memory = parse_size(args.device_memory)
        if not 0 < args.mfu <= 1:
            raise ValueError(f"--mfu must be in (0, 1], got {args.mfu}")
        config = load_config(args.config, overrides_from_args(args))
        result = plan(config, device_memory, args.mfu, args.peak_tflops)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(format_plan(result))
    return 0


def register(subparsers) -> None:
    from .train_config import add_override_flags

    p = subparsers.add_parser(
        "plan", help="per-device memory, all-to-all bytes, FLOPs and step time of a training config",
        description="Plan a training config before launching it: per-device memory (weights, gradients and "
                    "optimizer states of expert and non-expert parameters under ZeRO 0/1/2, DeepSpeed's reduce "
                    "buckets, activations with and without gradient checkpointing), all-to-all bytes, FLOPs and "
                    "step time per step; whether it fits the device, and what to change if not.",
        epilog="examples:\n  limoe plan b16-8gpu --device-memory 80GB\n"
               "  limoe plan l16-multinode --device-memory 80GB --mfu 0.35\n"
               "  limoe plan cpu-demo --device-memory 24GB --peak-tflops 0.1\n"
               "  limoe plan b16-8gpu --set train.batch_size=512 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="training config: a YAML path or a shipped name (cpu-demo, b16-8gpu, l16-multinode)")
    p.add_argument("--device-memory", default="80GB", metavar="SIZE",
                   help="memory of one device, e.g. 80GB or 24GiB (default 80GB); for CPU ranks the node's RAM, "
                        "shared by its parallel.num_procs ranks")
    p.add_argument("--mfu", type=float, default=0.4, metavar="X",
                   help="fraction of the peak FLOP/s the device sustains on the FLOPs it executes "
                        "(recomputation included; default 0.4)")
    p.add_argument("--peak-tflops", type=float, default=None, metavar="X",
                   help=f"the device's peak TFLOP/s (default for bf16 on cuda: {H100_BF16_TFLOPS:g}, an H100/H200 "
                        "SXM's dense bf16; no default on CPU)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_override_flags(p)
    p.set_defaults(func=run_plan)
