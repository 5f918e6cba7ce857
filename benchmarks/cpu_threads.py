"""CPU thread and OpenMP wait settings for the training ranks, measured on the demo's training loop.

Runs `limoe train --config cpu-demo --steps N` (the real launcher: 2 CPU ranks,
DeepSpeed, one data worker per rank) once per variant per round, variants
interleaved (A B C A B C ...) so that whatever else the shared machine is
doing hits every variant alike, and reports per variant the median of the
trainer's own samples/s (after warm-up steps) and its ratio to the first
variant, with the 1-minute load average before each run. With `--neighbour`
every round is run twice: idle, and next to a deliberate busy loop (one
process spinning on one core), the case of a shared box.

A variant is `name:KEY=VALUE,KEY=VALUE`: `threads` (parallel.threads_per_proc;
`default` = the launcher's default), `wait` (OMP_WAIT_POLICY for the ranks and
their data workers: `unset`, `PASSIVE` or `ACTIVE`; `default` = what the
launcher sets), `workers` (data.workers), `procs` (ranks, with ep_size = procs).

    python benchmarks/cpu_threads.py --data data/emoji-google --rounds 2 --neighbour
    python benchmarks/cpu_threads.py --variants "one:threads=1,wait=unset" "two:threads=2,wait=PASSIVE"
    python benchmarks/cpu_threads.py --variants "r1-2t-unset:procs=1,threads=2,wait=unset" \
        "r1-2t-passive:procs=1,threads=2,wait=PASSIVE" "r1-1t-passive:procs=1,threads=1,wait=PASSIVE"
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import format_table, header, median, write_json
from demo_loop import summarise

DEFAULT_VARIANTS = [
    "1-thread-unset:threads=1,wait=unset",
    "1-thread-passive:threads=1,wait=PASSIVE",
    "2-threads-unset:threads=2,wait=unset",
    "2-threads-passive:threads=2,wait=PASSIVE",
]
BUSY_LOOP = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


def parse_variant(text: str) -> dict:
    name, _, spec = text.partition(":")
    variant = {"name": name, "threads": "default", "wait": "unset", "workers": None, "procs": None}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key not in variant or key == "name":
            raise SystemExit(f"variant {text!r}: unknown setting {key!r} (threads, wait, workers, procs)")
        variant[key] = value
    return variant


def train_command(args, variant: dict, name: str) -> list[str]:
    cmd = [sys.executable, "-m", "launch.cli", "train", "--config", args.config,
           "--train-data", str(Path(args.data) / "shards"), "--tokenizer", str(Path(args.data) / "tokenizer.model"),
           "--steps", str(args.steps), "--warmup", str(min(30, args.steps)), "--name", name, "--logs", args.logs,
           "--save-every", str(args.steps), "--set", "checkpoint.export=false"]
    if variant["threads"] != "default":
        cmd += ["--set", f"parallel.threads_per_proc={variant['threads']}"]
    if variant["workers"] is not None:
        cmd += ["--workers", variant["workers"]]
    if variant["procs"] is not None:
        cmd += ["--set", f"parallel.num_procs={variant['procs']}", "--set", f"parallel.ep_size={variant['procs']}"]
    return cmd


def variant_env(variant: dict) -> dict:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)  # the variant (or the launcher's default) decides
    if variant["wait"] in ("unset", "default"):
        env.pop("OMP_WAIT_POLICY", None)
    else:
        env["OMP_WAIT_POLICY"] = variant["wait"]
    return env


def run_once(args, variant: dict, label: str) -> dict:
    name = time.strftime(f"bench-threads-%H%M%S-{label}")
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(train_command(args, variant, name), env=variant_env(variant), capture_output=True,
                          text=True, timeout=args.timeout)
    wall = time.perf_counter() - start
    run_dir = Path(args.logs) / name
    row = {"variant": variant["name"], "load_1m_before": round(load, 2), "wall_s": round(wall, 1),
           "returncode": done.returncode}
    if done.returncode != 0:
        row["error"] = (done.stderr or done.stdout)[-2000:]
    else:
        row.update(summarise(run_dir / "metrics.jsonl", args.warmup_steps))
    shutil.rmtree(run_dir, ignore_errors=True)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cpu-demo")
    parser.add_argument("--data", default="data/emoji-google", help="emoji data folder (shards/, tokenizer.model)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup-steps", type=int, default=10, help="first steps left out of samples/s")
    parser.add_argument("--rounds", type=int, default=2, help="times each variant runs (per condition)")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, metavar="NAME:K=V,...")
    parser.add_argument("--neighbour", action="store_true",
                        help="also run every round next to a busy loop on one core")
    parser.add_argument("--logs", default="logs")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per training run (a hang guard)")
    parser.add_argument("--out", default="benchmarks/results/cpu_threads.json")
    args = parser.parse_args(argv)
    if not (Path(args.data) / "shards").is_dir():
        raise SystemExit(f"{args.data}/shards not found: build it with limoe data emoji --style google --out {args.data}")
    variants = [parse_variant(v) for v in args.variants]
    conditions = ["idle", "neighbour"] if args.neighbour else ["idle"]
    result = header("CPU thread / OpenMP wait settings on the demo training loop (limoe train)")
    result.update(steps=args.steps, warmup_steps=args.warmup_steps, variants=variants, runs=[])
    for round_index in range(args.rounds):
        for condition in conditions:
            busy = None
            if condition == "neighbour":
                busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP.format(seconds=args.timeout * len(variants))])
            try:
                for variant in variants:
                    row = run_once(args, variant, f"{variant['name']}-{condition}")
                    row.update(round=round_index, condition=condition)
                    result["runs"].append(row)
                    print(f"round {round_index} {condition:9s} {variant['name']:20s} "
                          f"{row.get('samples_per_s', float('nan')):7.1f} samples/s  load {row['load_1m_before']}"
                          + (f"  FAILED rc={row['returncode']}" if row["returncode"] else ""), flush=True)
                    write_json(args.out, result)  # partial results survive an interrupted run
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
    table = []
    for condition in conditions:
        base = None
        for variant in variants:
            rates = [r["samples_per_s"] for r in result["runs"]
                     if r["variant"] == variant["name"] and r["condition"] == condition and "samples_per_s" in r]
            waits = [r["data_wait_fraction"] for r in result["runs"]
                     if r["variant"] == variant["name"] and r["condition"] == condition and "samples_per_s" in r]
            row = {"condition": condition, "variant": variant["name"], "runs": len(rates),
                   "samples_per_s": median(rates) if rates else None,
                   "min": min(rates) if rates else None, "max": max(rates) if rates else None,
                   "data_wait": f"{100 * median(waits):.1f}%" if waits else None}
            base = base or row["samples_per_s"]
            row["ratio"] = row["samples_per_s"] / base if rates and base else None
            table.append(row)
    result["table"] = table
    result["load_1m_after"] = round(os.getloadavg()[0], 2)
    write_json(args.out, result)
    columns = [("condition", "condition"), ("variant", "variant"), ("runs", "runs"),
               ("samples_per_s", "median samples/s"), ("min", "min"), ("max", "max"), ("ratio", "ratio to first"),
               ("data_wait", "data wait")]
    print()
    print(format_table(table, columns))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
