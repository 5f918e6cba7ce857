"""Image preprocessing shared by training, evaluation and the API.

Eval: resize the short side, centre crop, to tensor, normalise.
Train: random resized crop, optional horizontal flip and colour jitter (off
by default: in emoji and many icons direction and colour carry meaning).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torchvision import transforms as T

# open_clip / OpenAI CLIP statistics, so features match the usual conventions.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class AugmentConfig:
    scale_min: float = 0.7
    scale_max: float = 1.0
    hflip: bool = False
    color_jitter: float = 0.0  # brightness/contrast/saturation strength; no hue jitter


def to_rgb(image: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """Convert to RGB, compositing any transparency onto a white background."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")


def image_transform(image_size: int, train: bool = False, augment: AugmentConfig | None = None):
    """Return a callable PIL.Image -> FloatTensor[3, image_size, image_size]."""
    normalize = T.Normalize(MEAN, STD)
    if not train:
        steps = [
            T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(image_size),
        ]
    else:
        augment = augment or AugmentConfig()
        steps = [
            T.RandomResizedCrop(
                image_size,
                scale=(augment.scale_min, augment.scale_max),
                interpolation=T.InterpolationMode.BICUBIC,
                antialias=True,
            )
        ]
        if augment.hflip:
            steps.append(T.RandomHorizontalFlip())
        if augment.color_jitter > 0:
            c = augment.color_jitter
            steps.append(T.ColorJitter(brightness=c, contrast=c, saturation=c))
    return T.Compose([to_rgb, *steps, T.ToTensor(), normalize])

