"""The GPU smoke run: what the first session with a GPU should check, in one command that
fits in 8 minutes on one H100/H200, written to one JSON.

    bash benchmarks/run_gpu.sh                 # runs this script (--help for its options)
    bash benchmarks/run_gpu.sh --dry-run       # everything but the device; CI runs it (tests/test_gpu_smoke.py)

Phases, each with a time limit (a phase that fails or runs out of time is recorded as
such and the next one runs; the limits add up to 8 minutes):

1. tests (120 s): the CUDA-only tests, `pytest -m cuda tests/test_cuda.py` (only that file is
   collected, so the GPU machine needs none of the serving extras the other test files import).
2. train (210 s): `limoe train` with launch/configs/b16-8gpu.yaml on this one GPU,
   through the deepspeed launcher: limoe-b-16, bf16, ZeRO 1, the config's batch of 256
   pairs per GPU, 50 steps. Changed from the config, because one GPU and no data set
   force it: 1 rank with ep_size 1 (all 8 experts on the GPU), synthetic shards (solid
   colour images, resized to 224 px by the loader) and a tokenizer trained on their
   captions (about 130 pieces instead of 32,000: 24M fewer embedding parameters, the same
   FLOPs), warmup 5 steps, no zero-shot evaluation, one checkpoint and the export at the
   end. Reported: the median step time over steps 11-50 (from the logged throughput),
   MFU = 3 x forward FLOPs (limoe.flops) x batch / step time / the GPU's dense bf16 peak,
   the peak device memory in use (nvidia-smi, polled twice a second: it includes the CUDA
   context and the caching allocator's reserve), the data-wait share, the first and last
   loss, and the trainer's export check.
3. moe_layer (60 s): benchmarks/moe_layer.py at d 768 with 16k and 64k tokens: LIMoE's
   layer vs DeepSpeed's stock MoE vs a dense MLP (time and memory ratios).
4. train_step (90 s): benchmarks/train_step.py for limoe-b-16 in one process without
   DeepSpeed: vs its dense twin and open_clip's ViT CLIP, fused AdamW, with MFU.

--dry-run checks all of it without a device: the CUDA tests are collected, the synthetic
data and tokenizer are made (small), the training run is prepared with the very command
the real run uses plus --prepare-only (every config check, config.yaml, ds_config.json),
the benchmark scripts are imported and their own parsers accept the phase's arguments, and the
FLOPs for MFU are computed; the JSON then holds the plan and those checks.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from common import header, write_json

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"
LIMITS = {"tests": 120, "train": 210, "moe_layer": 60, "train_step": 90}  # seconds; 480 in all
TRAIN_STEPS, TIMED_FROM = 50, 11
MOE_ARGS = ["--device", "cuda", "--dtype", "bf16", "--d-model", "768", "--tokens", "16384", "65536", "--reps", "30"]
TRAIN_STEP_ARGS = ["--device", "cuda", "--models", "limoe-b-16", "--adamw", "fused", "--reps", "10"]


def run_phase(name: str, cmd: list[str], out: Path, env: dict | None = None) -> dict:
    """Run one phase's command with its time limit; its output goes to <out>/<name>.log."""
    log = out / f"{name}.log"
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
        try:
            returncode = proc.wait(timeout=LIMITS.get(name))
            status = "ok" if returncode == 0 else f"failed (exit code {returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher, its ranks and their loader workers
            proc.wait()
            status = f"timeout ({LIMITS[name]} s)"
    seconds = time.perf_counter() - start
    print(f"{name}: {status} in {seconds:.0f} s (log: {log})", flush=True)
    return {"status": status, "seconds": round(seconds, 1), "command": shlex.join(cmd), "log": str(log)}


# -- 1. the CUDA-only tests ---------------------------------------------------------------------


def tests_command(out: Path, dry_run: bool) -> list[str]:
    # -n 0: one pytest process (the tests share the GPUs; pyproject's addopts ask for 2 workers)
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-m", "cuda", "tests/test_cuda.py", "-p", "no:cacheprovider"]
    return cmd + (["--collect-only"] if dry_run else ["--junitxml", str(out / "cuda_tests.xml")])


def test_results(out: Path, dry_run: bool) -> dict:
    if dry_run:
        text = (out / "tests.log").read_text()
        found = re.search(r"(\d+)(?:/\d+)? tests? collected", text)
        return {"collected": int(found.group(1)) if found else 0}
    path = out / "cuda_tests.xml"
    if not path.is_file():
        return {}
    suite = ElementTree.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")} | {"failed": failed}


# -- 2. limoe-b-16 through the launcher ----------------------------------------------------------


