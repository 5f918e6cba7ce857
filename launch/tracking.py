"""Experiment tracking besides metrics.jsonl: TensorBoard and Weights & Biases, as open_clip's --report-to.

`logging.report_to` chooses (see train_config.report_targets). wandb is optional
(not a dependency): asking for it without it installed is a ConfigError before
launch (train_config.check_files) and a MissingTracker here. A W&B run is named
and identified by the run name, lives in `<run>/wandb/`, gets the resolved
config, and is resumed (`resume="allow"`) when the run is. `WANDB_MODE=offline`
needs no account and no network: the run is written locally, for `wandb sync`.
"""
from __future__ import annotations

from pathlib import Path


class MissingTracker(RuntimeError):
    pass


def start_wandb(config, run_dir: Path):
    """A wandb run for this training run (rank 0 only)."""
    try:
        import wandb
    except ImportError as error:
        raise MissingTracker(f"logging.report_to asks for wandb, but it does not import ({error}): pip install "
                             "wandb, or report to tensorboard only") from None
    return wandb.init(project=config.logging.wandb_project, name=config.name, id=config.name,
                      notes=config.logging.wandb_notes, dir=str(run_dir), config=config.to_dict(),
                      resume="allow")


def finish_wandb(run) -> None:
    """Finish the run and wait for wandb's service process to write it: `finish()` alone returned
    before the offline run's .wandb file had its records in 2 of 5 tries here; `teardown()` waits."""
    import wandb

    run.finish()
    wandb.teardown()


def scalars(metrics: dict) -> dict[str, float]:
    """The numbers of a metrics record that are curves (not wall-clock time or the epoch counter)."""
    return {key: value for key, value in metrics.items()
            if isinstance(value, (int, float)) and key not in ("time", "epoch")}
