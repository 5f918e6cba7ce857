"""Training objective: contrastive loss (open_clip's) plus the routing aux loss.

The contrastive part reuses open_clip: `ClipLoss(local_loss=True,
gather_with_grad=True)` gathers features from every data-parallel rank with
gradient and computes this rank's rows; `SigLipLoss` is the sigmoid option.
The auxiliary routing losses are computed inside the MoE gates (routing.py)
and arrive already weighted in `outputs["aux_loss"]`.
"""
from __future__ import annotations

import torch
from open_clip.loss import ClipLoss, SigLipLoss


class LIMoELoss(torch.nn.Module):
    def __init__(self, kind: str = "clip", rank: int = 0, world_size: int = 1):
        super().__init__()
        if kind == "clip":
            self.contrastive = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
        elif kind == "siglip":
            self.contrastive = SigLipLoss(rank=rank, world_size=world_size)
        else:
            raise ValueError(f"unknown contrastive loss {kind!r} (expected 'clip' or 'siglip')")
        self.kind = kind

    def forward(self, outputs: dict) -> dict:
        args = [outputs["image_features"], outputs["text_features"], outputs["logit_scale"]]
        if self.kind == "siglip":
            args.append(outputs["logit_bias"])
        contrastive = self.contrastive(*args)
        aux = outputs["aux_loss"]
        return {"loss": contrastive + aux, "contrastive_loss": contrastive, "aux_loss": aux}
