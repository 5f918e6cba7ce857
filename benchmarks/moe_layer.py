"""MoE layer forward+backward: LIMoE's layer vs DeepSpeed's stock MoE vs a dense MLP.

All three see the same tokens (which need a gradient, as inside a network),
get the same random output cotangent (plus their aux loss) and run forward
then backward; gradients are freed before every step. The variants:

- limoe: `limoe.moe.LIMoELayer` (LIMoE gate: fp32 router, noise, BPR,
  per-modality aux losses; gather-only dispatch; grouped experts), training mode;
- stock: `deepspeed.moe.layer.MoE` with the same expert MLPs, `TopKGate` with
  k=1, capacity_factor=1.0, min_capacity=4, use_rts=False (LIMoE ranks tokens
  by priority, not randomly), drop_tokens=True, no noise; its per-expert loop;
- dense: one MLP d -> 4d -> d, the same FLOPs per token as one top-1 expert.

Both MoE layers use E=8 experts, top-1 and capacity C = ceil(S / E) (a
multiple of 4 for every token count here), so their expert matmuls do the
dense MLP's FLOPs. Tokens are 92% image / 8% text, as in a B/16 batch (196
patches + 16 text tokens per pair); only LIMoE's gate looks at modality.

    python benchmarks/moe_layer.py --d-model 256      # CPU fp32, 4k..64k tokens (a few minutes)
    python benchmarks/moe_layer.py --tokens 8192 --d-model 256 --reps 40 --threads 1
    python benchmarks/moe_layer.py --device cuda      # bf16 by default on CUDA

`--dropless` measures inference instead (eval mode, no gradient, dropless
routing, LIMoE only): the same layer and tokens under a balanced router and
under a skewed one that sends about 70% of the tokens to expert 0. Dropless
dispatch sorts the routes by expert and computes exactly the routed rows, so
the skewed call should cost about what the balanced one costs.

    python benchmarks/moe_layer.py --dropless --tokens 16384 --d-model 256 --threads 1
"""
from __future__ import annotations

import argparse
import math

import torch
from deepspeed.moe.layer import MoE

from common import (format_table, header, median, peak_step_memory, pick_device, pick_dtype,
                    profile_table, spread, time_interleaved, write_json)
from limoe.config import MoEConfig
from limoe.layers import MLP
from limoe.moe import LIMoELayer
from limoe.routing import IMAGE, TEXT, TokenGroups

VARIANTS = ("limoe", "stock", "dense")


def build_variants(d_model: int, num_experts: int, device, dtype) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    config = MoEConfig(num_experts=num_experts, k=1, capacity_factor=1.0)
    modules = {
        "limoe": LIMoELayer(d_model, MLP(d_model, 4 * d_model), config),
        "stock": MoE(hidden_size=d_model, expert=MLP(d_model, 4 * d_model), num_experts=num_experts, k=1,
                     capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=4, drop_tokens=True,
                     use_rts=False, noisy_gate_policy=None),
        "dense": MLP(d_model, 4 * d_model),
    }
    return {name: m.to(device=device, dtype=dtype).train() for name, m in modules.items()}


def make_step(name: str, module: torch.nn.Module, x: torch.Tensor, modality: torch.Tensor,
              cotangent: torch.Tensor):
    params = list(module.parameters()) + [x]

    def step():
        for p in params:
            p.grad = None
        if name == "limoe":
            y, aux = module(x, modality)
            torch.autograd.backward([y, aux["loss"]], [cotangent, None])
        elif name == "stock":
            y, l_aux, _ = module(x)
            torch.autograd.backward([y, l_aux], [cotangent, None])
        else:
            module(x).backward(cotangent)
    return step


def paired_ratio(a: list[float], b: list[float]) -> float:
    return median([x / y for x, y in zip(a, b)])


def capacity_of(num_tokens: int, num_experts: int) -> int:
    return math.ceil(num_tokens / num_experts)