def make_data(work: Path, num_samples: int) -> tuple[Path, Path]:
    """Synthetic captioned shards and the tokenizer file path (limoe train trains it)."""
    from data_pipelines.testing import write_fake_shards

    shards = work / "shards"
    if not shards.is_dir():
        write_fake_shards(shards, num_samples=num_samples, per_shard=256, prefix="smoke")
    return shards, work / "tokenizer.model"


def train_command(work: Path, shards: Path, tokenizer: Path, batch_size: int | None, dry_run: bool) -> list[str]:
    overrides = {"name": "smoke-b16", "logs": str(work / "logs"), "data.tokenizer": str(tokenizer),
                 "data.tokenizer_vocab_size": 1000, "train.steps": TRAIN_STEPS, "train.log_every": 1,
                 "schedule.warmup": 5, "parallel.num_procs": 1, "parallel.ep_size": 1, "evals.*.every": 0,
                 "checkpoint.every": TRAIN_STEPS, "checkpoint.keep": 1}
    if batch_size:
        overrides["train.batch_size"] = batch_size
    cmd = [sys.executable, "-m", "launch.cli", "train", "--config", "b16-8gpu", "--train-data", str(shards)]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={value}"]
    return cmd + (["--prepare-only"] if dry_run else [])


class MemoryPoller:
    """The most device memory in use on GPU 0 (nvidia-smi's memory.used, MiB), polled in a thread."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.peak_mib, self.error = interval, None, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                text = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                       "-i", "0"], capture_output=True, text=True, timeout=10).stdout
                used = float(text.split()[0])
                self.peak_mib = used if self.peak_mib is None else max(self.peak_mib, used)
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired) as e:
                self.error = f"{type(e).__name__}: {e}"
                return
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def training_plan(run_dir: Path) -> dict:
    """What the prepared run will train, and the FLOPs MFU is computed from."""
    import yaml

    from launch.train_config import load_config
    from limoe.flops import flops_per_pair
    from limoe.tokenizer import Tokenizer

    config = load_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
    tokenizer = Tokenizer.load(config.data.tokenizer)
    model = config.fit_tokenizer(tokenizer.vocab_size, tokenizer.context_length)
    ds = json.loads((run_dir / "ds_config.json").read_text())
    pairs_per_step = config.train.batch_size * config.world_size * config.train.accum_freq
    return {"model": model.name, "precision": config.train.precision, "zero_stage": config.parallel.zero_stage,
            "ranks": config.world_size, "ep_size": config.parallel.ep_size, "batch_per_gpu": config.train.batch_size,
            "pairs_per_step": pairs_per_step, "steps": config.train.steps, "vocab_size": tokenizer.vocab_size,
            "ds_config_bf16": ds["bf16"]["enabled"], "ds_config_zero": ds["zero_optimization"],
            "train_tflop_per_step": 3 * flops_per_pair(model)["total"] * pairs_per_step / 1e12}


def training_results(run_dir: Path, plan: dict, peak_tflops: float | None) -> dict:
    from launch.trainer import read_export_check

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["step"] >= TIMED_FROM]
    result = {"steps_done": records[-1]["step"] if records else 0,
              "first_loss": records[0]["loss"] if records else None,
              "last_loss": records[-1]["loss"] if records else None}
    if timed:
        step_s = statistics.median(plan["pairs_per_step"] / r["samples_per_s"] for r in timed)
        result.update(step_ms=1e3 * step_s, samples_per_s=plan["pairs_per_step"] / step_s,
                      data_wait_fraction=statistics.median(r["data_wait_fraction"] for r in timed),
                      timed_steps=f"{TIMED_FROM}-{timed[-1]['step']}")
        result["mfu"] = plan["train_tflop_per_step"] * 1e12 / step_s / (peak_tflops * 1e12) if peak_tflops else None
    out_log = (run_dir / "out.log").read_text() if (run_dir / "out.log").is_file() else ""
    check = read_export_check(out_log)
    if check:
        result["export_check"] = {"difference": check[0], "tolerance": check[1], "passed": check[0] <= check[1]}
    return result


# -- 3./4. the benchmark scripts ------------------------------------------------------------------


def check_script_args(module: str, args: list[str]) -> None:
    """The benchmark script's own parser accepts these arguments (raises SystemExit if not)."""
    import importlib

    importlib.import_module(module).build_parser().parse_args(args)


def moe_layer_results(path: Path) -> dict:
    rows = json.loads(path.read_text())["rows"]
    keys = ("d_model", "tokens", "limoe_ms", "stock_ms", "dense_ms", "stock_vs_limoe_time", "limoe_vs_dense_time",
            "stock_vs_dense_time", "limoe_peak_mib", "stock_peak_mib", "dense_peak_mib", "limoe_vs_dense_mem")
    return {"rows": [{k: row.get(k) for k in keys} for row in rows]}


