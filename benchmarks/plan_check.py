"""`limoe plan`'s memory predictions against measured peaks of real training steps on CPU.

Every case is the cpu-demo config with one rank (model preset, batch, ZeRO stage and
checkpointing changed with the same overrides `limoe train --set` takes), run in a fresh
subprocess through the trainer's own pieces: `launch.trainer.build_model`, its AdamW
parameter groups, `launch.ds_config.build_ds_config` and `deepspeed.initialize` with one
gloo rank, then `--steps` steps of forward, `LIMoELoss`, `engine.backward`,
`engine.step` on a random batch with full-length texts. Measured:

- allocated: torch.profiler (`profile_memory=True`) runs from before the model is built,
  so the running sum of its allocation events is every byte PyTorch's CPU allocator holds
  (weights, optimizer states, DeepSpeed's flat buffers, activations, gradients,
  temporaries); the peak over the steps after the first is compared with the plan's peak
  (the first step also allocates torch AdamW's lazily created states under ZeRO 0);
- resident: in two more runs without the profiler, the process's RSS high-water mark over
  the same steps (`VmHWM` after resetting it through /proc/self/clear_refs) minus its RSS
  after the imports, compared with the plan's resident peak (DeepSpeed's reduce bucket is
  allocated in full but a CPU only commits the pages the gradients touch): once with
  glibc's default malloc, once with a fixed mmap threshold (MALLOC_MMAP_THRESHOLD_=65536),
  which stops glibc keeping freed heap pages. RSS also holds what is not a tensor (Python
  objects, DeepSpeed's shared-memory buffer, libraries loaded at initialisation).

The ZeRO reduce bucket (2 GB for cpu-demo's template) is the same number in the plan and
in the measurement, so the table also gives the ratio without it.

    python benchmarks/plan_check.py                   # 10 cases x 3 runs, about 12 minutes on 2 busy cores
    python benchmarks/plan_check.py --cases nano-zero1 ti16-zero1-ckpt --steps 3
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import format_table, header, write_json

ROOT = Path(__file__).resolve().parent.parent
# name: (preset, batch per rank, ZeRO stage, gradient checkpointing, precision, batched experts)
CASES = {
    "nano-zero0": ("limoe-nano", 64, 0, False, "fp32", False),
    "nano-zero1": ("limoe-nano", 64, 1, False, "fp32", False),
    "nano-zero1-ckpt": ("limoe-nano", 64, 1, True, "fp32", False),
    "nano-zero2": ("limoe-nano", 64, 2, False, "fp32", False),
    # The CUDA configs' precision and expert path (GroupedExperts batched=True), on CPU.
    "nano-bf16-zero1-batched": ("limoe-nano", 64, 1, False, "bf16", True),
    "ti16-zero0": ("limoe-ti-16", 8, 0, False, "fp32", False),
    "ti16-zero1": ("limoe-ti-16", 8, 1, False, "fp32", False),
    "ti16-zero1-ckpt": ("limoe-ti-16", 8, 1, True, "fp32", False),
    "ti16-zero2-b16": ("limoe-ti-16", 16, 2, False, "fp32", False),
    "ti16-bf16-zero2-ckpt-batched": ("limoe-ti-16", 8, 2, True, "bf16", True),
}
TOLERANCE = 0.25
# glibc raises its mmap threshold to the size of the largest block it has freed (up to 32 MB), so
# later tensors below it come from the heap, whose freed pages it keeps: the default RSS holds
# the step's high-water mark of the heap. A fixed threshold turns that off (MALLOC_MMAP_THRESHOLD_).
FIXED_MMAP_THRESHOLD = 65536


def case_overrides(name: str) -> list[tuple[str, object]]:
    preset, batch, stage, ckpt, precision, _ = CASES[name]
    return [("model.preset", preset), ("train.batch_size", batch), ("parallel.num_procs", 1),
            ("parallel.ep_size", 1), ("parallel.zero_stage", stage), ("train.grad_checkpointing", ckpt),
            ("train.precision", precision), ("parallel.accelerator", "cpu"),
            # DeepSpeed 0.19.8's stage 0 cannot clip the 0-dim logit_scale gradient (check_config says so)
            ("train.grad_clip", 1.0 if stage else 0.0), ("parallel.threads_per_proc", 1)]


def child(name: str, steps: int, env: dict, profiled: bool) -> dict:
    """Run one case in a fresh process (so each high-water mark is its own); its JSON line."""
    command = [sys.executable, __file__, "--run-case", name, "--steps", str(steps)]
    command += [] if profiled else ["--no-profile"]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"case {name} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


# -- one case, in its own process ----------------------------------------------------------------


def run_case(name: str, steps: int, profiled: bool) -> dict:
    """Train `steps` steps of case `name` in this process and measure its memory: the
    allocations (under the profiler) or only the RSS high-water mark (without it)."""
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                      DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    import contextlib
    import time

    import deepspeed
    import torch
    from torch.profiler import ProfilerActivity, profile

    from launch.deepspeed_compat import patch_broadcast_of_scalar_parameters, remove_shm_buffers
    from launch.distributed import free_port
    from launch.ds_config import build_ds_config
    from launch.train_config import load_config
    from launch.trainer import build_model, optimizer_param_groups
    from limoe.losses import LIMoELoss
    from train_step import make_batch

    os.environ["MASTER_PORT"] = str(free_port())
    config = load_config("cpu-demo", case_overrides(name))
    torch.set_num_threads(config.parallel.threads_per_proc)
    deepspeed.init_distributed()
    rss_after_imports = rss_bytes("VmRSS")
    markers = {}

    def mark(label: str) -> None:  # an allocation of a size nothing else has, found in the trace later
        size = 1000003 + 8 * len(markers)
        markers[size] = label
        torch.empty(size, dtype=torch.uint8)

    step_times = []
    try:
        recorder = (profile(activities=[ProfilerActivity.CPU], profile_memory=True) if profiled
                    else contextlib.nullcontext())
        with recorder as prof:
            model_config = config.model
            model = build_model(model_config, 1, 0, config.seed)
            model.set_grad_checkpointing(config.train.grad_checkpointing)
            for layer in model.moe_layers():
                layer.deepspeed_moe.experts.batched = CASES[name][5]
            o = config.optimizer
            optimizer = torch.optim.AdamW(optimizer_param_groups(model, o.wd), lr=o.lr, betas=(o.beta1, o.beta2),
                                          eps=o.eps)
            patch_broadcast_of_scalar_parameters()
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=build_ds_config(config))
            loss_fn = LIMoELoss(model_config.loss)
            dtype = torch.bfloat16 if config.train.precision == "bf16" else torch.float32  # as the trainer casts
            images, tokens = make_batch(model_config, config.train.batch_size, torch.device("cpu"), dtype)
            engine.train()
            for step in range(steps):
                mark(f"step {step}")
                if step == 1:
                    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM: the steps' own high-water mark
                t0 = time.perf_counter()
                torch.manual_seed(step)
                loss = loss_fn(engine(images, tokens))["loss"]
                engine.backward(loss)
                engine.step()
                step_times.append(time.perf_counter() - t0)
            mark("end")
        hwm = rss_bytes("VmHWM")
    finally:
        remove_shm_buffers(os.environ["MASTER_PORT"], 0)
    out = {"case": name, "steps": steps, "profiled": profiled, "malloc_mmap_threshold":
           os.environ.get("MALLOC_MMAP_THRESHOLD_"), "rss_after_imports": rss_after_imports,
           "rss_hwm_steps": hwm, "rss_peak": hwm - rss_after_imports, "step_seconds": step_times,
           "torch_threads": torch.get_num_threads()}
    if not profiled:
        return out
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live, peak, label = 0, {}, "init"
    at_start = {}
    for e in events:
        if e.nbytes() in markers and markers[e.nbytes()] not in at_start:
            label = markers[e.nbytes()]
            at_start[label] = live
        live += e.nbytes()
        peak[label] = max(peak.get(label, 0), live)
    step_peaks = [peak[f"step {i}"] for i in range(steps)]
    return out | {"init_peak": peak["init"], "step_peaks": step_peaks, "resident_before_steps": at_start["step 0"],
                  "allocated_peak": max(step_peaks[1:])}


# -- the table ----------------------------------------------------------------------------------


def predict(name: str) -> dict:
    from launch.plan import flops_plan, memory_plan, setup_from_config
    from launch.train_config import load_config

    setup, _ = setup_from_config(load_config("cpu-demo", case_overrides(name)))
    # The batched experts are the CUDA path: planned as on cuda, but with a CPU's resident pages.
    batched = setup.replace(device="cuda") if CASES[name][5] else setup
    m = memory_plan(batched)
    if batched is not setup:
        m["peak_resident"] = memory_plan(setup)["peak_resident"] - memory_plan(setup)["peak"] + m["peak"]
    return {"peak": m["peak"], "peak_resident": m["peak_resident"], "peak_phase": m["peak_phase"],
            "phases": m["phases"], "reduce_buckets": m["reduce_buckets"], "weights": m["weights"],
            "optimizer": m["optimizer"], "gradients": m["gradients"], "activations": m["activations"]["peak"],
            "model_flops_per_step": flops_plan(setup, None, 1.0)["model_flops"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps", type=int, default=3, help="training steps per case (>= 2; default 3)")
    parser.add_argument("--out", default="benchmarks/results/plan_check.json")
    parser.add_argument("--run-case", default=None, help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--no-profile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is not compared)")
    if args.run_case:
        print(json.dumps(run_case(args.run_case, args.steps, profiled=not args.no_profile)))
        return 0

    result = header("limoe plan's memory predictions vs measured peaks of CPU training steps (1 rank)")
    result.update(tolerance=TOLERANCE, rows=[])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "benchmarks"),
                                                        os.environ.get("PYTHONPATH", "")]))
    for name in args.cases:
        measured = child(name, args.steps, env, profiled=True)
        rss = child(name, args.steps, env, profiled=False)
        rss_fixed = child(name, args.steps, dict(env, MALLOC_MMAP_THRESHOLD_=str(FIXED_MMAP_THRESHOLD)),
                          profiled=False)
        predicted = predict(name)
        preset, batch, stage, ckpt, precision, batched = CASES[name]
        buckets = predicted["reduce_buckets"]
        row = {
            "case": name, "preset": preset, "batch": batch, "zero_stage": stage, "grad_checkpointing": ckpt,
            "precision": precision, "batched_experts": batched,
            "predicted_mb": predicted["peak"] / 1e6, "measured_mb": measured["allocated_peak"] / 1e6,
            "ratio": predicted["peak"] / measured["allocated_peak"],
            "buckets_mb": buckets / 1e6,
            "ratio_without_buckets": (predicted["peak"] - buckets) / (measured["allocated_peak"] - buckets),
            "predicted_resident_mb": predicted["peak_resident"] / 1e6, "rss_mb": rss["rss_peak"] / 1e6,
            "rss_ratio": predicted["peak_resident"] / rss["rss_peak"],
            "rss_fixed_threshold_mb": rss_fixed["rss_peak"] / 1e6,
            "rss_fixed_threshold_ratio": predicted["peak_resident"] / rss_fixed["rss_peak"],
            "peak_phase": predicted["peak_phase"],
            "step_s": min(rss["step_seconds"][1:]),
            "achieved_gflops": predicted["model_flops_per_step"] / min(rss["step_seconds"][1:]) / 1e9,
            "predicted": predicted, "measured": measured, "measured_rss": rss,
            "measured_rss_fixed_threshold": rss_fixed,
        }
        row["within_tolerance"] = abs(row["ratio_without_buckets"] - 1) <= TOLERANCE and \
            abs(row["ratio"] - 1) <= TOLERANCE
        result["rows"].append(row)
        print(f"{name}: predicted {row['predicted_mb']:.1f} MB, measured {row['measured_mb']:.1f} MB "
              f"(x{row['ratio']:.3f}; without buckets x{row['ratio_without_buckets']:.3f}); resident predicted "
              f"{row['predicted_resident_mb']:.1f} MB, RSS {row['rss_mb']:.1f} MB "
              f"({row['rss_fixed_threshold_mb']:.1f} MB with a fixed mmap threshold)", flush=True)
        write_json(args.out, result)
    result["all_within_tolerance"] = all(r["within_tolerance"] for r in result["rows"])
    result["load_average_end"] = os.getloadavg()[0]
    write_json(args.out, result)
    columns = [("case", "case"), ("predicted_mb", "predicted MB"), ("measured_mb", "allocated MB"),
               ("ratio", "pred / meas"), ("buckets_mb", "of which buckets MB"),
               ("ratio_without_buckets", "pred / meas w/o buckets"), ("predicted_resident_mb", "predicted RSS MB"),
               ("rss_mb", "RSS MB"), ("rss_ratio", "pred / RSS"), ("rss_fixed_threshold_mb", "RSS MB, fixed mmap"),
               ("rss_fixed_threshold_ratio", "pred / RSS fixed"), ("peak_phase", "peak at"),
               ("step_s", "step s"), ("achieved_gflops", "model GFLOP/s")]
    print()
    print(format_table(result["rows"], columns))
    print(f"\nall within {TOLERANCE:.0%}: {result['all_within_tolerance']}; wrote {args.out}")
    return 0 if result["all_within_tolerance"] else 1


if __name__ == "__main__":
    sys.exit(main())
