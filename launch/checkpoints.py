"""Training checkpoints: <run>/checkpoints/step_XXXXXXXX/ written by the DeepSpeed engine,
with the run's own state (`TrainState`) beside the model, optimizer and scheduler.
Resuming from them, on this layout or another, is launch/resume.py."""
from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from limoe.files import atomic_write

from .distributed import all_reduce_sum
from .export import CLIENT_KEY, MODEL_STATES
from .resume import Layout, ResumeError, load_checkpoint

log = logging.getLogger("limoe.train")


@dataclass
class TrainState:
    """What a checkpoint holds besides the model, optimizer and scheduler."""

    step: int = 0  # optimizer steps done
    batches_drawn: int = 0  # micro-batches drawn from the loader up to `step` (the data position)
    batches_per_epoch: int = 1
    skipped_batches: int = 0  # non-finite losses skipped so far
    samples_seen: int = 0  # samples (all ranks) in the optimizer steps so far


class Checkpoints:
    """<run>/checkpoints/step_XXXXXXXX/ written by the DeepSpeed engine (experts per
    expert-parallel rank), an atomically replaced `latest` file, the newest `keep` kept.
    `layout` is this run's: checkpoints record it, and restore() reshards onto it."""

    def __init__(self, run_dir: Path, keep: int, rank: int, layout: Layout):
        self.dir = run_dir / "checkpoints"
        self.keep = keep
        self.rank = rank
        self.layout = layout
        self.restored_from: Path | None = None  # the checkpoint folder restore() loaded

    @staticmethod
    def tag(step: int) -> str:
        return f"step_{step:08d}"

    def latest_tag(self) -> str | None:
        latest = self.dir / "latest"
        return latest.read_text().strip() if latest.is_file() else None

    def save(self, engine, state: TrainState, model_config, seed: int, ema=None) -> str | None:
        """The tag written, or None if some rank's weights are not finite (nothing is written then:
        `latest` keeps naming the last checkpoint whose weights were finite). The client state
        holds `state`, the model config, this layout and the run's seed. `ema`, a
        launch.ema.WeightAverage, is written beside the engine's files."""
        import deepspeed.comm as dist

        tag = self.tag(state.step)
        if self.latest_tag() == tag:
            return tag  # this step is already saved (e.g. the final step was a periodic one)
        bad = int(all_reduce_sum([torch.tensor(float(nonfinite_tensors(engine.module)))], engine.device)[0])
        if bad:
            log.error("not writing checkpoint %s: %d parameter tensors (counted over the ranks) hold NaN or inf",
                      tag, bad)
            return None
        client = {CLIENT_KEY: {**asdict(state), "model_config": model_config.to_dict(), **asdict(self.layout),
                               "seed": seed}}
        # DeepSpeed's own `latest` is written in place (not atomic); we write ours below.
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client, save_latest=False)
        # save_checkpoint ends with a barrier: every rank's files are on disk.
        if ema is not None:
            ema.save(self.dir / tag, self.rank, self.layout.ep_size, model_config.moe.num_experts)
            dist.barrier()
        if self.rank == 0:
            atomic_write(self.dir / "latest", tag)
            self.prune(current=tag)
        dist.barrier()
        return tag

    def prune(self, current: str) -> None:
        tags = sorted(p.name for p in self.dir.glob("step_*") if p.is_dir())
        for old in tags[: max(0, len(tags) - self.keep)]:
            if old != current:
                shutil.rmtree(self.dir / old, ignore_errors=True)

    def restore(self, engine, resume: str | None, fresh: TrainState, num_experts: int) -> TrainState:
        """The state to continue from: `fresh`, unless --resume finds a checkpoint, which is loaded into the
        engine on the layout that wrote it or resharded onto this one (launch/resume.py)."""
        target = self.resolve(resume)
        if resume and target is None:
            log.info("--resume %s: no checkpoint yet in %s, starting from scratch", resume, self.dir)
        state = fresh
        self.restored_from = None if target is None else target[0] / target[1]
        if target is not None:
            load_dir, tag = target
            try:
                saved = load_checkpoint(engine, load_dir, tag, self.layout, num_experts)
            except ResumeError as e:
                raise SystemExit(f"error: {e}") from e
            state = TrainState(**{k: saved[k] for k in asdict(fresh)})
            log.info("resumed from %s: step %d, data epoch %d (+%d batches), lr %.3e", load_dir / tag, state.step,
                     state.batches_drawn // state.batches_per_epoch, state.batches_drawn % state.batches_per_epoch,
                     engine.lr_scheduler.get_last_lr()[0])
        if engine.global_steps != state.step:
            raise SystemExit(f"error: engine is at step {engine.global_steps}, checkpoint state says {state.step}")
        return state

    def resolve(self, resume: str | None) -> tuple[Path, str] | None:
        """(load dir, tag) for --resume latest|DIR; None for a fresh start."""
        if resume is None:
            return None
        if resume == "latest":
            tag = self.latest_tag()
            return None if tag is None else (self.dir, tag)
        path = Path(resume)
        if not (path / MODEL_STATES).is_file():
            raise SystemExit(f"--resume {resume}: no {MODEL_STATES} there (not a checkpoint folder)")
        return path.parent, path.name


def nonfinite_tensors(module) -> int:
    """How many of the module's parameters hold a NaN or an inf."""
    return sum(1 for p in module.parameters() if not bool(torch.isfinite(p).all()))
