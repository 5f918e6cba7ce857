"""One training step (forward, contrastive + aux loss, backward, AdamW step):
LIMoE presets vs their dense twins vs open_clip's dense two-tower ViT CLIP of
the same width and depth.

- limoe-X: `limoe.create_model("limoe-X")`, loss `LIMoELoss("clip")` (InfoNCE + aux);
- limoe-X-dense: the same backbone with every MoE MLP replaced by one MLP of the
  same shape (same FLOPs per token at k=1);
- open_clip: `open_clip.CLIP(embed_dim, vision_cfg, text_cfg)` built from a config
  dict with LIMoE's width, depth, heads, MLP width, patch size, image size,
  context length and vocab size (no pretrained weights), loss `open_clip.ClipLoss`.
  It has two towers (twice the backbone parameters of the dense twin) and pools
  with a class token and the argmax token instead of MAP and EOS.

All run in one process without DeepSpeed (torch AdamW, as the trainer uses;
--adamw fused for the fused kernel), on the same random
batch, interleaved every repetition. On CUDA models and data are bf16 (as the
trainer's bf16 precision casts them; the LIMoE router still runs in fp32), and
model FLOPs utilisation is reported: 3 x forward FLOPs (limoe.flops, active
parameters only, one image and a full-length text per pair) x batch / time /
the GPU's peak dense bf16 FLOPs.

    python benchmarks/train_step.py                       # CPU: limoe-nano, limoe-ti-16
    python benchmarks/train_step.py --device cuda         # adds limoe-b-16
    python benchmarks/train_step.py --models limoe-nano --batch-size 32 --reps 20
    # another expert layout of the same preset, timed in the same interleaved loop:
    python benchmarks/train_step.py --models limoe-nano \
        --moe 'round17={"num_experts": 8, "placement": "every 2", "expert_mlp_dim": 0, "shared_expert_mlp_dim": 0}'
"""
from __future__ import annotations

import argparse
import json

import open_clip
import torch

from common import (format_table, header, median, peak_step_memory, pick_device, pick_dtype,
                    profile_table, spread, time_interleaved, write_json)
import limoe
from limoe.config import LIMoEConfig
from limoe.flops import flops_per_pair
from limoe.losses import LIMoELoss

CPU_BATCH = {"limoe-nano": 64, "limoe-ti-16": 8}
GPU_BATCH = {"limoe-nano": 1024, "limoe-ti-16": 256, "limoe-b-16": 256}
# Peak dense bf16 tensor-core FLOP/s (vendor datasheets, SXM parts, no sparsity).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def open_clip_twin(config: LIMoEConfig) -> torch.nn.Module:
    """open_clip's dense ViT CLIP with LIMoE's sizes, from a config dict."""
    vision_cfg = dict(image_size=config.image_size, patch_size=config.patch_size, width=config.width,
                      layers=config.depth, head_width=config.width // config.heads,
                      mlp_ratio=config.mlp_dim / config.width)
    text_cfg = dict(context_length=config.context_length, vocab_size=config.vocab_size, width=config.width,
                    heads=config.heads, layers=config.depth, mlp_ratio=config.mlp_dim / config.width)
    return open_clip.CLIP(embed_dim=config.embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg, output_dict=True)


def make_batch(config: LIMoEConfig, batch_size: int, device, dtype):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, config.image_size, config.image_size, generator=g)
    # Full-length texts: piece ids >= 3, then the eos id (2) at the end.
    tokens = torch.randint(3, config.vocab_size, (batch_size, config.context_length), generator=g)
    tokens[:, -1] = 2
    return images.to(device=device, dtype=dtype), tokens.to(device)


def make_step(kind: str, model: torch.nn.Module, images, tokens, adamw: str = "default"):
    options = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[adamw]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, **options)
    loss_fn = LIMoELoss("clip") if kind != "open_clip" else open_clip.ClipLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = model(images, tokens)
        if kind == "open_clip":
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        else:
            loss = loss_fn(out)["loss"]
        loss.backward()
        optimizer.step()
    return step


