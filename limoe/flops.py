"""Parameter counts and analytic forward FLOPs (1 multiply-add = 2 FLOPs)."""
from __future__ import annotations

import torch

from .config import LIMoEConfig, TwoTowerConfig


def count_parameters(model: torch.nn.Module) -> dict:
    """Total parameters, expert parameters, and those active for one token (k experts per MoE layer)."""
    total = sum(p.numel() for p in model.parameters())
    experts = inactive = 0
    for layer in model.moe_layers():
        per_expert = sum(p.numel() for p in layer.experts.deepspeed_experts[0].parameters())
        experts += layer.num_experts * per_expert
        inactive += (layer.num_experts - layer.gate.k) * per_expert
    return {"total": total, "experts": experts, "active_per_token": total - inactive}


def image_tokens(c: LIMoEConfig | TwoTowerConfig) -> int:
    """Tokens per image through the blocks: the patches, plus a class token if the image pools at one."""
    return c.num_patches + (c.image_pool in ("tok", "cls"))


def _sequence_flops(c: LIMoEConfig, n: int, causal: bool) -> dict:
    d, h = c.width, c.mlp_dim
    kv_dim = (c.kv_heads or c.heads) * (d // c.heads)
    moe = set(c.moe.moe_layers(c.depth))
    mlp_mults = 3 if c.moe.expert_type == "swiglu" else 2
    attn_proj = 2 * n * (2 * d * d + 2 * d * kv_dim)
    attn_scores = 2 * 2 * n * n * d * (0.5 if causal else 1.0)
    mlp = 2 * n * mlp_mults * d * h
    expert = 2 * n * mlp_mults * d * c.expert_hidden if moe else 0
    shared = 2 * n * mlp_mults * d * c.moe.shared_expert_mlp_dim
    flops = {"attention": 0.0, "mlp": 0.0, "router": 0.0}
    for i in range(c.depth):
        flops["attention"] += attn_proj + attn_scores
        if i in moe:
            flops["mlp"] += c.moe.k * expert + shared
            flops["router"] += 2 * n * d * c.moe.num_experts
        else:
            flops["mlp"] += mlp
    flops["head"] = 2 * d * c.embed_dim
    return flops


def flops_per_pair(c: LIMoEConfig | TwoTowerConfig) -> dict:
    """Forward FLOPs for one image and one text of full context length (training ~3x).
    The open_clip peer runs the same formulas on its two towers (plus its class token)."""
    image = _sequence_flops(c, image_tokens(c), causal=False)
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


# -- activation memory -----------------------------------------------------------------------
#
# What autograd keeps from one training forward until its backward, counted tensor by
# tensor from the code in layers.py, model.py and moe.py (per rank, for `batch` image-text
# pairs with full-length texts; `b` = bytes per activation element, 4 fp32 / 2 bf16):
#
#   every block, per token     LayerNorm inputs (2 x d), LayerNorm outputs, q, k+v, the
#                              attention output (d + d + 2 kv_dim + d), fp32 LayerNorm
#                              statistics (2 x 2 x 4 bytes) and the fp32 attention
#                              log-sum-exp (heads x 4 bytes)
#   dense MLP, per token       the input and the hidden twice (d + 2h; SwiGLU d + 4h)
#   shared expert              its hidden activations (2h a token; SwiGLU 4h), and in
#                              16-bit its input (in fp32 that is the router's copy)
#   MoE layer                  the router's fp32 copy of its input (d x 4 bytes) and its
#                              per-expert probabilities (clean and noisy softmax, the masked
#                              products of the aux losses: about 5 x E x 4 bytes a token), the slot map
#                              (int64 indices), the [E, C, d] dispatch buffer the experts
#                              read and the [E, C, d] expert outputs the combine keeps, and
#                              the experts' hidden activations for all E x C rows (the CPU
#                              per-expert loop runs each expert on its whole buffer too:
#                              skipping empty slots would read the counts back to the host);
#                              the batched path also keeps the stacked expert weights it
#                              multiplied with
#   outside the blocks         the input images (the patch convolution keeps them) and
#                              token ids, the final LayerNorms, the MAP pooling heads' keys
#                              and values, and the contrastive logits
#
# With gradient checkpointing each block keeps only its input (S x d) (and the MoE slot
# map, which lives on an autograd node, not in its saved tensors), and during the
# backward one block at a time is recomputed whole. On top of what is kept, the backward
# of a block holds a few gradients at once (the residual stream's, an expert buffer's):
# the "workspace" below. test_plan.py checks the kept bytes against what
# torch really allocates; benchmarks/plan_check.py checks whole training steps.

LAYERNORM_STATS_BYTES = 2 * 4  # mean and rstd, fp32, per token
INT64 = 8
CPU_RNG_STATE_BYTES = 5056  # torch.get_rng_state().numel()


def expert_capacity_rows(c: LIMoEConfig, tokens: int, capacity_factor: float | None = None) -> tuple[int, int]:
    """(E, C) of one MoE layer's [E, C, d] dispatch buffer for `tokens` routed tokens (training)."""
    from .routing import expert_capacity

    cf = c.moe.capacity_factor if capacity_factor is None else capacity_factor
    return c.moe.num_experts, expert_capacity(tokens, c.moe.num_experts, c.moe.k, cf)


def _mlp_saved_elements(c: LIMoEConfig, rows: int, hidden: int) -> int:
    """Hidden activations an MLP (or one expert) of `hidden` units keeps for `rows` input rows."""
    return rows * (4 if c.moe.expert_type == "swiglu" else 2) * hidden


def block_activation_bytes(c: LIMoEConfig, batch: int, b: int, moe: bool, *, batched_experts: bool = False,
                           ep_size: int = 1) -> dict:
    """Bytes one block keeps for its backward, by part (see the table above)."""
    d, heads = c.width, c.heads
    kv_dim = (c.kv_heads or heads) * (d // heads)
    tokens = batch * (image_tokens(c) + c.context_length)
    parts = {
        # norm1 input, norm1 output, q, k + v, attention output; norm2 input.
        "attention": tokens * ((5 * d + 2 * kv_dim) * b + 2 * LAYERNORM_STATS_BYTES + heads * 4),
    }
    if not moe:
        parts["mlp"] = tokens * d * b + _mlp_saved_elements(c, tokens, c.mlp_dim) * b
        return parts
    num_experts, capacity = expert_capacity_rows(c, tokens)
    k = c.moe.k
    rows = num_experts * capacity  # per rank, before and after the all-to-all
    hidden_rows = rows  # every expert runs on its whole buffer: skipping empty slots would read counts back
    parts["router"] = tokens * (d * 4 + 5 * num_experts * 4 + (k + 2) * INT64 + 2)
    parts["slot_map"] = k * tokens * (INT64 + 1) + rows * (INT64 + 1 + 4)
    parts["moe_buffers"] = 2 * rows * d * b  # dispatch buffer + expert outputs, [E, C, d] each
    parts["experts"] = _mlp_saved_elements(c, hidden_rows, c.expert_hidden) * b
    if c.moe.shared_expert_mlp_dim:
        # Its hidden activations; its input is the router's (in fp32 the router's fp32 copy is that
        # same tensor, counted above; otherwise the shared MLP keeps its own, in the model's dtype).
        parts["shared_expert"] = (_mlp_saved_elements(c, tokens, c.moe.shared_expert_mlp_dim)
                                  + (0 if b == 4 else tokens * d)) * b
    if batched_experts:
        local = num_experts // ep_size
        per_expert = (3 if c.moe.expert_type == "swiglu" else 2) * d * c.expert_hidden + c.expert_hidden + d
        parts["expert_weight_copies"] = local * per_expert * b
    return parts


def block_backward_workspace(c: LIMoEConfig, batch: int, b: int, moe: bool, *, batched_experts: bool = False,
                             ep_size: int = 1) -> int:
    """Gradients one block's backward holds at once on top of its kept activations: the
    residual stream's two (2 x S x d), and in an MoE block the expert outputs' gradient
    (E*C x d) or, on the batched path, the hidden gradient of all E*C rows (E*C x h, less
    the combine's buffer already freed). A dense MLP's hidden gradient takes the place of
    the hidden it frees."""
    d = c.width
    h = c.expert_hidden * (2 if c.moe.expert_type == "swiglu" else 1)
    tokens = batch * (image_tokens(c) + c.context_length)
    workspace = 2 * tokens * d
    if moe:
        num_experts, capacity = expert_capacity_rows(c, tokens)
        workspace += num_experts * capacity * (max(d, h - d) if batched_experts else d)
    return workspace * b


def activation_bytes(c: LIMoEConfig, batch: int, *, dtype_bytes: int = 4, grad_checkpointing: bool = False,
                     batched_experts: bool = False, ep_size: int = 1, world_size: int = 1) -> dict:
    """Activation memory of one training micro-batch of `batch` pairs on one rank.

    Returns {"parts": bytes by part (what the forward keeps without checkpointing), "kept":
    what the forward keeps, "backward": what the backward adds at its worst block (its
    workspace, and with checkpointing that block's recomputed activations), "peak": kept +
    backward}, "held_after_backward": what stays alive after the backward until the next
    forward. Parameter gradients are not included.
    """
    b = dtype_bytes
    d = c.width
    n_img, n_txt = batch * image_tokens(c), batch * c.context_length
    tokens = n_img + n_txt
    moe_layers = set(c.moe.moe_layers(c.depth))
    blocks = [block_activation_bytes(c, batch, b, i in moe_layers, batched_experts=batched_experts,
                                     ep_size=ep_size) for i in range(c.depth)]

    def pooled(n: int, pool: str) -> int:
        norm = n * (d * b + LAYERNORM_STATS_BYTES)
        if pool == "map":  # LayerNorm output, keys and values over the tokens; the probe side is per sample
            return norm + n * 3 * d * b + batch * (8 * d + 2 * c.mlp_dim) * b
        return norm
    global_batch = batch * world_size
    head = (pooled(n_img, c.image_pool) + pooled(n_txt, c.text_pool) + 4 * batch * d * b
            + 4 * batch * global_batch * 4 + 2 * global_batch * c.embed_dim * 4)  # features and logits
    inputs = batch * 3 * c.image_size ** 2 * b + n_txt * INT64
    parts = {"inputs": inputs, "head": head}
    for block in blocks:
        for name, value in block.items():
            parts[name] = parts.get(name, 0) + value
    workspace = [block_backward_workspace(c, batch, b, i in moe_layers, batched_experts=batched_experts,
                                          ep_size=ep_size) for i in range(c.depth)]
    kept = sum(parts.values())
    held = 0
    if grad_checkpointing:
        # Each block keeps its input (S x d), its MoE slot map (which lives on an autograd node,
        # ctx.slots, not in saved tensors) and the CPU RNG state; the inputs and heads as before.
        block_kept = [tokens * d * b + block.get("slot_map", 0) + CPU_RNG_STATE_BYTES for block in blocks]
        kept = inputs + head + tokens * INT64 + sum(block_kept)
        # The backward goes down the blocks: at block i, the blocks below still keep their
        # inputs and block i is recomputed whole. The MoE layer hands its aux loss on and keeps
        # no reference to it, so a recomputed block leaves nothing alive after its backward
        # (held stays 0; tested in test_plan.py).
        peak = max(inputs + tokens * INT64 + sum(block_kept[:i + 1])
                   + sum(blocks[i].values()) + workspace[i] for i in range(c.depth))
        peak = max(peak, kept + max(workspace))
    else:
        peak = kept + max(workspace)  # the backward starts at the top block with everything kept
    return {"parts": parts, "kept": kept, "backward": peak - kept, "peak": peak, "held_after_backward": held}
