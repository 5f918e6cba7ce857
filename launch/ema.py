"""An exponential moving average (EMA) of the weights, kept beside training (`train.ema_decay`).

After every optimizer step each rank updates an fp32 copy of the parameters it holds (all of
the shared ones, its own experts):

    ema <- d * ema + (1 - d) * weight,    d = min(decay, (1 + step) / (10 + step))

The ramp on `d` (as in TensorFlow's ExponentialMovingAverage with num_updates, and timm's
ModelEmaV2 warmup) keeps the first steps' random weights from dominating the average of a
short run. Training itself never reads the average: the trajectory, and so a seeded run's raw
weights, are the same with it on or off.

Checkpoints keep it beside DeepSpeed's files, under global expert ids, so a run resumes with
its average on any number of ranks:

    ema_model_states.safetensors          every non-expert parameter (rank 0)
    ema_experts_ep_rank_<R>.safetensors   the experts of expert-parallel rank R (ranks 0..ep_size-1)

`limoe export` writes the average when a checkpoint has it (`--weights raw` for the other),
and zero-shot evaluation during training scores it.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

import torch

from limoe.checkpoint import EXPERT_KEY, shard_experts

from .resume import global_name

EMA_SHARED_FILE = "ema_model_states.safetensors"
EMA_EXPERT_FILE = re.compile(r"^ema_experts_ep_rank_(\d+)\.safetensors$")


def ema_expert_file(ep_rank: int) -> str:
    return f"ema_experts_ep_rank_{ep_rank:03d}.safetensors"


def has_ema(folder: Path) -> bool:
    return (Path(folder) / EMA_SHARED_FILE).is_file()


def read_ema(folder: Path) -> dict[str, torch.Tensor]:
    """The whole average (global expert ids) from a checkpoint folder; {} if it has none. A file
    that cannot be read is a ValueError naming it."""
    from safetensors.torch import load_file

    def load(path: Path) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(path))
        except Exception as e:  # truncated, or not a safetensors file
            raise ValueError(f"{path}: unreadable weight-average file ({type(e).__name__}: {e})") from e

    folder = Path(folder)
    if not has_ema(folder):
        return {}
    state = load(folder / EMA_SHARED_FILE)
    for path in sorted(folder.iterdir()):
        if EMA_EXPERT_FILE.match(path.name):
            state.update(load(path))
    return state


class WeightAverage:
    """The EMA of one rank's parameters (names as in `module.named_parameters()`, local expert ids)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.average = {name: p.detach().float().clone() for name, p in module.named_parameters()}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        """Fold in the weights after optimizer step `step` (1 for the first)."""
        d = self.decay_at(step)
        for name, p in module.named_parameters():
            self.average[name].lerp_(p.detach().float(), 1.0 - d)

    @contextmanager
    def swapped_in(self, module: torch.nn.Module):
        """Run the block with the average in `module`'s parameters, then put the weights back."""
        params = dict(module.named_parameters())
        saved = {name: p.detach().clone() for name, p in params.items()}
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(self.average[name])
        try:
            yield module
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(saved[name])

    # -- checkpoints -------------------------------------------------------------------------

    def save(self, folder: Path, rank: int, ep_size: int, num_experts: int) -> None:
        """Write this rank's part into a checkpoint folder: rank 0 the shared parameters, ranks
        0..ep_size-1 (one expert-parallel group, DeepSpeed's consecutive ranks) their experts."""
        from safetensors.torch import save_file

        from limoe.files import atomic_path

        if rank >= ep_size:  # rank 0 is always in the first group
            return
        shared = {n: t for n, t in self.average.items() if EXPERT_KEY.match(n) is None}
        experts = {global_name(n, rank, ep_size, num_experts): t
                   for n, t in self.average.items() if EXPERT_KEY.match(n) is not None}
        parts = {EMA_SHARED_FILE: shared} if rank == 0 else {}
        if experts:
            parts[ema_expert_file(rank)] = experts
        for filename, tensors in parts.items():
            with atomic_path(Path(folder) / filename) as tmp:
                save_file({n: t.contiguous() for n, t in tensors.items()}, tmp)

    def load(self, folder: Path, ep_rank: int, ep_size: int, num_experts: int) -> bool:
        """Take this rank's part of a saved average (written on any layout); False if the folder has
        none (the average then starts again from the resumed weights)."""
        state = read_ema(folder)
        if not state:
            return False
        mine = shard_experts(state, ep_rank, ep_size, num_experts)
        missing = sorted(set(self.average) - set(mine))
        if missing:
            raise ValueError(f"{folder}: the weight average lacks {missing[:4]} (incomplete checkpoint?)")
        for name in self.average:
            if tuple(mine[name].shape) != tuple(self.average[name].shape):
                raise ValueError(f"{folder}: the weight average's {name} has shape {tuple(mine[name].shape)}, "
                                 f"the model's is {tuple(self.average[name].shape)}")
            self.average[name] = mine[name].float().clone()
        return True
