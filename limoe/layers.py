"""Transformer building blocks shared by both modalities."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    """Multi-head self-attention with optional grouped-query attention (kv_heads < heads)."""

    def __init__(self, width: int, heads: int, kv_heads: int | None = None):
        super().__init__()
        self.heads = heads
        self.kv_heads = kv_heads or heads
        self.head_dim = width // heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * self.kv_heads * self.head_dim)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        B, N, D = x.shape
        q = self.q(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(B, N, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                           enable_gqa=self.kv_heads != self.heads)
        return self.out(y.transpose(1, 2).reshape(B, N, D))


# Grouped-GEMM kernels want every expert's group of rows to start 16-byte aligned:
# a multiple of 8 rows in bf16 (torchtitan pads its token groups the same way).
GROUP_ALIGN = 8


def align_groups(rows: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copy rows [R, d] (sizes[e] rows per group) into a buffer whose groups start at
    multiples of GROUP_ALIGN. Returns (buffer, int32 group end offsets, each row's place in
    the buffer, each buffer row's group). At most GROUP_ALIGN - 1 padding rows per group."""
    padded = [-(-n // GROUP_ALIGN) * GROUP_ALIGN for n in sizes]
    starts = [sum(padded[:e]) for e in range(len(sizes))]
    device = rows.device
    place = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, sizes)]).to(device)
    buffer = rows.new_zeros(sum(padded), rows.shape[1]).index_copy_(0, place, rows)
    offsets = torch.tensor(padded, device=device).cumsum(0).to(torch.int32)
    group = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(padded, device=device),
                                    output_size=sum(padded))
    return buffer, offsets, place, group


def hidden_dropout(experts: list[nn.Module], h: torch.Tensor) -> torch.Tensor:
    """Dropout on the experts' hidden activations (they share one rate), in training only."""
    return F.dropout(h, experts[0].dropout, experts[0].training)