def train_step_results(path: Path) -> dict:
    rows = json.loads(path.read_text())["rows"]
    keys = ("model", "batch", "step_ms", "samples_per_s", "vs_dense_time", "peak_mib", "mfu")
    return {"rows": [{k: row.get(k) for k in keys} for row in rows]}


def gpu_peak_tflops(override: float | None) -> tuple[str | None, float | None]:
    import torch

    from train_step import PEAK_BF16

    if not torch.cuda.is_available():
        return None, override
    name = torch.cuda.get_device_name()
    return name, override or next((v / 1e12 for k, v in PEAK_BF16.items() if k in name), None)


# -- the run ---------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="check everything except the device (configs, commands, scripts); no GPU needed")
    parser.add_argument("--out", default=str(BENCHMARKS / "results" / "gpu"),
                        help="folder for smoke.json and the phase logs (default: %(default)s)")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "limoe-gpu-smoke"),
                        help="folder for the training phase's data and run directory (checkpoints of several "
                             "GB; its metrics and log are copied to --out) (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="pairs per GPU for the training phase (default: the config's 256)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak for MFU (default: looked up from its name)")
    parser.add_argument("--skip", nargs="*", default=[], choices=list(LIMITS), help="phases to leave out")
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve()
    gpu, peak = gpu_peak_tflops(args.peak_tflops)
    if not args.dry_run and gpu is None:
        print("gpu_smoke: torch sees no CUDA device; nothing to measure (use --dry-run to check the plan)")
        return 0
    result = header("GPU smoke run: CUDA tests, limoe-b-16 through the launcher, MoE layer and training step")
    result.update(dry_run=args.dry_run, gpu=gpu, peak_bf16_tflops=peak, limits_s=LIMITS, phases={})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    started = time.perf_counter()
    json_path = out / ("smoke_dry_run.json" if args.dry_run else "smoke.json")

    def save():
        result["total_s"] = round(time.perf_counter() - started, 1)
        write_json(json_path, result)

    if "tests" not in args.skip:
        result["phases"]["tests"] = run_phase("tests", tests_command(out, args.dry_run), out, env)
        result["tests"] = test_results(out, args.dry_run)
        save()

    if "train" not in args.skip:
        shards, tokenizer = make_data(work, num_samples=64 if args.dry_run else 2048)
        run_dir = work / "logs" / "smoke-b16"
        if run_dir.exists() and not args.dry_run:
            shutil.rmtree(run_dir)  # a fresh run each time (the run directory refuses to mix runs)
        cmd = train_command(work, shards, tokenizer, args.batch_size, args.dry_run)
        if args.dry_run:
            result["phases"]["train"] = run_phase("train", cmd, out, env)
        else:
            with MemoryPoller() as memory:
                result["phases"]["train"] = run_phase("train", cmd, out, env)
            result["train_memory"] = {"peak_used_mib": memory.peak_mib, "source": "nvidia-smi memory.used, GPU 0",
                                      "error": memory.error}
        for name in ("config.yaml", "metrics.jsonl", "out.log"):  # the run's record, next to smoke.json
            if (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, out / f"train_{name}")
        if (run_dir / "config.yaml").is_file():
            result["train_plan"] = plan = training_plan(run_dir)
            if not args.dry_run and (run_dir / "metrics.jsonl").is_file():
                result["train"] = training_results(run_dir, plan, peak)
        save()

    benchmarks = {"moe_layer": ("moe_layer", MOE_ARGS, moe_layer_results),
                  "train_step": ("train_step", TRAIN_STEP_ARGS, train_step_results)}
    for name, (module, script_args, read) in benchmarks.items():
        if name in args.skip:
            continue
        json_out = out / f"{name}_smoke.json"
        script_args = [*script_args, "--out", str(json_out)]
        cmd = [sys.executable, str(BENCHMARKS / f"{module}.py"), *script_args]
        if args.dry_run:  # the script imports here and its own parser accepts the arguments
            start = time.perf_counter()
            try:
                check_script_args(module, script_args)
                status = "ok"
            except (ImportError, SystemExit) as e:  # argparse exits on arguments it rejects
                status = f"failed ({type(e).__name__}: {e})"
            result["phases"][name] = {"status": status, "seconds": round(time.perf_counter() - start, 1),
                                      "command": shlex.join(cmd), "log": None}
        else:
            result["phases"][name] = run_phase(name, cmd, out, env)
            if json_out.is_file():
                result[name] = read(json_out)
        save()

    failed = [name for name, phase in result["phases"].items() if phase["status"] != "ok"]
    if args.dry_run and "tests" in result and not result["tests"].get("collected"):
        failed.append("tests (no CUDA tests collected)")
    result["failed_phases"] = failed
    save()
    print(f"wrote {json_path} ({result['total_s']:.0f} s){'; failed: ' + ', '.join(failed) if failed else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
