"""Parameter counts and analytic forward FLOPs (1 multiply-add = 2 FLOPs)."""
from __future__ import annotations

import torch

from .config import LIMoEConfig, TwoTowerConfig


def count_parameters(model: torch.nn.Module) -> dict:
    """Total parameters, expert parameters, and those active for one token (k experts per MoE layer)."""
    total = sum(p.numel() for p in model.parameters())
    experts = inactive = 0
    for layer in model.moe_layers():
        per_expert = sum(p.numel() for p in layer.deepspeed_moe.experts.deepspeed_experts[0].parameters())
        experts += layer.num_experts * per_expert
        inactive += (layer.num_experts - layer.gate.k) * per_expert
    return {"total": total, "experts": experts, "active_per_token": total - inactive}


def _sequence_flops(c: LIMoEConfig, n: int, causal: bool) -> dict:
    d, h = c.width, c.mlp_dim
    kv_dim = (c.kv_heads or c.heads) * (d // c.heads)
    moe = set(c.moe.moe_layers(c.depth))
    mlp_mults = 3 if c.moe.expert_type == "swiglu" else 2
    attn_proj = 2 * n * (2 * d * d + 2 * d * kv_dim)
    attn_scores = 2 * 2 * n * n * d * (0.5 if causal else 1.0)
    mlp = 2 * n * mlp_mults * d * h
    flops = {"attention": 0.0, "mlp": 0.0, "router": 0.0}
    for i in range(c.depth):
        flops["attention"] += attn_proj + attn_scores
        if i in moe:
            flops["mlp"] += c.moe.k * mlp
            flops["router"] += 2 * n * d * c.moe.num_experts
        else:
            flops["mlp"] += mlp
    flops["head"] = 2 * d * c.embed_dim
    return flops


def flops_per_pair(c: LIMoEConfig | TwoTowerConfig) -> dict:
    """Forward FLOPs for one image and one text of full context length (training ~3x).
    The open_clip peer runs the same formulas on its two towers (plus its class token)."""
    class_token = c.image_pool in ("tok", "cls")
    image = _sequence_flops(c, c.num_patches + class_token, causal=False)
    image["embed"] = 2 * c.num_patches * 3 * c.patch_size ** 2 * c.width
    text = _sequence_flops(c, c.context_length, causal=True)
    img, txt = sum(image.values()), sum(text.values())
    return {"image": img, "text": txt, "total": img + txt, "image_parts": image, "text_parts": text}


def measured_flops_per_pair(model: torch.nn.Module, pairs: int = 8) -> float:
    """Forward FLOPs per image-text pair as torch's FlopCounterMode counts them (matmuls,
    convolutions, attention) on a batch of random images and full-length texts: one
    counter for every kind of model, so LIMoE and the open_clip peer are measured alike.
    Runs in eval mode (a LIMoE routes dropless: each token reaches its k experts)."""
    from torch.utils.flop_counter import FlopCounterMode

    c = model.config
    images = torch.zeros(pairs, 3, c.image_size, c.image_size)
    tokens = torch.full((pairs, c.context_length), 5, dtype=torch.long)
    tokens[:, -1] = getattr(c, "eos_id", 2) if isinstance(c, TwoTowerConfig) and c.text_pool == "eos" else c.vocab_size - 1
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:  # (under no_grad its module tracker fails)
            model.encode_image(images)
            model.encode_text(tokens)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / pairs
