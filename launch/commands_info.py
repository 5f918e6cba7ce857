"""`limoe info MODEL`: a preset's config, parameter counts and FLOPs."""
from __future__ import annotations

import json


def _human(n: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def run_info(args) -> int:
    import torch

    from limoe.config import get_config, list_models
    from limoe.factory import create_model
    from limoe.flops import count_parameters, flops_per_pair

    if args.list:
        print("\n".join(list_models()))
        return 0
    if not args.model:
        print("error: give a model name (see `limoe info --list`)")
        return 2
    config = get_config(args.model)
    with torch.device("meta"):  # shapes only: no memory for the weights of big presets
        model = create_model(config)
    params = count_parameters(model)
    flops = flops_per_pair(config)
    if args.json:
        print(json.dumps({"config": config.to_dict(), "parameters": params, "flops_per_pair": flops}, indent=2))
        return 0
    print(f"model: {config.name}")
    print(config.to_json())
    print(f"moe layers: {config.moe.moe_layers(config.depth)} ({config.moe.num_experts} experts, top-{config.moe.k})")
    print(f"parameters: total {_human(params['total'])} ({params['total']:,}), "
          f"experts {_human(params['experts'])}, active per token {_human(params['active_per_token'])} "
          f"({params['active_per_token']:,})")
    print(f"forward FLOPs per image-text pair: {_human(flops['total'])} "
          f"(image {_human(flops['image'])}, text {_human(flops['text'])}; training step ~3x)")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="print a model preset's config, parameter counts and FLOPs",
                              description="Print a preset's config, total and active-per-token parameter "
                                          "counts, and forward FLOPs per image-text pair.")
    p.add_argument("model", nargs="?", help="preset name, e.g. limoe-b-16 or limoe-b-16-dense")
    p.add_argument("--list", action="store_true", help="list the preset names")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run_info)