def run_config(d_model: int, num_tokens: int, args, device, dtype) -> dict:
    modules = build_variants(d_model, args.experts, device, dtype)
    g = torch.Generator(device="cpu").manual_seed(1)
    # The input needs a gradient, as it does inside a network.
    x = torch.randn(num_tokens, d_model, generator=g).to(device=device, dtype=dtype).requires_grad_()
    cotangent = torch.randn(num_tokens, d_model, generator=g).to(device=device, dtype=dtype)
    modality = torch.full((num_tokens,), IMAGE, device=device)
    modality[round(num_tokens * 196 / 212):] = TEXT
    steps = {name: make_step(name, m, x, modality, cotangent) for name, m in modules.items()}
    # Big configurations get fewer repetitions, so the whole grid stays a few minutes.
    flops = 6 * num_tokens * d_model * 4 * d_model * 2
    reps = min(args.reps, max(args.min_reps, round(args.reps * args.reps_flops / flops)))
    times = time_interleaved(steps, device, warmup=args.warmup, reps=reps)
    row = {"d_model": d_model, "tokens": num_tokens, "experts": args.experts,
           "capacity": capacity_of(num_tokens, args.experts), "reps": reps}
    for name in VARIANTS:
        row[f"{name}_ms"] = median(times[name]) * 1e3
        row[f"{name}_ms_iqr"] = [t * 1e3 for t in spread(times[name])]
        row[f"{name}_peak_mib"] = peak_step_memory(steps[name], device) / 2 ** 20
    # Time ratios are medians of per-repetition ratios: the variants of one
    # repetition ran back to back, so they saw the same load from other processes.
    for name in ("limoe", "stock"):
        row[f"{name}_vs_dense_time"] = paired_ratio(times[name], times["dense"])
        row[f"{name}_vs_dense_mem"] = row[f"{name}_peak_mib"] / row["dense_peak_mib"]
    row["stock_vs_limoe_time"] = paired_ratio(times["stock"], times["limoe"])
    if args.profile:
        for name in VARIANTS:
            print(f"\n## torch.profiler, {name}, d={d_model}, tokens={num_tokens}\n")
            print(profile_table(steps[name], device))
    return row


def skew_router(layer: LIMoELayer, x: torch.Tensor, share: float) -> torch.Tensor:
    """Inputs for which about `share` of the tokens pick expert 0: the router's expert-0 row
    points along a direction u, those tokens get 3u added, and the others lose their u part."""
    u = torch.nn.functional.normalize(torch.ones(x.shape[1], device=x.device, dtype=x.dtype), dim=0)
    with torch.no_grad():
        layer.gate.wg.weight[0] = 4.0 * u.to(layer.gate.wg.weight.dtype)
    skewed = x - (x @ u).unsqueeze(1) * u
    skewed[: round(share * x.shape[0])] += 3.0 * u
    return skewed


def busiest_share(layer: LIMoELayer, x: torch.Tensor, modality: torch.Tensor) -> float:
    with torch.no_grad():
        routes, _ = layer.gate(x, TokenGroups.from_modality(modality))
    counts = routes.counts.float()
    return float(counts.max() / counts.sum())


def run_dropless(d_model: int, num_tokens: int, args, device, dtype) -> dict:
    torch.manual_seed(0)
    config = MoEConfig(num_experts=args.experts, k=1)
    layers = {name: LIMoELayer(d_model, MLP(d_model, 4 * d_model), config).to(device=device, dtype=dtype).eval()
              for name in ("balanced", "skewed")}
    layers["skewed"].load_state_dict(layers["balanced"].state_dict())
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(num_tokens, d_model, generator=g).to(device=device, dtype=dtype)
    modality = torch.full((num_tokens,), IMAGE, device=device)
    modality[round(num_tokens * 196 / 212):] = TEXT
    inputs = {"balanced": x, "skewed": skew_router(layers["skewed"], x, 0.7)}

    def step(name):
        def run():
            with torch.no_grad():
                layers[name](inputs[name], modality)
        return run

    steps = {name: step(name) for name in layers}
    flops = 2 * num_tokens * d_model * 4 * d_model * 2
    reps = min(args.reps, max(args.min_reps, round(args.reps * args.reps_flops / flops)))
    times = time_interleaved(steps, device, warmup=args.warmup, reps=reps)
    row = {"d_model": d_model, "tokens": num_tokens, "experts": args.experts, "reps": reps}
    for name in layers:
        row[f"{name}_busiest_share"] = busiest_share(layers[name], inputs[name], modality)
        row[f"{name}_ms"] = median(times[name]) * 1e3
        row[f"{name}_peak_mib"] = peak_step_memory(steps[name], device) / 2 ** 20
    row["skewed_vs_balanced_time"] = paired_ratio(times["skewed"], times["balanced"])
    row["skewed_vs_balanced_mem"] = row["skewed_peak_mib"] / row["balanced_peak_mib"]
    return row


DROPLESS_COLUMNS = [
    ("d_model", "d"), ("tokens", "tokens"), ("reps", "reps"),
    ("balanced_busiest_share", "balanced: busiest expert"), ("skewed_busiest_share", "skewed: busiest expert"),
    ("balanced_ms", "balanced ms"), ("skewed_ms", "skewed ms"), ("skewed_vs_balanced_time", "skewed/balanced time"),
    ("balanced_peak_mib", "balanced peak MiB"), ("skewed_peak_mib", "skewed peak MiB"),
    ("skewed_vs_balanced_mem", "skewed/balanced mem"),
]


