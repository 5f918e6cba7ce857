"""DeepSpeed config (ds_config JSON) from a template plus the training config.

The default template, launch/ds_config_template.json, holds what every run shares;
`stage_keys` adds DeepSpeed's tuning knobs that depend on the precision and the
ZeRO stage (buckets, overlap, communication dtype). Values the training config
owns are written "auto" in a template and filled in here, so there is one place
to set each thing:

    train_micro_batch_size_per_gpu  <- train.batch_size
    gradient_accumulation_steps     <- train.accum_freq
    gradient_clipping               <- train.grad_clip
    bf16.enabled                    <- train.precision == "bf16"
    zero_optimization.stage         <- parallel.zero_stage

A custom template (parallel.ds_config) is used as written, without stage_keys;
it may also give the owned values as concrete values, and one that disagrees
with the training config is an error naming both keys. The optimizer and
scheduler are not in the ds_config: the trainer builds them (AdamW with
MoE-split parameter groups, warmup + cosine).
"""
from __future__ import annotations

import json
from pathlib import Path

from .train_config import ConfigError, TrainConfig

TEMPLATE = Path(__file__).with_name("ds_config_template.json")
BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's own default, written out where the buckets take GPU memory


def stage_keys(precision: str, zero_stage: int) -> dict:
    """What the default template gets for a precision and ZeRO stage. Keyed by precision, as the former
    cpu-fp32 / gpu-bf16 templates were: the shipped GPU configs train in bf16, the CPU ones in fp32."""
    bf16 = precision == "bf16"
    zero = {}
    if zero_stage == 2:
        # overlap_comm reduces on a side CUDA stream during the backward (two buckets); CPU ranks have no streams.
        zero.update(contiguous_gradients=True, overlap_comm=bf16, reduce_scatter=True)
    if bf16:
        zero.update(reduce_bucket_size=BUCKET_ELEMENTS, allgather_bucket_size=BUCKET_ELEMENTS)
        # bf16 gradients are all-reduced in fp32: a sum over many ranks in bf16 loses precision.
        return {"zero_optimization": zero, "communication_data_type": "fp32"}
    return {"zero_optimization": zero}


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
    path = Path(config.parallel.ds_config or TEMPLATE)
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"'parallel.ds_config': {path} not found") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"'parallel.ds_config': {path} is not valid JSON ({e})") from e
    if not config.parallel.ds_config:
        for key, value in stage_keys(config.train.precision, config.parallel.zero_stage).items():
            ds[key] = {**ds[key], **value} if isinstance(value, dict) else value
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
