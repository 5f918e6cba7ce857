"""Routing analysis: how each MoE layer spreads image and text tokens over its experts.

The model runs its joint forward (both modalities in one routing call, as in
training) in eval mode (no router noise) with capacity-limited routing at the
training capacity factor, so drop rates are the ones training sees for the
same batch size. Per MoE layer and modality it reports:

- tokens per expert (first choice, before capacity) and routes kept per expert;
- drop rate: routes past capacity / all routes;
- mean router entropy H(p) in nats (log E = uniform, 0 = one-hot);
- routing health, used by the ablations: share of the modality's tokens on
  its busiest expert, and the number of experts receiving at least 1/(2E) of
  the modality's tokens ("used" experts);
- expert roles, in the spirit of the LIMoE paper's figures: an expert used
  by image tokens only is an image expert, by text only a text expert, by
  both shared, by neither unused.

`plot_routing` draws the per-layer heat maps of expert usage per modality and
each expert's modality affinity.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import torch

from limoe.config import MODALITIES
from limoe.files import atomic_path

from .encode import evaluating, model_device

STAT_FIELDS = ("tokens", "routes", "dropped", "assigned", "kept", "entropy_sum")


def _gate_settings(model) -> list[tuple[bool, float]]:
    return [(layer.gate.dropless_eval, layer.gate.eval_capacity_factor) for layer in model.moe_layers()]


def _restore_gate_settings(model, settings) -> None:
    for layer, (dropless, factor) in zip(model.moe_layers(), settings):
        layer.gate.dropless_eval = dropless
        layer.gate.eval_capacity_factor = factor


def modality_summary(stats: dict, num_experts: int) -> dict:
    """Numbers for one layer and modality from summed routing stats (plain Python types)."""
    tokens = int(stats["tokens"])
    routes = int(stats["routes"])
    assigned = [int(x) for x in stats["assigned"]]
    threshold = tokens / (2 * num_experts)
    return {
        "tokens": tokens,
        "routes": routes,
        "dropped": int(stats["dropped"]),
        "drop_rate": int(stats["dropped"]) / routes if routes else 0.0,
        "tokens_per_expert": assigned,
        "kept_per_expert": [int(x) for x in stats["kept"]],
        "expert_fraction": [a / tokens if tokens else 0.0 for a in assigned],
        "mean_entropy": float(stats["entropy_sum"]) / tokens if tokens else 0.0,
        "busiest_expert_share": max(assigned) / tokens if tokens else 0.0,
        "experts_used": sum(a >= threshold for a in assigned) if tokens else 0,
    }


def expert_roles(image: dict, text: dict, num_experts: int) -> list[str]:
    roles = []
    for e in range(num_experts):
        used_i = image["tokens"] and image["tokens_per_expert"][e] >= image["tokens"] / (2 * num_experts)
        used_t = text["tokens"] and text["tokens_per_expert"][e] >= text["tokens"] / (2 * num_experts)
        roles.append("shared" if used_i and used_t else "image" if used_i else "text" if used_t else "unused")
    return roles


def pair_batches(eval_batches: Iterable[dict]):
    """(images, tokens of the first caption) from `build_eval_loader(..., tokenizer=...)` batches,
    leaving out samples without captions."""
    for batch in eval_batches:
        has_caption = torch.tensor([bool(c) for c in batch["captions"]])
        if has_caption.all():
            yield batch["images"], batch["tokens"]
        elif has_caption.any():
            yield batch["images"][has_caption], batch["tokens"][has_caption]


def analyze_routing(model, batches: Iterable, capacity_factor: float | None = None,
                    max_pairs: int | None = None, device: torch.device | str | None = None,
                    progress: bool = False) -> dict:
    """Run `model(images, tokens)` over (images, tokens) batches and summarise its routing.

    `capacity_factor` defaults to the model's training one
    (`config.moe.capacity_factor`). The model's eval routing settings and
    train/eval mode are restored afterwards.
    """
    from tqdm import tqdm

    config = model.config
    num_experts = config.moe.num_experts
    layers = config.moe.moe_layers(config.depth)
    if not layers:
        raise ValueError(f"model {config.name} has no MoE layers (dense): nothing to analyse")
    capacity_factor = config.moe.capacity_factor if capacity_factor is None else capacity_factor
    device = torch.device(device) if device is not None else model_device(model)
    totals = [{m: None for m in MODALITIES} for _ in layers]
    pairs = calls = 0
    saved = _gate_settings(model)
    model.set_eval_routing(dropless=False, capacity_factor=capacity_factor)
    bar = tqdm(total=max_pairs, unit="pair", desc="routing", disable=not progress, leave=False)
    try:
        with evaluating(model):
            for images, tokens in batches:
                if max_pairs is not None:
                    images, tokens = images[:max_pairs - pairs], tokens[:max_pairs - pairs]
                out = model(images.to(device), tokens.to(device))
                for total, layer_stats in zip(totals, out["routing"]):
                    for m in MODALITIES:
                        s = {f: layer_stats[m][f].detach().cpu().to(torch.float64 if f == "entropy_sum"
                                                                     else torch.long) for f in STAT_FIELDS}
                        total[m] = s if total[m] is None else {f: total[m][f] + s[f] for f in STAT_FIELDS}
                pairs += len(images)
                calls += 1
                bar.update(len(images))
                if max_pairs is not None and pairs >= max_pairs:
                    break
    finally:
        bar.close()
        _restore_gate_settings(model, saved)
    if not pairs:
        raise ValueError("no image-text pairs to analyse")
    result_layers = []
    for block, total in zip(layers, totals):
        per_mod = {m: modality_summary(total[m], num_experts) for m in MODALITIES}
        result_layers.append({"block": block, **per_mod,
                              "expert_roles": expert_roles(per_mod["image"], per_mod["text"], num_experts)})
    summary = {}
    for m in MODALITIES:
        rows = [layer[m] for layer in result_layers]
        routes = sum(r["routes"] for r in rows)
        summary[m] = {
            "drop_rate": sum(r["dropped"] for r in rows) / routes if routes else 0.0,
            "mean_entropy": sum(r["mean_entropy"] for r in rows) / len(rows),
            "busiest_expert_share": max(r["busiest_expert_share"] for r in rows),
            "min_experts_used": min(r["experts_used"] for r in rows),
        }
    return {
        "model": config.name,
        "num_experts": num_experts,
        "k": config.moe.k,
        "capacity_factor": capacity_factor,
        "max_entropy": math.log(num_experts),
        "pairs": pairs,
        "forward_calls": calls,
        "layers": result_layers,
        "summary": summary,
    }


def plot_routing(result: dict, out_path: str | Path) -> Path:
    """Heat maps [MoE layer x expert]: share of image tokens, share of text tokens, and
    modality affinity (text - image share over their sum: -1 image-only, +1 text-only)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = result["layers"]
    num_experts = result["num_experts"]
    image = torch.tensor([layer["image"]["expert_fraction"] for layer in layers], dtype=torch.float64)
    text = torch.tensor([layer["text"]["expert_fraction"] for layer in layers], dtype=torch.float64)
    mass = image + text
    affinity = torch.where(mass > 0, (text - image) / mass.clamp_min(1e-12), torch.tensor(float("nan"),
                                                                                      dtype=torch.float64))
    ylabels = [f"block {layer['block']}" for layer in layers]

    fig = Figure(figsize=(max(9.0, 1.2 * num_experts * 3 / 2), 1.0 + 0.55 * len(layers) + 1.2))
    FigureCanvasAgg(fig)  # Agg canvas without pyplot: no global backend state, no display needed
    axes = fig.subplots(1, 3, sharey=True)
    panels = [
        (100 * image, "share of image tokens (%)", "Blues", 0.0, max(1e-9, 100 * float(image.max()))),
        (100 * text, "share of text tokens (%)", "Oranges", 0.0, max(1e-9, 100 * float(text.max()))),
        (affinity, "modality affinity\n(-1 image only, +1 text only)", "coolwarm", -1.0, 1.0),
    ]
    for ax, (values, title, cmap, vmin, vmax) in zip(axes, panels):
        im = ax.imshow(values.numpy(), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(num_experts))
        ax.set_xlabel("expert")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        if num_experts <= 16:
            for (i, e), v in zip(((i, e) for i in range(len(layers)) for e in range(num_experts)),
                                 values.flatten().tolist()):
                if not math.isnan(v):
                    strong = abs(v) > 0.6 * max(abs(vmin), abs(vmax))  # light text on dark cells
                    ax.text(e, i, f"{v:.2f}" if vmin < 0 else f"{v:.0f}", ha="center", va="center",
                            fontsize=7, color="white" if strong else "black")
    axes[0].set_yticks(range(len(layers)))
    axes[0].set_yticklabels(ylabels)
    s = result["summary"]
    fig.suptitle(f"{result['model']}: routing of {result['pairs']} pairs at capacity factor "
                 f"{result['capacity_factor']:g} (drop image {100 * s['image']['drop_rate']:.1f}%, "
                 f"text {100 * s['text']['drop_rate']:.1f}%)", fontsize=10)
    fig.tight_layout()
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return out_path
