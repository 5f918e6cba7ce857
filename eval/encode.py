"""Running a model over data for evaluation: eval mode, no grad, batched encoders."""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch


@contextlib.contextmanager
def evaluating(model: torch.nn.Module):
    """Eval mode and no grad for the block, then the model's previous mode again
    (the training loop calls evaluation in the middle of training)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int = 1024,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """L2-normalised text embeddings [len(texts), D] in float32 on `device`."""
    device = torch.device(device) if device is not None else model_device(model)
    out = []
    with evaluating(model):
        for start in range(0, len(texts), batch_size):
            tokens = tokenizer(list(texts[start:start + batch_size])).to(device)
            out.append(model.encode_text(tokens, normalize=True).float())
    return torch.cat(out) if out else torch.empty(0, 0, device=device)
