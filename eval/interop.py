"""Loading a limoe export for open_clip-style tools.

CLIP_benchmark finds models through loaders with the signature
`load_xxx(model_name, pretrained, cache_dir, device) -> (model, transform, tokenizer)`
(its `clip_benchmark.models.TYPE2FUNC`). `load_limoe` is one: `pretrained`
(or, if that is empty, `model_name`) is the export folder. The model has
`encode_image(images)` / `encode_text(tokens)` (unnormalised by default, as
open_clip's; both take `normalize=True`), the transform maps a PIL image to a
tensor, and the tokenizer maps a list of strings to a LongTensor, so
`open_clip.build_zero_shot_classifier` and CLIP_benchmark's evaluators run
on it unchanged. See docs/evaluation.md for registering it.
"""
from __future__ import annotations

import os

import torch

import limoe


def load_limoe(model_name: str | None = None, pretrained: str | os.PathLike | None = None,
               cache_dir: str | None = None, device: str | torch.device = "cpu"):
    """(model in eval mode on `device`, preprocess, tokenizer) from an export folder.

    `cache_dir` is accepted for the loader signature and unused: nothing is downloaded.
    """
    export_dir = pretrained or model_name
    if not export_dir:
        raise ValueError("give the export folder as `pretrained` (or `model_name`)")
    if not os.path.isdir(export_dir):
        raise FileNotFoundError(f"{export_dir}: not a folder; limoe models load from an export folder "
                                "(model.safetensors + config.json + tokenizer.model)")
    return limoe.load(export_dir, device=device)


def register_clip_benchmark(name: str = "limoe") -> None:
    """Add `load_limoe` to an installed CLIP_benchmark as `--model_type limoe`."""
    import clip_benchmark.models as cb_models  # optional dependency, only for this

    cb_models.TYPE2FUNC[name] = load_limoe
    if name not in cb_models.MODEL_TYPES:
        cb_models.MODEL_TYPES.append(name)


def main(argv: list[str] | None = None) -> int:
    """`python -m eval.interop eval --model_type limoe --pretrained EXPORT --dataset ...`:
    CLIP_benchmark's own command line with `limoe` registered."""
    import sys

    try:
        register_clip_benchmark()
    except ImportError:
        print("CLIP_benchmark is not installed (pip install clip-benchmark)", file=sys.stderr)
        return 2
    from clip_benchmark.cli import main as clip_benchmark_main

    sys.argv = ["clip_benchmark"] + list(sys.argv[1:] if argv is None else argv)
    return clip_benchmark_main() or 0


if __name__ == "__main__":
    raise SystemExit(main())
