"""open_clip-style constructors: create_model, create_model_and_transforms, load."""
from __future__ import annotations

import dataclasses
import os

import torch

from . import checkpoint
from .config import LIMoEConfig, TwoTowerConfig, get_config
from .model import LIMoE
from .transforms import image_transform


def create_model(name_or_config: str | LIMoEConfig | TwoTowerConfig, ep_size: int = 1, **overrides):
    """A LIMoE (or, for an `open_clip-*` name or a TwoTowerConfig, the dense open_clip peer)."""
    if isinstance(name_or_config, (LIMoEConfig, TwoTowerConfig)):
        config = dataclasses.replace(name_or_config, **overrides) if overrides else name_or_config
    else:
        config = get_config(name_or_config, **overrides)
    if isinstance(config, TwoTowerConfig):
        from .two_tower import TwoTowerCLIP

        return TwoTowerCLIP(config, ep_size=ep_size)
    return LIMoE(config, ep_size=ep_size)


def create_model_and_transforms(name_or_config: str | LIMoEConfig, tokenizer=None, ep_size: int = 1,
                                **overrides):
    """Return (model, preprocess, tokenizer) like open_clip.

    `tokenizer` is a tokenizer or a path to one (a SentencePiece tokenizer.model, or an
    open_clip BPE tokenizer.bpe.json); the model's vocab_size and context_length follow it.
    Nothing is downloaded: train a SentencePiece model with `limoe tokenizer train`, or use
    `limoe.BPETokenizer()`, open_clip's vocabulary shipped in its package.
    """
    from .tokenizer import load_tokenizer

    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    if tokenizer is not None:
        overrides.setdefault("vocab_size", tokenizer.vocab_size)
        overrides.setdefault("context_length", tokenizer.context_length)
    model = create_model(name_or_config, ep_size=ep_size, **overrides)
    return model, image_transform(model.config.image_size, train=False), tokenizer


def load(export_dir: str | os.PathLike, device: str | torch.device = "cpu"):
    """Open a `limoe.save` export on one process: (model in eval mode, preprocess, tokenizer)."""
    config, _ = checkpoint.read_config(export_dir)
    tokenizer = checkpoint.load_tokenizer(export_dir, context_length=config.context_length)
    model = create_model(config)
    checkpoint.load_weights(model, export_dir)
    model.to(device).eval()
    return model, image_transform(config.image_size, train=False), tokenizer