class MLP(nn.Module):
    """GELU MLP: the dense block MLP and the default expert. `dropout` drops hidden
    activations in training (T5 / Switch Transformer put it there; 0 = none)."""

    def __init__(self, width: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.dropout(F.gelu(self.fc1(x)), self.dropout, self.training))

    @staticmethod
    def grouped_forward(experts: list["MLP"], x: torch.Tensor) -> torch.Tensor:
        """Run expert i on x[i] for all i with two batched matmuls. x: [E, N, width]."""
        w1 = torch.stack([e.fc1.weight for e in experts])  # [E, hidden, width]
        b1 = torch.stack([e.fc1.bias for e in experts]).unsqueeze(1)
        w2 = torch.stack([e.fc2.weight for e in experts])  # [E, width, hidden]
        b2 = torch.stack([e.fc2.bias for e in experts]).unsqueeze(1)
        h = hidden_dropout(experts, F.gelu(torch.baddbmm(b1, x, w1.transpose(1, 2))))
        return torch.baddbmm(b2, h, w2.transpose(1, 2))

    @staticmethod
    def grouped_rows_forward(experts: list["MLP"], rows: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Expert e on its sizes[e] consecutive rows of rows [R, width], as grouped matmuls (CUDA, bf16)."""
        buffer, offsets, place, group = align_groups(rows, sizes)
        w1 = torch.stack([e.fc1.weight for e in experts])  # [E, hidden, width]
        w2 = torch.stack([e.fc2.weight for e in experts])
        b1 = torch.stack([e.fc1.bias for e in experts])
        b2 = torch.stack([e.fc2.bias for e in experts])
        h = hidden_dropout(experts, F.gelu(F.grouped_mm(buffer, w1.transpose(-2, -1), offs=offsets) + b1[group]))
        y = F.grouped_mm(h, w2.transpose(-2, -1), offs=offsets) + b2[group]
        return y.index_select(0, place)


class SwiGLU(nn.Module):
    """SwiGLU MLP (as in mmLiT / LLaMA): silu(x W_gate) * (x W_up) W_down, no biases.
    `dropout` as in MLP, on silu(x W_gate) * (x W_up)."""

    def __init__(self, width: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.gate_up = nn.Linear(width, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.dropout(F.silu(gate) * up, self.dropout, self.training))

    @staticmethod
    def grouped_forward(experts: list["SwiGLU"], x: torch.Tensor) -> torch.Tensor:
        w12 = torch.stack([e.gate_up.weight for e in experts])
        w3 = torch.stack([e.down.weight for e in experts])
        gate, up = torch.bmm(x, w12.transpose(1, 2)).chunk(2, dim=-1)
        return torch.bmm(hidden_dropout(experts, F.silu(gate) * up), w3.transpose(1, 2))

    @staticmethod
    def grouped_rows_forward(experts: list["SwiGLU"], rows: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Expert e on its sizes[e] consecutive rows of rows [R, width], as grouped matmuls (CUDA, bf16)."""
        buffer, offsets, place, _ = align_groups(rows, sizes)
        w12 = torch.stack([e.gate_up.weight for e in experts])
        w3 = torch.stack([e.down.weight for e in experts])
        gate, up = F.grouped_mm(buffer, w12.transpose(-2, -1), offs=offsets).chunk(2, dim=-1)
        h = hidden_dropout(experts, F.silu(gate) * up)
        return F.grouped_mm(h, w3.transpose(-2, -1), offs=offsets).index_select(0, place)


# Fused weights that hold several matrices: each gets its own xavier bounds.
FUSED_CHUNKS = {"kv": 2, "gate_up": 2}


def named_linears(module: nn.Module):
    """(leaf name, Linear) for every Linear under `module`: "kv" for `blocks.1.attn.kv`."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            yield name.rsplit(".", 1)[-1], m


@torch.no_grad()
def xavier_init_(module: nn.Module, skip: tuple[str, ...] = ("wg",)) -> None:
    """big_vision's ViT initialisation (the one LIMoE trained with): every Linear's weight
    xavier-uniform, each matrix of a fused weight on its own, and its bias zero.
    Linears whose name ends in one of `skip` (the routers) keep their initialisation."""
    for leaf, m in named_linears(module):
        if leaf in skip:
            continue
        for w in m.weight.chunk(FUSED_CHUNKS.get(leaf, 1)):
            nn.init.xavier_uniform_(w)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


@torch.no_grad()
def scaled_normal_init_(module: nn.Module, width: int, depth: int) -> None:
    """open_clip's text-tower initialisation: normal weights with std width^-0.5 for the
    attention's q / k / v, (2 width)^-0.5 for an MLP's first matrix, and width^-0.5 (2 depth)^-0.5
    for the matrices that write to the residual stream (attention output, the MLP's second).
    Attention biases are zero; MLP biases and the routers (`wg`) keep their initialisation."""
    attn_std = width ** -0.5
    out_std = attn_std * (2 * depth) ** -0.5
    std = {"q": attn_std, "kv": attn_std, "out": out_std,
           "fc1": (2 * width) ** -0.5, "gate_up": (2 * width) ** -0.5, "fc2": out_std, "down": out_std}
    for leaf, m in named_linears(module):
        if leaf not in std:
            continue
        nn.init.normal_(m.weight, std=std[leaf])
        if leaf in ("q", "kv", "out") and m.bias is not None:
            nn.init.zeros_(m.bias)


def make_mlp(kind: str, width: int, hidden: int, dropout: float = 0.0) -> nn.Module:
    return {"mlp": MLP, "swiglu": SwiGLU}[kind](width, hidden, dropout)


class MAPHead(nn.Module):
    """Multihead attention pooling: one learned probe attends over the tokens."""

    def __init__(self, width: int, heads: int, mlp_dim: int):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, width))
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_dim)
        nn.init.normal_(self.probe, std=0.02)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        probe = self.probe.expand(x.shape[0], -1, -1)
        y = self.attn(probe, x, x, key_padding_mask=key_padding_mask, need_weights=False)[0]
        y = y + self.mlp(self.norm(y))
        return y[:, 0]
