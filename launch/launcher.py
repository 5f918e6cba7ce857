"""`limoe train`: check a training config, prepare the run directory, and run
the `deepspeed` command that starts launch/train.py on every rank.

Everything that can be wrong before launch is found here, in this one process
(unknown keys, missing shards, ep_size, ZeRO 3, an occupied run directory, one
that another live job holds: see run_lock.py);
the tokenizer is trained from the training captions if the config names a
file that does not exist yet. The command is printed so it can be rerun by
hand, and `run_training` is the same thing as a Python function.

Run directory (open_clip layout): logs/<name>/{config.yaml, ds_config.json,
metrics.jsonl, tensorboard/, checkpoints/<tag>/, checkpoints/latest, export/, out.log}.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from limoe.files import write_json

from .deepspeed_compat import remove_shm_buffers
from .distributed import free_port
from .ds_config import build_ds_config
from .run_lock import HELD_ENV, RunDirectoryBusy, RunLock
from .train_config import (
    ConfigError, TrainConfig, add_override_flags, check_files, load_config, overrides_from_args, save_config,
)

TRAIN_SCRIPT = Path(__file__).with_name("train.py")


class TrainingInterrupted(RuntimeError):
    """Ctrl-C / SIGTERM reached the ranks, which wrote a checkpoint and stopped."""

    def __init__(self, signum: int, run_dir: Path):
        super().__init__(f"interrupted by {signal.Signals(signum).name}; the ranks wrote a checkpoint in "
                         f"{run_dir}/checkpoints (continue with --resume latest)")
        self.signum = signum


class TrainingFailed(RuntimeError):
    def __init__(self, returncode: int, command: list[str]):
        super().__init__(f"training exited with code {returncode} (the ranks' errors are above): "
                         f"{shlex.join(command)}")
        self.returncode = returncode


def has_run_state(run_dir: Path) -> bool:
    """Does the run directory hold results a fresh run would mix with?"""
    return (run_dir / "metrics.jsonl").exists() or any((run_dir / "checkpoints").glob("*/"))


def check_run_dir(config: TrainConfig, resume: str | None) -> None:
    run_dir = config.run_dir
    if resume is None and has_run_state(run_dir):
        raise ConfigError(f"'name': run directory {run_dir} already has checkpoints or metrics; "
                          f"continue it with --resume latest, or pick another --name")
    if resume not in (None, "latest") and not Path(resume).is_dir():
        raise ConfigError(f"--resume {resume}: not a checkpoint directory (give 'latest' or "
                          f"{run_dir}/checkpoints/<tag>)")


def read_hostfile(path: str) -> dict[str, int]:
    """DeepSpeed hostfile lines 'host slots=N' -> {host: N}."""
    hosts = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        slots = [p for p in parts[1:] if p.startswith("slots=")]
        if len(parts) != 2 or not slots or not slots[0][6:].isdigit():
            raise ConfigError(f"'parallel.hostfile': {path} line {number}: expected 'HOST slots=N', got {line!r}")
        hosts[parts[0]] = int(slots[0][6:])
    if not hosts:
        raise ConfigError(f"'parallel.hostfile': {path} lists no hosts")
    return hosts


def check_hosts(config: TrainConfig) -> None:
    p = config.parallel
    if not p.hostfile:
        if p.num_nodes > 1:
            raise ConfigError(f"'parallel.hostfile': parallel.num_nodes={p.num_nodes} needs a hostfile "
                              "(see launch/hostfile.example), or launch/slurm.sh under SLURM")
        return
    hosts = read_hostfile(p.hostfile)
    if p.num_nodes > len(hosts):
        raise ConfigError(f"'parallel.num_nodes': {p.num_nodes} nodes but {p.hostfile} lists {len(hosts)}")
    used = list(hosts.items())[: p.num_nodes]
    small = [(h, n) for h, n in used if n < p.num_procs]
    if small:
        raise ConfigError(f"'parallel.num_procs': {p.num_procs} processes per node but {small[0][0]} has "
                          f"slots={small[0][1]} in {p.hostfile}")


def ensure_tokenizer(config: TrainConfig, shards: dict[int, list[str]]) -> Path:
    """The tokenizer file, trained on the training captions if missing (like `limoe tokenizer train`);
    a missing `*.bpe.json` is written from open_clip's bundled BPE vocabulary (nothing to train)."""
    from data_pipelines.loader import build_tokenizer
    from data_pipelines.skips import SkipCounter

    path = Path(config.data.tokenizer) if config.data.tokenizer else config.run_dir / "tokenizer.model"
    if path.is_file():
        return path
    context_length = config.model.context_length
    print(f"tokenizer {path} not found: writing one (context {context_length})", flush=True)
    skips = SkipCounter()
    all_shards = [s for i in sorted(shards) for s in shards[i]]
    try:
        tokenizer = build_tokenizer(path, all_shards, config.data.tokenizer_vocab_size, context_length, skips)
    except ValueError as e:  # no captions at all
        raise ConfigError(f"'data.tokenizer': cannot train one from the training data: {e} ({skips.summary()})") from e
    print(f"wrote {path}: {tokenizer!r}; {skips.summary()}", flush=True)
    return path


