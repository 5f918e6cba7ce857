"""The dense two-tower peer: open_clip's CLIP, with the interface limoe's trainer, exports
and evaluation use.

`TwoTowerCLIP` holds an `open_clip.CLIP` built from config dicts (a ViT image tower and
a causal text transformer, no pretrained weights, nothing downloaded) and answers like a
LIMoE: `forward(images, tokens)` returns normalised features, the clamped logit scale and
an empty auxiliary loss; `encode_image` / `encode_text(normalize=)`; no MoE layers. So
`limoe train` trains it through the same DeepSpeed loop, data, schedule and augmentation
as LIMoE, `limoe.save` / `limoe.load` export it, and zero-shot evaluation scores it the
same way. Its weights keep open_clip's names under `clip.`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import TwoTowerConfig


def build_open_clip(config: TwoTowerConfig):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=config.depth, width=config.width, head_width=config.width // config.heads,
                           mlp_ratio=config.mlp_dim / config.width, patch_size=config.patch_size,
                           image_size=config.image_size, pool_type=config.image_pool)
    text = CLIPTextCfg(context_length=config.context_length, vocab_size=config.vocab_size, width=config.width,
                       heads=config.heads, layers=config.depth, mlp_ratio=config.mlp_dim / config.width,
                       pool_type=config.text_pool, eos_id=config.eos_id)
    return CLIP(embed_dim=config.embed_dim, vision_cfg=vision, text_cfg=text,
                init_logit_scale=config.logit_scale_init)


class TwoTowerCLIP(nn.Module):
    def __init__(self, config: TwoTowerConfig, ep_size: int = 1):
        super().__init__()
        if ep_size != 1:
            raise ValueError(f"{config.name} is dense (no experts): ep_size must be 1, got {ep_size}")
        self.config = config
        self.ep_size = 1
        self.clip = build_open_clip(config)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    def moe_layers(self) -> list:
        return []

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.clip.set_grad_checkpointing(enable)

    def set_eval_routing(self, dropless: bool = True, capacity_factor: float | None = None) -> None:
        """No routing in a dense model."""

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.clip.encode_image(images, normalize=normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.clip.encode_text(tokens, normalize=normalize)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict:
        image = self.encode_image(images, normalize=True)
        return {
            "image_features": image,
            "text_features": self.encode_text(tokens, normalize=True),
            "logit_scale": self.clip.logit_scale.exp().clamp(max=self.config.logit_scale_max),
            "aux_loss": image.new_zeros(()),
            "aux_terms": {},
            "routing": [],
            "drop_rate": {},
        }

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        self.clip.logit_scale.clamp_(max=math.log(self.config.logit_scale_max))
