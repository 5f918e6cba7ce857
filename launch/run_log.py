"""What a run reports: rank 0's metrics.jsonl, TensorBoard and/or wandb (launch/tracking.py) and
progress bar (`RunLog`), and the `limoe.train` log (stdout; rank 0's also in <run>/out.log)."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from limoe.files import atomic_write

from .tracking import finish_wandb, scalars, start_wandb
from .train_config import TrainConfig, report_targets

log = logging.getLogger("limoe.train")


class RunLog:
    """Rank 0's outputs: metrics.jsonl (appended), TensorBoard and/or wandb (`logging.report_to`,
    launch/tracking.py), and the progress bar."""

    def __init__(self, run_dir: Path, start_step: int, total_steps: int, enabled: bool,
                 config: TrainConfig | None = None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.bar = self.tb = self.wandb = None
        if not enabled:
            return
        self._drop_records_after(start_step)
        from tqdm import tqdm

        targets = report_targets(config.logging.report_to) if config is not None else ["tensorboard"]
        if "tensorboard" in targets:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events a crashed run logged past the checkpoint we resume from.
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        if "wandb" in targets:
            self.wandb = start_wandb(config, run_dir)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        mininterval=1.0, file=sys.stdout)

    def _drop_records_after(self, step: int) -> None:
        """A resumed run redoes the steps after its checkpoint: move their old records to
        metrics.discarded.jsonl (nothing is deleted) so the curve continues from `step`."""
        if not self.path.is_file():
            return
        keep, drop = [], []
        for line in self.path.read_text().splitlines(keepends=True):
            try:
                record_step = json.loads(line).get("step", 0)
            except json.JSONDecodeError:
                record_step = step + 1  # a torn last line from a killed run
            (keep if record_step <= step else drop).append(line)
        if drop:
            with open(self.path.with_name("metrics.discarded.jsonl"), "a") as f:
                f.writelines(drop)
            atomic_write(self.path, "".join(keep))

    def record(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        curves = scalars(metrics)
        if self.tb is not None:
            for key, value in curves.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(curves, step=step)

    def progress(self, step: int, m: dict) -> None:
        if not self.enabled:
            return
        self.bar.update(step - self.bar.n)
        post = {"loss": f"{m['loss']:.4f}", "clip": f"{m['contrastive_loss']:.4f}", "aux": f"{m['aux_loss']:.4f}",
                "lr": f"{m['lr']:.2e}", "smp/s": f"{m['samples_per_s']:.1f}",
                "smp/s/dev": f"{m['samples_per_s_per_device']:.1f}", "data": f"{100 * m['data_wait_fraction']:.0f}%"}
        if "drop_rate/image" in m:
            post["drop img/txt"] = f"{100 * m['drop_rate/image']:.1f}%/{100 * m['drop_rate/text']:.1f}%"
        self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            finish_wandb(self.wandb)


def setup_logging(run_dir: Path, rank: int) -> None:
    import warnings

    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)  # DeepSpeed's INFO lines drown the progress bar
    # torch.distributed deprecation notices raised inside open_clip's and DeepSpeed's collectives
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*(all_gather|torch\.distributed).*")
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    log.addHandler(stream)
    if rank == 0:
        file = logging.FileHandler(run_dir / "out.log")
        file.setFormatter(fmt)
        log.addHandler(file)
