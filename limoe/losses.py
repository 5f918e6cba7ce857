"""Training objective: contrastive loss (open_clip's) plus the routing aux loss.

The contrastive part reuses open_clip: `ClipLoss(local_loss=True,
gather_with_grad=True)` gathers features from every data-parallel rank with
gradient and computes this rank's rows; `SigLipLoss` is the sigmoid option.
With caption keys from the loader (`data.caption_positives`), the softmax loss
counts every image whose captions include a batch caption as a positive of that
caption (`CaptionPositivesLoss`), not only the image it was drawn for.
The auxiliary routing losses are computed inside the MoE gates (routing.py)
and arrive already weighted in `outputs["aux_loss"]`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from .config import POSITIVES_MODES


def positives_mask(image_keys: torch.Tensor, text_keys: torch.Tensor) -> torch.Tensor:
    """[images, texts] bool: text j describes image i, i.e. the caption drawn for text j is
    one of image i's captions. `image_keys` [images, M] as the loader makes them
    (`data_pipelines.loader.caption_keys`): the keys of each sample's captions, the one drawn
    for it in column 0, 0-padded; `text_keys` [texts] is column 0 of the texts' rows. Keys are
    never 0, so padding matches nothing."""
    return (image_keys[:, :, None] == text_keys[None, None, :]).any(dim=1)


def soft_cross_entropy(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the uniform distribution over each row's positives; with one
    positive per row (the diagonal) this is F.cross_entropy with labels arange(n)."""
    targets = positives.float() / positives.sum(dim=1, keepdim=True)
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


class CaptionPositivesLoss(ClipLoss):
    """Softmax InfoNCE with every caption-sharing pair a positive (multi-positive, as UniCL).

    A class-level caption ("a face smiling emoji") drawn for one sample also describes the
    other samples of its class in the batch; plain InfoNCE pushes those images away from it.
    Each caption's target is spread evenly over the images that have it. Each image's target:
    `mode="both"` (UniCL) spreads it evenly over the batch captions it has; `mode="text"` keeps
    it on the image's own caption and leaves the other captions it has out of its softmax (not
    pulled towards, not pushed away). Across data-parallel ranks the keys are gathered with the
    features, so positives on other ranks count too.
    """

    def __init__(self, *args, mode: str = "both", **kwargs):
        super().__init__(*args, **kwargs)
        if mode not in POSITIVES_MODES:
            raise ValueError(f"caption positives mode must be one of {POSITIVES_MODES}, got {mode!r}")
        self.mode = mode

    def forward(self, image_features, text_features, logit_scale, caption_keys):
        logits_per_image, logits_per_text = self.get_logits(image_features, text_features, logit_scale)
        all_keys = caption_keys
        if self.world_size > 1:
            gathered = [torch.empty_like(caption_keys) for _ in range(self.world_size)]
            torch.distributed.all_gather(gathered, caption_keys)
            all_keys = torch.cat(gathered)
        image_positives = positives_mask(caption_keys, all_keys[:, 0])  # this rank's images x all texts
        text_positives = positives_mask(all_keys, caption_keys[:, 0]).T  # this rank's texts x all images
        if self.mode == "both":
            image_loss = soft_cross_entropy(logits_per_image, image_positives)
        else:  # own caption only; the image's other captions in the batch out of its softmax
            own = torch.arange(len(caption_keys), device=caption_keys.device) + self.rank * len(caption_keys)
            others = image_positives.clone()
            others[torch.arange(len(own)), own] = False
            image_loss = F.cross_entropy(logits_per_image.masked_fill(others, float("-inf")), own)
        return (image_loss + soft_cross_entropy(logits_per_text, text_positives)) / 2


class LIMoELoss(torch.nn.Module):
    def __init__(self, kind: str = "clip", rank: int = 0, world_size: int = 1, positives: str = "both"):
        """`positives`: CaptionPositivesLoss's mode, used when caption keys are passed."""
        super().__init__()
        if kind == "clip":
            self.contrastive = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
        elif kind == "siglip":
            self.contrastive = SigLipLoss(rank=rank, world_size=world_size)
        else:
            raise ValueError(f"unknown contrastive loss {kind!r} (expected 'clip' or 'siglip')")
        self.kind = kind
        self.caption_positives = CaptionPositivesLoss(local_loss=True, gather_with_grad=True, rank=rank,
                                                      world_size=world_size, mode=positives) if kind == "clip" else None

    def forward(self, outputs: dict, caption_keys: torch.Tensor | None = None) -> dict:
        """`caption_keys` (from a loader with `caption_positives`): every image with a batch
        caption among its captions is a positive of that caption (`CaptionPositivesLoss`)."""
        args = [outputs["image_features"], outputs["text_features"], outputs["logit_scale"]]
        if caption_keys is not None:
            if self.caption_positives is None:
                raise ValueError("caption positives need the softmax loss ('clip'), not 'siglip'")
            contrastive = self.caption_positives(*args, caption_keys)
        else:
            if self.kind == "siglip":
                args.append(outputs["logit_bias"])
            contrastive = self.contrastive(*args)
        aux = outputs["aux_loss"]
        return {"loss": contrastive + aux, "contrastive_loss": contrastive, "aux_loss": aux}
