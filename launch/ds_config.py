"""DeepSpeed config (ds_config JSON) from a template plus the training config.

Templates in launch/ds_configs/ hold DeepSpeed's own tuning knobs (buckets,
overlap, communication dtype). Values the training config owns are written
"auto" there and filled in here, so there is one place to set each thing:

    train_micro_batch_size_per_gpu  <- train.batch_size
    gradient_accumulation_steps     <- train.accum_freq
    gradient_clipping               <- train.grad_clip
    bf16.enabled                    <- train.precision == "bf16"
    zero_optimization.stage         <- parallel.zero_stage

A custom template (parallel.ds_config) may also give these as concrete
values; one that disagrees with the training config is an error naming both
keys. The optimizer and scheduler are not in the ds_config: the trainer
builds them (AdamW with MoE-split parameter groups, warmup + cosine).
"""
from __future__ import annotations

import json
from pathlib import Path

from .train_config import ConfigError, TrainConfig

TEMPLATE_DIR = Path(__file__).parent / "ds_configs"


def default_template(config: TrainConfig) -> Path:
    """cpu-fp32-zero{1,2}.json for fp32, gpu-bf16-zero{1,2}.json for bf16 (stage 0 uses the zero1 file)."""
    family = "gpu-bf16" if config.train.precision == "bf16" else "cpu-fp32"
    stage = max(1, config.parallel.zero_stage)
    return TEMPLATE_DIR / f"{family}-zero{stage}.json"


def _owned_values(config: TrainConfig) -> dict[tuple[str, ...], tuple[object, str]]:
    t = config.train
    return {
        ("train_micro_batch_size_per_gpu",): (t.batch_size, "train.batch_size"),
        ("gradient_accumulation_steps",): (t.accum_freq, "train.accum_freq"),
        ("gradient_clipping",): (float(t.grad_clip), "train.grad_clip"),
        ("bf16", "enabled"): (t.precision == "bf16", "train.precision"),
        ("zero_optimization", "stage"): (config.parallel.zero_stage, "parallel.zero_stage"),
    }


def build_ds_config(config: TrainConfig) -> dict:
    path = Path(config.parallel.ds_config) if config.parallel.ds_config else default_template(config)
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"'parallel.ds_config': {path} not found") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"'parallel.ds_config': {path} is not valid JSON ({e})") from e
    for forbidden in ("optimizer", "scheduler", "train_batch_size", "fp16"):
        if forbidden in ds:
            raise ConfigError(f"'parallel.ds_config': {path} sets '{forbidden}'; the training config owns "
                              "the optimizer, schedule, batch size and precision (remove it from the template)")
    for keys, (value, owner) in _owned_values(config).items():
        node = ds
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        current = node.get(keys[-1], "auto")
        if current != "auto" and current != value:
            raise ConfigError(f"'parallel.ds_config': {path} sets {'.'.join(keys)}={current!r} but "
                              f"'{owner}' gives {value!r}; write \"auto\" in the template or change '{owner}'")
        node[keys[-1]] = value
    if ds["zero_optimization"]["stage"] == 3:
        raise ConfigError("'parallel.zero_stage': ZeRO stage 3 is not supported with DeepSpeed's native MoE")
    return ds


def write_ds_config(ds: dict, path: Path) -> Path:
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(ds, indent=2))
    os.replace(tmp, path)
    return path
