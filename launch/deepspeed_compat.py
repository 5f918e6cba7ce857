"""One workaround for DeepSpeed 0.19.8, kept in one place.

`DeepSpeedEngine._broadcast_model` broadcasts every parameter as
`p.data.view(torch.uint8)`, which raises "self.dim() cannot be 0 to view
Float as Byte" for 0-dim parameters, such as LIMoE's (and CLIP's)
`logit_scale`. We wrap it: 0-dim parameters are viewed as 1-element tensors
for the broadcast (same storage, so the broadcast value lands in the
parameter) and viewed back as 0-dim afterwards. Nothing else changes.
"""
from __future__ import annotations

_PATCHED = False


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
