"""Workarounds for DeepSpeed 0.19.8, kept in one place.

1. `DeepSpeedEngine._broadcast_model` broadcasts every parameter as
   `p.data.view(torch.uint8)`, which raises "self.dim() cannot be 0 to view
   Float as Byte" for 0-dim parameters, such as LIMoE's (and CLIP's)
   `logit_scale`. We wrap it: 0-dim parameters are viewed as 1-element tensors
   for the broadcast (same storage, so the broadcast value lands in the
   parameter) and viewed back as 0-dim afterwards. Nothing else changes.

2. On CPU, every rank's shared-memory all-reduce op creates
   `/dev/shm/deepspeed_allreduce_buffer_<uid>_<master addr>_<master port>_<rank>`
   (69 MB each) and never unlinks it. /dev/shm is RAM: with a fresh port per
   job, a few hours of tests and benchmarks on a 24 GB box left 289 of them
   (19 GB), and the machine started to page (a 1.5-minute run slowed to 51 s a
   step). `remove_shm_buffers` deletes them: each training rank at exit, and
   the launcher once the ranks have exited.

3. Without a GPU, DeepSpeed's accelerator detection prints a warning on
   stdout at import, which would corrupt machine-readable output.
   `default_to_cpu_accelerator` says so up front; launch/__init__.py calls it,
   before any module here imports deepspeed (limoe/ never does).
"""
from __future__ import annotations

import glob
import os

_PATCHED = False
SHM_DIR = "/dev/shm"
SHM_BUFFER_PREFIX = "deepspeed_allreduce_buffer"


def default_to_cpu_accelerator() -> None:
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def patch_broadcast_of_scalar_parameters() -> None:
    global _PATCHED
    if _PATCHED:
        return
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine._broadcast_model

    def broadcast_model(self):
        scalars = [p for p in self.module.parameters() if p.dim() == 0]
        for p in scalars:
            p.data = p.data.view(1)
        try:
            original(self)
        finally:
            for p in scalars:
                p.data = p.data.view(())

    DeepSpeedEngine._broadcast_model = broadcast_model
    _PATCHED = True


def remove_shm_buffers(master_port: int | str, rank: int | None = None, shm_dir: str = SHM_DIR) -> list[str]:
    """Delete this user's DeepSpeed CPU all-reduce buffers of the job on `master_port`
    (one rank's, or every rank's); returns the paths removed.

    Safe once every rank has opened its peers' buffers (DeepSpeed does that when the
    process group starts): an unlinked buffer stays mapped where it is open. Each rank
    removes its own at exit, and the launcher removes all of them after the ranks exit
    (which also covers ranks that were killed).
    """
    uid = os.getuid() if hasattr(os, "getuid") else 0
    suffix = "*" if rank is None else str(rank)
    removed = []
    for path in glob.glob(os.path.join(shm_dir, f"{SHM_BUFFER_PREFIX}_{uid}_*_{master_port}_{suffix}")):
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:  # already gone, or not ours to remove
            pass
    return removed
