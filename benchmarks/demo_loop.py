"""The end-to-end demo training loop: samples/s and the share of time spent waiting for data.

Runs a short `limoe train --config cpu-demo` (the real launcher: DeepSpeed, 2
CPU ranks, experts split over them, the WebDataset loader on the emoji
shards) and summarises the trainer's own per-step log, logs/<name>/metrics.jsonl:

- samples/s: all samples / all step time, over the steps after warm-up;
- data wait: the time the loop waited for the next batch / all step time,
  over the same steps (the trainer measures both on rank 0).

The emoji shards are built first if missing (`limoe data emoji`, which uses the
npm tarball cached in ~/.cache/limoe/npm, or fetches it once).

    python benchmarks/demo_loop.py                      # 40 steps of cpu-demo
    python benchmarks/demo_loop.py --steps 60 --warmup-steps 10 --data data/emoji-google
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import format_table, header, median, write_json


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def summarise(metrics_path: Path, warmup_steps: int) -> dict:
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if len(rows) <= warmup_steps:
        raise SystemExit(f"{metrics_path} has {len(rows)} steps; need more than --warmup-steps={warmup_steps}")
    prev_seen = rows[warmup_steps - 1]["samples_seen"] if warmup_steps else 0
    total_time = wait_time = samples = 0.0
    for row in rows[warmup_steps:]:
        step_samples = row["samples_seen"] - prev_seen
        prev_seen = row["samples_seen"]
        step_time = step_samples / row["samples_per_s"]
        samples += step_samples
        total_time += step_time
        wait_time += row["data_wait_fraction"] * step_time
    timed = rows[warmup_steps:]
    return {
        "steps_logged": len(rows), "steps_timed": len(timed), "samples_timed": int(samples),
        "samples_per_s": samples / total_time,
        "median_step_samples_per_s": median([r["samples_per_s"] for r in timed]),
        "data_wait_fraction": wait_time / total_time,
        "median_step_data_wait_fraction": median([r["data_wait_fraction"] for r in timed]),
    }


COLUMNS = [("config", "config"), ("ranks", "ranks"), ("batch_per_rank", "batch/rank"), ("steps_timed", "steps timed"),
           ("samples_per_s", "samples/s"), ("median_step_samples_per_s", "median step samples/s"),
           ("data_wait", "data wait"), ("median_step_data_wait", "median step data wait")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cpu-demo", help="training config (a shipped name or a YAML path)")
    parser.add_argument("--data", default="data/emoji-google",
                        help="emoji data folder (gets shards/ and tokenizer.model; built if missing)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps to run")
    parser.add_argument("--warmup-steps", type=int, default=5, help="first steps left out of the numbers")
    parser.add_argument("--logs", default="logs", help="where the run directory goes")
    parser.add_argument("--name", default=None, help="run name (default: bench-demo-<time>)")
    parser.add_argument("--keep-run", action="store_true", help="keep the run directory (checkpoints) afterwards")
    parser.add_argument("--out", default="benchmarks/results/demo_loop.json")
    args = parser.parse_args(argv)

    limoe_cli = [sys.executable, "-m", "launch.cli"]
    data = Path(args.data)
    if not (data / "shards").is_dir():
        run(limoe_cli + ["data", "emoji", "--style", "google", "--out", str(data)])
    name = args.name or time.strftime("bench-demo-%Y%m%d-%H%M%S")
    run_dir = Path(args.logs) / name
    result = header("End-to-end demo training loop (limoe train)")
    start = time.perf_counter()
    run(limoe_cli + ["train", "--config", args.config, "--train-data", str(data / "shards"),
                     "--tokenizer", str(data / "tokenizer.model"), "--steps", str(args.steps),
                     "--warmup", str(min(30, args.steps)), "--name", name, "--logs", args.logs,
                     "--save-every", str(args.steps), "--set", "checkpoint.export=false"])
    wall = time.perf_counter() - start
    resolved = (run_dir / "config.yaml").read_text()
    import yaml
    config = yaml.safe_load(resolved)
    row = {"config": args.config, "ranks": config["parallel"]["num_procs"],
           "batch_per_rank": config["train"]["batch_size"], "wall_s_including_startup": wall}
    row.update(summarise(run_dir / "metrics.jsonl", args.warmup_steps))
    row["data_wait"] = f"{100 * row['data_wait_fraction']:.1f}%"
    row["median_step_data_wait"] = f"{100 * row['median_step_data_wait_fraction']:.1f}%"
    result.update(run_dir=str(run_dir), resolved_config=config, rows=[row])
    write_json(args.out, result)
    print()
    print(format_table([row], COLUMNS))
    print(f"\nwrote {args.out}")
    if not args.keep_run:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


if __name__ == "__main__":
    main()
