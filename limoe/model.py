"""LIMoE: one shared transformer for image patches and text tokens.

Images and texts are separate sequences (attention never mixes them) that go
through the same blocks. In MoE blocks the tokens of both modalities are
routed together, in one call, each carrying its modality id; the tokens are
grouped by modality once per forward (routing.TokenGroups) and every MoE layer
shares that grouping.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import LIMoEConfig, MODALITIES
from .layers import Attention, MAPHead, make_mlp, scaled_normal_init_, xavier_init_
from .moe import LIMoELayer
from .routing import IGNORE, IMAGE, TEXT, TokenGroups

PAD_ID = 0  # the tokenizer pads with id 0


class Block(nn.Module):
    """Pre-LN block: attention per sequence, then a dense MLP or an MoE over all tokens
    (plus, with `moe.shared_expert_mlp_dim`, a dense MLP beside the experts).

    `config.modality_specific` names the parts the text gets its own copy of
    ("norms": both LayerNorms; "attention": the attention weights; "mlp": the MLP of
    a dense block). The experts of an MoE block are always shared. The FLOPs per
    token do not change.
    """

    def __init__(self, config: LIMoEConfig, moe: bool, ep_size: int = 1):
        super().__init__()
        own = set(config.modality_specific)
        self.norm1 = nn.LayerNorm(config.width)
        self.attn = Attention(config.width, config.heads, config.kv_heads)
        self.norm2 = nn.LayerNorm(config.width)
        # The text copies; the image side uses norm1 / attn / norm2 above.
        self.text_norm1 = nn.LayerNorm(config.width) if "norms" in own else None
        self.text_norm2 = nn.LayerNorm(config.width) if "norms" in own else None
        self.text_attn = Attention(config.width, config.heads, config.kv_heads) if "attention" in own else None
        expert = make_mlp(config.moe.expert_type, config.width, config.expert_hidden if moe else config.mlp_dim,
                          config.expert_dropout if moe else config.mlp_dropout)
        self.mlp = LIMoELayer(config.width, expert, config.moe, ep_size) if moe else expert
        # The shared expert beside an MoE layer: a dense MLP every token passes through.
        shared = config.moe.shared_expert_mlp_dim
        self.shared_mlp = make_mlp(config.moe.expert_type, config.width, shared, config.mlp_dropout) \
            if moe and shared else None
        self.text_mlp = make_mlp(config.moe.expert_type, config.width, config.mlp_dim, config.mlp_dropout) \
            if "mlp" in own and not moe else None
        self.is_moe = moe

    def _parts(self, modality: str) -> tuple[nn.Module, nn.Module, nn.Module]:
        if modality == "text":
            return (self.text_norm1 or self.norm1, self.text_attn or self.attn, self.text_norm2 or self.norm2)
        return self.norm1, self.attn, self.norm2

    def forward(self, seqs: list[torch.Tensor], kinds: list[str], token_groups: TokenGroups):
        parts = [self._parts(m) for m in kinds]
        # Text attention is causal, so padding after the end token cannot leak in.
        seqs = [x + attn(norm1(x), causal=m == "text") for x, m, (norm1, attn, _) in zip(seqs, kinds, parts)]
        shapes = [x.shape for x in seqs]
        sizes = [shape[0] * shape[1] for shape in shapes]  # rows of each sequence in `flat`
        flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in seqs])
        if self.text_norm2 is None:
            h = self.norm2(flat)
        else:
            h = torch.cat([norm2(x.reshape(-1, x.shape[-1])) for x, (_, _, norm2) in zip(seqs, parts)])
        aux = None
        if self.is_moe:
            routed, aux = self.mlp(h, token_groups)
            h = routed if self.shared_mlp is None else routed + self.shared_mlp(h)
        elif self.text_mlp is None:
            h = self.mlp(h)
        else:
            h = torch.cat([(self.text_mlp if m == "text" else self.mlp)(c) for c, m in zip(h.split(sizes), kinds)])
        flat = flat + h
        return [rows.view(shape) for rows, shape in zip(flat.split(sizes), shapes)], aux


class LIMoE(nn.Module):
    def __init__(self, config: LIMoEConfig, ep_size: int = 1):
        super().__init__()
        self.config = config
        self.ep_size = ep_size
        w = config.width
        self.patch_embed = nn.Conv2d(3, w, config.patch_size, config.patch_size)
        self.image_pos = nn.Parameter(torch.randn(1, config.num_patches, w) * 0.02)
        # A class token before the patches, pooled at the end (image_pool "cls", as a ViT).
        self.image_cls = nn.Parameter(torch.randn(1, 1, w) * 0.02) if config.image_pool == "cls" else None
        self.token_embed = nn.Embedding(config.vocab_size, w)
        self.text_pos = nn.Parameter(torch.randn(1, config.context_length, w) * 0.01)
        # LayerNorms on the embedded sequences before the first block (open_clip's `ln_pre`).
        self.image_pre_norm = nn.LayerNorm(w) if "image" in config.pre_norm else None
        self.text_pre_norm = nn.LayerNorm(w) if "text" in config.pre_norm else None
        moe_layers = set(config.moe.moe_layers(config.depth))
        self.blocks = nn.ModuleList(Block(config, i in moe_layers, ep_size) for i in range(config.depth))
        self.image_norm = nn.LayerNorm(w)
        self.text_norm = nn.LayerNorm(w)
        self.image_pool = MAPHead(w, config.heads, config.mlp_dim) if config.image_pool == "map" else None
        self.text_pool = MAPHead(w, config.heads, config.mlp_dim) if config.text_pool == "map" else None
        self.image_proj = nn.Linear(w, config.embed_dim, bias=False)
        self.text_proj = nn.Linear(w, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if config.loss == "siglip" else None
        self.grad_checkpointing = False
        nn.init.normal_(self.token_embed.weight, std=0.02)
        if config.init == "xavier":
            xavier_init_(self.blocks)
        elif config.init == "scaled_normal":
            scaled_normal_init_(self.blocks, w, config.depth)

    # -- switches -----------------------------------------------------------

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def moe_layers(self) -> list[LIMoELayer]:
        return [b.mlp for b in self.blocks if b.is_moe]

    def set_eval_routing(self, dropless: bool = True, capacity_factor: float | None = None) -> None:
        """Eval-mode routing: dropless (default) or capacity-limited at `capacity_factor`."""
        for layer in self.moe_layers():
            layer.gate.dropless_eval = dropless
            if capacity_factor is not None:
                layer.gate.eval_capacity_factor = capacity_factor

    # -- encoders -----------------------------------------------------------

    def _embed_image(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = x + self.image_pos.to(x.dtype)
        if self.image_cls is not None:
            x = torch.cat([self.image_cls.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        return x if self.image_pre_norm is None else self.image_pre_norm(x)

    def _embed_text(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_embed(tokens)
        x = x + self.text_pos[:, : tokens.shape[1]].to(x.dtype)
        return x if self.text_pre_norm is None else self.text_pre_norm(x)

    def _pool_image(self, x: torch.Tensor) -> torch.Tensor:
        x = self.image_norm(x)
        if self.image_pool is not None:
            x = self.image_pool(x)
        else:
            x = x[:, 0] if self.image_cls is not None else x.mean(1)
        return self.image_proj(x)

    def _pool_text(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        x = self.text_norm(x)
        if self.text_pool is not None:
            x = self.text_pool(x, key_padding_mask=tokens == PAD_ID)
        else:
            # The end token is the last non-pad token.
            eos = ((tokens != PAD_ID).sum(-1) - 1).clamp_min(0)
            x = x[torch.arange(x.shape[0], device=x.device), eos]
        return self.text_proj(x)

    def _run_blocks(self, images: torch.Tensor | None, tokens: torch.Tensor | None):
        seqs, kinds, modality = [], [], []
        if images is not None:
            x = self._embed_image(images)
            seqs.append(x)
            kinds.append("image")
            modality.append(torch.full((x.shape[0] * x.shape[1],), IMAGE, device=x.device))
        if tokens is not None:
            seqs.append(self._embed_text(tokens))
            kinds.append("text")
            modality.append(torch.where(tokens.reshape(-1) == PAD_ID, IGNORE, TEXT))
        token_groups = TokenGroups.from_modality(torch.cat(modality))
        auxes = []
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                seqs, aux = checkpoint(block, seqs, kinds, token_groups, use_reentrant=False)
            else:
                seqs, aux = block(seqs, kinds, token_groups)
            if aux is not None:
                auxes.append(aux)
        return seqs, auxes

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        (x,), _ = self._run_blocks(images, None)
        z = self._pool_image(x)
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        (x,), _ = self._run_blocks(None, tokens)
        z = self._pool_text(x, tokens)
        return F.normalize(z, dim=-1) if normalize else z

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict:
        """Joint pass: both modalities' tokens share each routing call.

        Returns normalised features, the logit scale (exp'd, clamped), the
        weighted auxiliary loss (summed over MoE layers, as V-MoE does), each
        unweighted term as its mean over MoE layers, and per-layer routing statistics.
        """
        (xi, xt), auxes = self._run_blocks(images, tokens)
        out = {
            "image_features": F.normalize(self._pool_image(xi), dim=-1),
            "text_features": F.normalize(self._pool_text(xt, tokens), dim=-1),
            "logit_scale": self.logit_scale.exp().clamp(max=self.config.logit_scale_max),
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        out.update(summarize_aux(auxes, xi.new_zeros(())))
        return out

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        self.logit_scale.clamp_(max=torch.log(torch.tensor(self.config.logit_scale_max)).item())


def summarize_aux(auxes: list[dict], zero: torch.Tensor) -> dict:
    """The weighted aux losses summed over MoE layers (V-MoE, vit_moe.py: "Sum auxiliary losses
    from all blocks"; the per-layer weights assume that sum); each unweighted term as its mean
    over layers ("aux_terms", logged as aux_layer_mean/...), per-layer stats, overall drop rates."""
    if not auxes:
        return {"aux_loss": zero, "aux_terms": {}, "routing": [], "drop_rate": {}}
    n = len(auxes)
    terms = {name: sum(a["terms"][name] for a in auxes) / n for name in auxes[0]["terms"]}
    drop_rate = {}
    for m in MODALITIES:
        routes = sum(a["stats"][m]["routes"] for a in auxes)
        dropped = sum(a["stats"][m]["dropped"] for a in auxes)
        drop_rate[m] = dropped.float() / routes.clamp_min(1)
    return {
        "aux_loss": sum(a["loss"] for a in auxes),
        "aux_terms": terms,
        "routing": [a["stats"] for a in auxes],
        "drop_rate": drop_rate,
    }