def check_tokenizer(config: TrainConfig, path: str | os.PathLike) -> None:
    """The tokenizer file loads (a damaged one would crash every rank); the model takes its vocab and context."""
    from limoe.tokenizer import Tokenizer, load_tokenizer

    try:
        tokenizer = load_tokenizer(path)
    except (ValueError, OSError, KeyError) as e:
        raise ConfigError(f"'data.tokenizer': {e}") from e
    if config.data.subword_sampling > 0 and not isinstance(tokenizer, Tokenizer):
        raise ConfigError(f"'data.subword_sampling' needs a SentencePiece tokenizer; {path} is {tokenizer!r}")
    config.fit_tokenizer(tokenizer.vocab_size, tokenizer.context_length)


def prepare_run(config: TrainConfig, resume: str | None = None, write: bool = True,
                lock: RunLock | None = None) -> TrainConfig:
    """All pre-launch checks; then (write=True) take `lock` if given (RunDirectoryBusy if a live job
    holds it) and write the tokenizer, config.yaml and ds_config.json."""
    check_run_dir(config, resume)
    check_hosts(config)
    shards = check_files(config, need_tokenizer=False)
    build_ds_config(config)  # template errors surface before anything is written
    if config.data.tokenizer and Path(config.data.tokenizer).is_file():
        check_tokenizer(config, config.data.tokenizer)
    if not write:
        return config
    if lock is not None:
        lock.acquire()  # before anything is written: a running job's config.yaml must not change under it
        check_run_dir(config, resume)  # again, now that no other job can be writing the directory
    config.data.tokenizer = str(ensure_tokenizer(config, shards))
    check_tokenizer(config, config.data.tokenizer)
    save_config(config, config.run_dir / "config.yaml")
    write_json(build_ds_config(config), config.run_dir / "ds_config.json")
    return config


def deepspeed_executable() -> str:
    beside_python = Path(sys.executable).with_name("deepspeed")
    return str(beside_python) if beside_python.is_file() else "deepspeed"


def master_port(config: TrainConfig) -> int:
    """The configured port; else a free one on a single node (two jobs on one box must not
    collide), else DeepSpeed's usual 29500, which every node must agree on."""
    p = config.parallel
    if p.master_port is not None:
        return p.master_port
    if p.num_nodes > 1 or p.hostfile:
        return 29500
    return free_port()


def command_master_port(cmd: list[str]) -> str | None:
    """The `--master_port` of a deepspeed launcher command from build_command (None if absent)."""
    return cmd[cmd.index("--master_port") + 1] if "--master_port" in cmd[:-1] else None


