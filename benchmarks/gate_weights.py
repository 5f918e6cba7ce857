"""How much of each expert's output reaches the residual stream: the combine weights of trained routers.

With V-MoE's gates (LIMoE's), a kept token's expert output is multiplied by its top router
probability; its dense twin's MLP output enters at weight 1. With flat routers that
probability is near 1/E, and the MoE layers write to the residual stream at a fraction of
the dense MLP's scale. For each trained run (a folder with `export/`, as
`benchmarks/quality.py` and `limoe demo` write them) this script embeds every image of a
labelled folder (`--data`, the name level of `limoe data emoji`'s zero-shot tree) and the
bare class names as text, in eval mode, and reports per modality, over all MoE layers:

- the mean and median top-1 router probability (the raw gate; with
  `moe.straight_through_gates` the combine weight is 1 whatever it is), and
- the mean routing entropy in nats (ln E when uniform), and
- the share of tokens whose first-choice expert changes when the router's training noise
  (N(0, (noise_std / E)^2) on the logits, the export's `moe.noise_std`) is added: how far
  the routes a token trains with differ from the ones it is evaluated with.

    python benchmarks/gate_weights.py --data data/emoji-twitter \\
        runs/quality/runs/limoe-e8e-bpe-postext-xavier-lnpre-seed{0,1,2}

Prints a markdown table (mean over each variant's seeds, a run folder named
`<variant>-seed<s>`) and writes JSON (--out). Evaluation only, about 10 s a run on 2 cores.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "benchmarks"):  # benchmarks/name_errors.py
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from name_errors import check_runs, report_runs, run_parser, runs_by_variant  # noqa: E402

MODALITIES = ("image", "text")
STATS = ("top1_mean", "top1_median", "entropy", "noise_changes_top1")
NOISE_DRAWS = 5


def capture_router_logits(model) -> tuple[dict[str, list], list]:
    """Forward hooks on every MoE gate that keep its clean router logits per modality
    ({modality: [logits [N, E], ...]}), and the hook handles."""
    import torch

    from limoe.moe import LIMoEGate

    seen: dict[str, list] = {m: [] for m in MODALITIES}

    def hook(gate, args, _output):
        x, token_groups = args
        with torch.no_grad():
            logits = gate.router_logits(x)
        for m in MODALITIES:
            seen[m].append(logits[token_groups.masks[m]].cpu())

    handles = [mod.register_forward_hook(hook) for mod in model.modules() if isinstance(mod, LIMoEGate)]
    return seen, handles


def gate_stats(logits: list, noise_std: float, seed: int = 0) -> dict[str, float]:
    """Top-1 probability (mean, median), mean entropy (nats) and the share of first choices the
    training noise (sigma = noise_std / E, NOISE_DRAWS draws) changes, over the routed tokens' logits."""
    import torch

    logits = torch.cat(logits)
    p = torch.softmax(logits, dim=-1)
    top1 = p.max(-1).values
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)
    sigma = noise_std / logits.shape[1]
    g = torch.Generator().manual_seed(seed)
    first = logits.argmax(-1)
    changed = [(logits + sigma * torch.randn(logits.shape, generator=g)).argmax(-1).ne(first).float().mean().item()
               for _ in range(NOISE_DRAWS)]
    return {"top1_mean": top1.mean().item(), "top1_median": top1.median().item(), "entropy": entropy.mean().item(),
            "noise_changes_top1": sum(changed) / len(changed), "noise_std": noise_std,
            "tokens": int(logits.shape[0]), "experts": int(logits.shape[1])}


def measure(export: Path, data: Path, batch_size: int = 256) -> dict[str, dict[str, float]]:
    import torch

    import limoe
    from eval.datasets import open_labelled_images
    from eval.encode import evaluating, model_device

    model, preprocess, tokenizer = limoe.load(export)
    seen, handles = capture_router_logits(model)
    if not handles:
        raise SystemExit(f"error: {export} has no MoE layers (a dense model): nothing to measure")
    images = open_labelled_images(data, preprocess, model.config.image_size)
    device = model_device(model)
    try:
        with evaluating(model), torch.no_grad():
            for batch, _ in images.batches(batch_size):
                model.encode_image(batch.to(device))
            for i in range(0, len(images.classnames), batch_size):
                model.encode_text(tokenizer(images.classnames[i:i + batch_size]).to(device))
    finally:
        for h in handles:
            h.remove()
    if not seen["image"]:
        raise SystemExit(f"error: no readable images in {data}")
    return {m: gate_stats(seen[m], model.config.moe.noise_std) for m in MODALITIES}


def per_variant(per_run: dict[str, dict]) -> dict[str, dict]:
    """{variant: {modality: {stat: {"mean", "n"}}}} over the variant's seeds."""
    out = {}
    for v, runs in runs_by_variant(per_run).items():
        out[v] = {m: {s: {"mean": statistics.fmean(per_run[r][m][s] for r in runs), "n": len(runs)} for s in STATS}
                  for m in MODALITIES}
    return out


def table(summary: dict[str, dict]) -> str:
    lines = ["| variant | seeds | " + " | ".join(f"{m} top-1 gate (mean / median) | {m} entropy (nats) | "
                                                 f"{m} first choice changed by the noise"
                                                 for m in MODALITIES) + " |",
             "|---|---:|" + "---:|---:|---:|" * len(MODALITIES)]
    for v, by_m in summary.items():
        cells = []
        for m in MODALITIES:
            s = by_m[m]
            cells += [f"{s['top1_mean']['mean']:.3f} / {s['top1_median']['mean']:.3f}", f"{s['entropy']['mean']:.2f}",
                      f"{100 * s['noise_changes_top1']['mean']:.0f} %"]
        lines.append(f"| {v} | {by_m['image']['entropy']['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = run_parser(__doc__, "a labelled image folder whose images and class names are routed",
                   "gate_weights.json")
    args = p.parse_args(argv)
    check_runs(p, args.runs)
    if (args.data / "zeroshot" / "name").is_dir():
        args.data = args.data / "zeroshot" / "name"

    return report_runs(args, lambda export: measure(export, args.data), per_variant, table,
                       f"Router probabilities on {args.data} (images and bare class names, eval mode, all MoE "
                       "layers), mean over each variant's seeds:")


if __name__ == "__main__":
    sys.exit(main())