COLUMNS = [
    ("d_model", "d"), ("tokens", "tokens"), ("reps", "reps"),
    ("limoe_ms", "LIMoE ms"), ("stock_ms", "stock ms"), ("dense_ms", "dense ms"),
    ("limoe_vs_dense_time", "LIMoE/dense time"), ("stock_vs_dense_time", "stock/dense time"),
    ("stock_vs_limoe_time", "stock/LIMoE time"),
    ("limoe_peak_mib", "LIMoE peak MiB"), ("stock_peak_mib", "stock peak MiB"), ("dense_peak_mib", "dense peak MiB"),
    ("limoe_vs_dense_mem", "LIMoE/dense mem"), ("stock_vs_dense_mem", "stock/dense mem"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: cuda when available, else cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="auto: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--d-model", type=int, nargs="+", default=None,
                        help="widths (default: 256 768)")
    parser.add_argument("--tokens", type=int, nargs="+", default=None,
                        help="tokens per call (default cpu: 4096..65536 at d 256, 4096..16384 at d 768; "
                             "cuda: 4096..65536 at both)")
    parser.add_argument("--experts", type=int, default=8, help="experts per MoE layer")
    parser.add_argument("--reps", type=int, default=20, help="repetitions for the smallest configurations")
    parser.add_argument("--min-reps", type=int, default=5, help="repetitions for the largest")
    parser.add_argument("--reps-flops", type=float, default=2.6e10,
                        help="configurations up to this many FLOPs per step get --reps repetitions; "
                             "bigger ones proportionally fewer")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's top ops per variant")
    parser.add_argument("--dropless", action="store_true",
                        help="measure dropless inference under a balanced and a 70%%-skewed router instead")
    parser.add_argument("--out", default=None,
                        help="JSON path (default benchmarks/results/moe_layer.json, or moe_layer_dropless.json)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.out = args.out or f"benchmarks/results/moe_layer{'_dropless' if args.dropless else ''}.json"

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    if device.type == "cuda":
        args.reps_flops *= 1000  # a GPU does the big configurations in milliseconds
    grid = []
    for d in args.d_model or [256, 768]:
        if args.tokens:
            tokens = args.tokens
        elif device.type == "cpu" and d > 256:
            tokens = [4096, 8192, 16384]
        else:
            tokens = [4096, 8192, 16384, 32768, 65536]
        grid += [(d, s) for s in tokens]

    if args.dropless:
        result = header("LIMoE layer dropless inference: balanced vs 70%-skewed router")
        result.update(device=str(device), dtype=str(dtype).replace("torch.", ""), rows=[],
                      timing="median seconds per eval-mode forward (no grad), variants interleaved")
        print(f"device={device} dtype={dtype} threads={torch.get_num_threads()}")
        for d, s in grid:
            row = run_dropless(d, s, args, device, dtype)
            result["rows"].append(row)
            print(f"d={d} tokens={s}: balanced {row['balanced_ms']:.1f} ms, skewed {row['skewed_ms']:.1f} ms "
                  f"(busiest expert {100 * row['skewed_busiest_share']:.0f}%)", flush=True)
            write_json(args.out, result)
        print()
        print(format_table(result["rows"], DROPLESS_COLUMNS))
        print(f"\nwrote {args.out}")
        return

    result = header("MoE layer forward+backward: LIMoE vs DeepSpeed stock MoE vs dense MLP")
    result.update(device=str(device), dtype=str(dtype).replace("torch.", ""),
                  stock_gate="TopKGate(k=1, capacity_factor=1.0, min_capacity=4, use_rts=False, "
                             "drop_tokens=True, noisy_gate_policy=None)",
                  timing="median seconds per forward+backward, variants interleaved every repetition",
                  memory=("torch.cuda.max_memory_allocated above the step's start" if device.type == "cuda"
                          else "peak of the running sum of torch.profiler CPU allocation events in one step"),
                  rows=[])
    print(f"device={device} dtype={dtype} threads={torch.get_num_threads()}")
    for d, s in grid:
        row = run_config(d, s, args, device, dtype)
        result["rows"].append(row)
        print(f"d={d} tokens={s}: LIMoE {row['limoe_ms']:.1f} ms, stock {row['stock_ms']:.1f} ms, "
              f"dense {row['dense_ms']:.1f} ms", flush=True)
        write_json(args.out, result)
    print()
    print(format_table(result["rows"], COLUMNS))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