def build_command(config: TrainConfig, config_path: Path, resume: str | None = None,
                  node_rank: int | None = None) -> list[str]:
    """The deepspeed launcher command for this run (one process per GPU / CPU rank)."""
    p = config.parallel
    cmd = [deepspeed_executable()]
    if p.hostfile:
        cmd += ["--hostfile", p.hostfile, "--num_nodes", str(p.num_nodes)]
    cmd += ["--num_gpus", str(p.num_procs), "--master_port", str(master_port(config))]
    if p.master_addr:
        cmd += ["--master_addr", p.master_addr]
    if node_rank is not None:  # one launcher per node (SLURM): no ssh/pdsh fan-out
        cmd += ["--no_ssh", "--node_rank", str(node_rank)]
    cmd += [str(TRAIN_SCRIPT), "--config", str(config_path)]
    if resume:
        cmd += ["--resume", resume]
    return cmd


def launch_env(config: TrainConfig) -> dict[str, str]:
    """Environment for the ranks: accelerator choice, a sane thread count per rank, and OpenMP
    threads that sleep rather than spin while they wait (benchmarks/cpu_threads.py, docs/training.md)."""
    env = dict(os.environ)
    p = config.parallel
    if p.accelerator == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif p.accelerator == "cuda":
        env["DS_ACCELERATOR"] = "cuda"
    if p.threads_per_proc:
        env["OMP_NUM_THREADS"] = str(p.threads_per_proc)
    else:  # one share of the cores per rank, unless the user already chose
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // p.num_procs)))
    # A spinning OpenMP thread holds its core while it waits for work, taking it from the other
    # rank, the data workers and any neighbouring job; the user's own choice is kept.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def rank_processes(launcher_pid: int) -> list:
    """The training ranks started under the deepspeed launcher (not the launcher itself,
    not DataLoader workers)."""
    import psutil

    try:
        children = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    def is_rank(cmdline: list[str]) -> bool:
        return str(TRAIN_SCRIPT) in cmdline and any(arg.startswith("--local_rank") for arg in cmdline)

    ranks = []
    for child in children:
        try:
            # DataLoader workers are forks of a rank: same command line, but a rank as parent.
            if is_rank(child.cmdline()) and not is_rank(child.parent().cmdline()):
                ranks.append(child)
        except psutil.Error:
            continue
    return ranks


