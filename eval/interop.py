"""Loading a limoe export for open_clip-style tools, and for CLIP_benchmark.

CLIP_benchmark finds models through loaders with the signature
`load_xxx(model_name, pretrained, cache_dir, device) -> (model, transform, tokenizer)`
(its `clip_benchmark.models.TYPE2FUNC`). `load_limoe` is one: `pretrained`
(or, if that is empty, `model_name`) is the export folder. The model has
`encode_image(images)` / `encode_text(tokens)` (unnormalised by default, as
open_clip's; both take `normalize=True`), the transform maps a PIL image to a
tensor, and the tokenizer maps a list of strings to a LongTensor, so
`open_clip.build_zero_shot_classifier` and CLIP_benchmark's evaluators run
on it unchanged.

`register_clip_benchmark()` adds `load_clip_benchmark` as `--model_type limoe`.
It wraps the model (as CLIP_benchmark's own `ja_clip` loader wraps its models)
so that its image features are `BenchmarkFeatures`: CLIP_benchmark 1.6.2's
`accuracy()` ends in `float(tensor.sum(0, keepdim=True).cpu().numpy())`, a
one-element array, which numpy >= 2.4 refuses to turn into a float. Every
tensor computed from BenchmarkFeatures (logits, top-k, sums) stays one, and
its `.numpy()` gives an array whose `float()` works for one element, as numpy
< 2.4 did. Nothing in clip_benchmark or numpy is patched. See
docs/evaluation.md.
"""
from __future__ import annotations

import os

import numpy as np
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


class FloatableArray(np.ndarray):
    """An ndarray whose `float()` works for exactly one element of any shape (numpy < 2.4's rule)."""

    def __float__(self) -> float:
        if self.size != 1:
            raise TypeError(f"only one-element arrays can be converted to a float, not shape {self.shape}")
        return float(self.reshape(-1)[0])


class BenchmarkFeatures(torch.Tensor):
    """Image features for CLIP_benchmark: every tensor computed from them keeps this type
    (torch's default `__torch_function__`), and `.numpy()` returns a FloatableArray."""

    def numpy(self, *, force: bool = False) -> np.ndarray:
        return self.as_subclass(torch.Tensor).numpy(force=force).view(FloatableArray)

    def __reduce_ex__(self, protocol):
        # Saved (linear-probe feature caches) as a plain tensor, so torch.load(weights_only=True) reads it.
        return self.as_subclass(torch.Tensor).__reduce_ex__(protocol)


class ClipBenchmarkModel(torch.nn.Module):
    """A limoe model as CLIP_benchmark calls it: encode_image returns BenchmarkFeatures."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.model.encode_image(images, normalize=normalize).as_subclass(BenchmarkFeatures)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=normalize)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def load_clip_benchmark(model_name: str | None = None, pretrained: str | os.PathLike | None = None,
                        cache_dir: str | None = None, device: str | torch.device = "cpu"):
    """CLIP_benchmark's `--model_type limoe` loader: `load_limoe` with the model wrapped."""
    model, transform, tokenizer = load_limoe(model_name, pretrained, cache_dir, device)
    return ClipBenchmarkModel(model).eval(), transform, tokenizer


def register_clip_benchmark(name: str = "limoe") -> None:
    """Add `load_clip_benchmark` to an installed CLIP_benchmark as `--model_type limoe`."""
    import clip_benchmark.models as cb_models  # optional dependency (the [bench] extra), only for this

    cb_models.TYPE2FUNC[name] = load_clip_benchmark
    if name not in cb_models.MODEL_TYPES:
        cb_models.MODEL_TYPES.append(name)


def main(argv: list[str] | None = None) -> int:
    """`python -m eval.interop eval --model_type limoe --pretrained EXPORT --dataset ... --no_amp`:
    CLIP_benchmark's own command line with `limoe` registered."""
    import sys

    try:
        register_clip_benchmark()
    except ImportError as error:
        print(f"CLIP_benchmark is not installed or does not import ({error}): pip install -e \".[bench]\"",
              file=sys.stderr)
        return 2
    from clip_benchmark.cli import main as clip_benchmark_main

    saved_argv = sys.argv
    sys.argv = ["clip_benchmark"] + list(sys.argv[1:] if argv is None else argv)  # its parser reads sys.argv
    try:
        return clip_benchmark_main() or 0
    finally:
        sys.argv = saved_argv


if __name__ == "__main__":
    raise SystemExit(main())