def peak_flops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def run_preset(preset: str, batch_size: int, args, device, dtype) -> dict:
    config = limoe.get_config(preset)
    torch.manual_seed(0)
    models = {
        preset: ("limoe", limoe.create_model(preset)),
        **{f"{preset}-{label}": ("limoe", limoe.create_model(preset, moe=moe)) for label, moe in args.moe},
        f"{preset}-dense": ("limoe", limoe.create_model(f"{preset}-dense")),
        "open_clip": ("open_clip", open_clip_twin(config)),
    }
    images, tokens = make_batch(config, batch_size, device, dtype)
    steps = {}
    for name, (kind, model) in models.items():
        model.to(device=device, dtype=dtype).train()
        steps[name] = make_step(kind, model, images, tokens, args.adamw)
    times = time_interleaved(steps, device, warmup=args.warmup, reps=args.reps)
    dense = times[f"{preset}-dense"]
    step_flops = {name: 3 * flops_per_pair(model.config)["total"] * batch_size
                  for name, (kind, model) in models.items() if kind == "limoe"}
    step_flops["open_clip"] = step_flops[f"{preset}-dense"]
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device)
    rows = []
    for name, (kind, model) in models.items():
        t = median(times[name])
        row = {"preset": preset, "model": name, "batch": batch_size, "reps": args.reps,
               "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
               "step_ms": t * 1e3, "step_ms_iqr": [x * 1e3 for x in spread(times[name])],
               "samples_per_s": batch_size / t,
               # Median of per-repetition ratios: each repetition ran the models back to back.
               "vs_dense_time": median([a / b for a, b in zip(times[name], dense)]),
               "peak_mib": peak_step_memory(steps[name], device) / 2 ** 20,
               "model_tflop_per_step": step_flops[name] / 1e12}
        row["mfu"] = step_flops[name] / t / peak if peak else None
        rows.append(row)
    if args.profile:
        for name in steps:
            print(f"\n## torch.profiler, {name}, batch {batch_size}\n")
            print(profile_table(steps[name], device, reps=2))
    return rows


COLUMNS = [("model", "model"), ("batch", "batch"), ("params_m", "params (M)"), ("step_ms", "step ms"),
           ("samples_per_s", "samples/s"), ("vs_dense_time", "time / dense twin"), ("peak_mib", "peak MiB"),
           ("mfu", "MFU")]


def moe_variant(text: str) -> tuple[str, dict]:
    """`LABEL={"num_experts": 8, ...}` -> (LABEL, the MoEConfig fields)."""
    label, sep, fields = text.partition("=")
    try:
        moe = json.loads(fields)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--moe {text!r}: the part after '=' is not JSON ({e})") from None
    if not sep or not label or not isinstance(moe, dict):
        raise argparse.ArgumentTypeError(f"--moe wants LABEL={{JSON object of MoEConfig fields}}, got {text!r}")
    return label, moe


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                        help="auto: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--models", nargs="+", default=None,
                        help="LIMoE presets (default cpu: limoe-nano limoe-ti-16; cuda: + limoe-b-16)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"pairs per step (default cpu {CPU_BATCH}, cuda {GPU_BATCH})")
    parser.add_argument("--adamw", default="default", choices=["default", "foreach", "fused"],
                        help="torch AdamW implementation (default: torch's choice, as launch/trainer.py uses)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the accelerator's peak TFLOP/s for MFU (default: looked up from the GPU name)")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's top ops per model")
    parser.add_argument("--moe", action="append", default=[], type=moe_variant, metavar="LABEL=JSON",
                        help="also time the preset with these MoEConfig fields (a JSON object), as PRESET-LABEL; "
                             "repeatable")
    parser.add_argument("--out", default="benchmarks/results/train_step.json")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    batches = GPU_BATCH if device.type == "cuda" else CPU_BATCH
    presets = args.models or list(batches)
    result = header("Training step: LIMoE presets vs dense twins vs open_clip dense ViT CLIP")
    result.update(device=str(device), dtype=str(dtype).replace("torch.", ""), optimizer=f"torch AdamW ({args.adamw})",
                  timing="median seconds per step, models interleaved every repetition", rows=[])
    print(f"device={device} dtype={dtype} threads={torch.get_num_threads()}")
    for preset in presets:
        batch = args.batch_size or batches.get(preset, 8)
        rows = run_preset(preset, batch, args, device, dtype)
        result["rows"] += rows
        for row in rows:
            print(f"{row['model']}: {row['step_ms']:.1f} ms/step, {row['samples_per_s']:.1f} samples/s", flush=True)
        write_json(args.out, result)
    print()
    print(format_table(result["rows"], COLUMNS))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