def run_command(cmd: list[str], env: dict[str, str], pass_fds: tuple[int, ...] = ()) -> tuple[int, int | None]:
    """Run the launcher in its own session and wait; returns (exit code, signal forwarded).

    Ctrl-C / SIGTERM here are passed to every training rank (only them: the
    deepspeed launcher would otherwise kill the ranks one at a time), so the
    ranks agree to stop, write a checkpoint and exit cleanly. A second signal
    kills the whole job at once, without a checkpoint. `pass_fds` stay open in
    the launcher process (the run directory's lock).
    """
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, pass_fds=pass_fds)
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        if len(received) > 1:
            print(f"{signal.Signals(signum).name} again: killing the ranks without a checkpoint", file=sys.stderr,
                  flush=True)
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher's session: launcher, ranks, data workers
            except ProcessLookupError:
                pass
            return
        print(f"{signal.Signals(signum).name}: the ranks finish their step and write a checkpoint (send it again "
              "to kill them without one)", file=sys.stderr, flush=True)
        for rank in rank_processes(proc.pid):
            try:
                rank.send_signal(signum)
            except Exception:  # already gone
                pass

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, forward)
    except ValueError:  # not the main thread: signals stay with the caller
        pass
    try:
        return proc.wait(), (received[0] if received else None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        port = command_master_port(cmd)
        if proc.poll() is not None and port is not None:  # the launcher waits for its ranks
            remove_shm_buffers(port)


def run_training(config: str | os.PathLike | dict | TrainConfig, overrides=(), num_procs: int | None = None,
                 resume: str | None = None, dry_run: bool = False, prepare_only: bool = False) -> Path:
    """Check, prepare and run a training job; return its run directory when it is done.

    `config`: a YAML path, a shipped config name ("cpu-demo"), a dict, or a TrainConfig.
    `overrides`: (dotted key, value) pairs, e.g. [("train.steps", 50)].
    `dry_run`: check and print the command only; `prepare_only`: also write the run
    directory (tokenizer, config.yaml, ds_config.json) but start nothing.
    Raises ConfigError before launch, TrainingFailed if the ranks fail,
    TrainingInterrupted if Ctrl-C / SIGTERM stopped them (after their checkpoint).
    """
    overrides = list(overrides)
    if num_procs is not None:
        overrides.append(("parallel.num_procs", int(num_procs)))
    if isinstance(config, TrainConfig):
        config = load_config(config.to_dict(), overrides)
    else:
        config = load_config(config, overrides)
    lock = RunLock(config.run_dir)
    try:
        try:
            lock.check()  # a live job's lock is the first thing to report
            prepare_run(config, resume, write=not dry_run, lock=lock)
        except RunDirectoryBusy as e:
            raise ConfigError(str(e)) from None
        config_path = config.run_dir / "config.yaml"
        cmd = build_command(config, config_path, resume)
        env = launch_env(config)
        shown_env = f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']} "
        if config.parallel.accelerator == "cpu":
            shown_env += "DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES= "
        print(f"run directory: {config.run_dir}", flush=True)
        print(f"command: {shown_env}{shlex.join(cmd)}", flush=True)
        if dry_run or prepare_only:
            return config.run_dir
        env[HELD_ENV] = str(lock.path.resolve())  # rank 0 then knows the job is locked
        returncode, signum = run_command(cmd, env, pass_fds=(lock.fd,))  # the launcher holds it while it lives
    finally:
        lock.release()
    if returncode != 0:
        raise TrainingFailed(returncode, cmd)
    if signum is not None:
        raise TrainingInterrupted(signum, config.run_dir)
    return config.run_dir


def run_train_command(args) -> int:
    try:
        overrides = overrides_from_args(args)
        if args.node_rank is not None:
            # One launcher per node (SLURM): the batch script prepared the run directory once.
            if overrides:  # the ranks read the prepared config.yaml: an override here would be lost
                raise ConfigError(f"--node-rank starts the ranks of a prepared run directory; give "
                                  f"{', '.join(k for k, _ in overrides)} to the --prepare-only step instead")
            config = load_config(args.config, overrides)
            cmd = build_command(config, config.run_dir / "config.yaml", args.resume, node_rank=args.node_rank)
            print(f"command: {shlex.join(cmd)}", flush=True)
            return run_command(cmd, launch_env(config))[0]
        run_training(args.config, overrides, resume=args.resume, dry_run=args.dry_run,
                     prepare_only=args.prepare_only)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return e.returncode if 0 < e.returncode < 256 else 1
    except TrainingInterrupted as e:
        print(str(e), file=sys.stderr)
        return 128 + e.signum
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a LIMoE model with DeepSpeed (CPU ranks, one GPU node, or many nodes)",
        description="Check a training config (YAML in launch/configs/ or your own), train the tokenizer if "
                    "it is missing, write <logs>/<name>/config.yaml and ds_config.json, print the deepspeed "
                    "command and run it. Mistakes are reported before any process starts.",
        epilog="examples:\n  limoe train --config cpu-demo\n"
               "  limoe train --config launch/configs/b16-8gpu.yaml --name b16-run1 --lr 1e-3\n"
               "  limoe train --config cpu-demo --name demo --resume latest\n"
               "  limoe train --config cpu-demo --set model.moe.capacity_factor=2.0 --dry-run",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="training config: a YAML path or a shipped name (cpu-demo)")
    p.add_argument("--resume", default=None, metavar="latest|DIR",
                   help="continue from the run's latest checkpoint (a fresh start if it has none), "
                        "or from a checkpoint folder")
    p.add_argument("--dry-run", action="store_true", help="check everything and print the command; run nothing")
    p.add_argument("--prepare-only", action="store_true",
                   help="check, train the tokenizer if missing, write the run directory (config.yaml, "
                        "ds_config.json) and print the command, but start nothing (launch/slurm.sh uses this)")
    p.add_argument("--node-rank", type=int, default=None,
                   help="(multi-node without ssh, e.g. SLURM) start only this node's ranks; "
                        "the run directory must already be prepared")
    add_override_flags(p)
    p.set_defaults(func=run_train_command)
