"""Two nodes on one machine: `limoe train --node-rank 0` and `--node-rank 1` as two separate
launchers (DeepSpeed's --no_ssh mode), then launch/slurm.sh itself with `srun` and
`scontrol` replaced by small stand-ins on PATH.

The hostfile names two hosts that both are this machine (127.0.0.1 and localhost), one
CPU rank each; the master is 127.0.0.1. Each launcher starts only its own node's rank, so
the two ranks meet over TCP (gloo) as ranks on two nodes would, with no shared-memory
all-reduce between them. The run trains the reference config of conftest's
`two_rank_run` (2 ranks, ep_size 2: the experts are split over the two "nodes") and must
compute the very same losses.

Part 1 (two launchers by hand): prepare the run directory, train, stop with a checkpoint.
Part 2 (launch/slurm.sh under stand-ins): the script writes its hostfile from
`scontrol show hostnames`, prepares the run once (`--resume latest`), and its `srun` line
starts `limoe train --node-rank $SLURM_NODEID` once per node: the run resumes, finishes
and exports.

Not covered on one machine: separate hosts (their own network interfaces and addresses,
NCCL over InfiniBand/NVLink between GPUs), ssh/pdsh fan-out from one launcher (the
non-SLURM hostfile mode without --no_ssh, which needs passwordless ssh to every host),
and a run directory on a shared file system seen by all nodes (here both "nodes" see
the same local disk).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch.distributed import free_port
from test_train_run import kill_tree, metrics

REPO = Path(__file__).resolve().parent.parent
STOP_AT, STEPS = 4, 8
HOSTS = ("127.0.0.1", "localhost")

SRUN = """#!/usr/bin/env bash
# Stand-in for srun: runs the command once per node (SLURM_NNODES), locally and in parallel,
# with SLURM_NODEID set; srun's own options (--kill-on-bad-exit=1) are dropped. The first
# failure kills the others, as --kill-on-bad-exit does.
command=()
for arg in "$@"; do [[ $arg == --* && ${#command[@]} -eq 0 ]] || command+=("$arg"); done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
  SLURM_NODEID=$node "${command[@]}" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  if ! wait "$pid"; then status=1; kill "${pids[@]}" 2>/dev/null; fi
done
exit $status
"""
SCONTROL = """#!/usr/bin/env bash
# Stand-in for `scontrol show hostnames LIST`: one host per line of a comma-separated LIST.
if [[ "$1 $2" != "show hostnames" ]]; then echo "scontrol stand-in: only 'show hostnames'" >&2; exit 2; fi
tr ',' '\\n' <<< "$3"
"""


def base_config(reference: Path) -> dict:
    """The reference run's config under another name; what slurm.sh receives as CONFIG."""
    config = yaml.safe_load((reference / "config.yaml").read_text())
    config["name"] = "two-nodes"
    config["parallel"].update(threads_per_proc=1, master_port=None)  # one core per "node"
    return config


def run_both(commands: list[list[str]], env: dict, timeout: float = 600) -> list[tuple[int, str]]:
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd in commands]
    try:
        return [(p.wait(timeout=timeout), p.stdout.read()) for p in procs]
    finally:
        for p in procs:
            kill_tree(p)


@pytest.fixture(scope="module")
def two_nodes(two_rank_run):
    """(run directory, launcher outputs of part 1, slurm.sh output of part 2)."""
    from launch.launcher import run_training

    root = two_rank_run.parent.parent
    config = base_config(two_rank_run)
    hostfile = root / "hostfile"
    hostfile.write_text("".join(f"{host} slots=1\n" for host in HOSTS))
    run_dir = run_training(config, [("parallel.hostfile", str(hostfile)), ("parallel.num_nodes", 2),
                                    ("parallel.num_procs", 1), ("parallel.master_addr", HOSTS[0]),
                                    ("parallel.master_port", free_port()), ("train.stop_after", STOP_AT)],
                           prepare_only=True)
    limoe = str(Path(sys.executable).with_name("limoe"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    part1 = run_both([[limoe, "train", "--config", str(run_dir / "config.yaml"), "--node-rank", str(node)]
                      for node in range(2)], env)

    stand_ins = root / "slurm-bin"
    stand_ins.mkdir()
    for name, script in (("srun", SRUN), ("scontrol", SCONTROL)):
        (stand_ins / name).write_text(script)
        (stand_ins / name).chmod(0o755)
    config_file = root / "two-nodes.yaml"
    config_file.write_text(yaml.safe_dump(config))
    slurm_env = {**env, "PATH": f"{stand_ins}:{Path(sys.executable).parent}:{os.environ['PATH']}",
                 "SLURM_JOB_NODELIST": ",".join(HOSTS), "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "1",
                 "SLURM_JOB_NAME": "limoe-test", "CONFIG": str(config_file), "NAME": config["name"],
                 "LOGS": str(root / "logs"), "PORT": str(free_port())}
    slurm = subprocess.run(["bash", str(REPO / "launch" / "slurm.sh")], cwd=root, env=slurm_env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    return run_dir, part1, slurm


@pytest.mark.slow
def test_two_launchers_on_localhost_start_one_node_each_and_checkpoint(two_nodes):
    run_dir, part1, _ = two_nodes
    for node, (returncode, output) in enumerate(part1):
        assert returncode == 0, output[-3000:]
        assert f"--no_ssh --node_rank {node}" in output
        assert f"nnodes=2, num_local_procs=1, node_rank={node}" in output  # DeepSpeed's own launch.py
    out_log = (run_dir / "out.log").read_text()
    assert "2 ranks (ep_size 2, ZeRO 1, fp32)" in out_log
    assert f"checkpoint {run_dir / 'checkpoints' / f'step_{STOP_AT:08d}'}" in out_log


@pytest.mark.slow
def test_slurm_script_runs_its_own_lines_under_stand_ins_and_resumes(two_nodes):
    run_dir, _, slurm = two_nodes
    assert slurm.returncode == 0, slurm.stdout[-3000:]
    assert (run_dir / "hostfile").read_text() == "".join(f"{host} slots=1\n" for host in HOSTS)
    command = next(line for line in slurm.stdout.splitlines() if line.startswith("command:") and "--no_ssh" in line)
    assert f"--master_addr {HOSTS[0]}" in command and "--num_nodes 2 --num_gpus 1" in command
    for node in range(2):
        assert f"--no_ssh --node_rank {node}" in slurm.stdout
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{STOP_AT:08d}'}: step {STOP_AT}" \
        in (run_dir / "out.log").read_text()


@pytest.mark.slow
def test_two_node_run_computes_the_losses_of_the_one_node_run(two_nodes, two_rank_run):
    run_dir, _, _ = two_nodes
    reference = {r["step"]: r for r in metrics(two_rank_run)}
    records = metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for record in records:
        assert record["loss"] == pytest.approx(reference[record["step"]]["loss"], rel=1e-5), record["step"]
        assert record["lr"] == pytest.approx(reference[record["step"]]["lr"], rel=1e-12)


@pytest.mark.slow
def test_two_node_run_exports_and_the_export_embeds_like_the_training_model(two_nodes):
    from launch.trainer import read_export_check

    run_dir, _, _ = two_nodes
    difference, tolerance = read_export_check((run_dir / "out.log").read_text())
    assert difference <= tolerance
    assert (run_dir / "export" / "model.safetensors").is_file()


def test_a_node_launcher_refuses_overrides_its_ranks_would_not_see(capsys):
    from launch.cli import main

    assert main(["train", "--config", "cpu-demo", "--node-rank", "1", "--lr", "1e-3"]) == 2
    assert "give optimizer.lr to the --prepare-only step instead" in capsys.readouterr().err
