"""Periodic zero-shot evaluation during training, through eval/ (imported lazily).

With expert parallelism each rank holds only its experts, and an MoE forward
needs every rank of the group. So the ranks send their weights to rank 0,
which builds the full ep_size=1 model (the same one an export would give) and
evaluates it alone while the others wait. That costs one model copy on rank
0; for runs where that does not fit, evaluate exports instead (`limoe eval`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from limoe.checkpoint import EXPERT_KEY, gather_experts
from limoe.factory import create_model
from limoe.transforms import image_transform


class EvalNotAvailable(RuntimeError):
    pass


def full_state_dict_on_rank0(model, ep_size: int) -> dict | None:
    """Every rank calls this; rank 0 gets the ep_size=1 state dict (fp32, CPU), the others None."""
    local = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    if ep_size == 1 or not dist.is_initialized():
        return local
    # Ranks 0..ep_size-1 form the first expert-parallel group (consecutive ranks) and
    # together hold every expert; the other ranks hold copies and send nothing.
    rank = dist.get_rank()
    payload = {k: v for k, v in local.items() if EXPERT_KEY.match(k)} if rank < ep_size else None
    gathered = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(payload, gathered, dst=0)
    if rank != 0:
        return None
    shards = [gathered[r] for r in range(ep_size)]
    full = gather_experts(shards)
    full.update({k: v for k, v in local.items() if not EXPERT_KEY.match(k)})
    return full


def zero_shot_eval(model, tokenizer, eval_config, ep_size: int, device) -> dict | None:
    """Zero-shot top-1/top-5 of the current weights on eval_config.data; rank 0 returns the metrics."""
    try:
        from eval.zeroshot import evaluate_zeroshot
    except ImportError as e:
        raise EvalNotAvailable(f"zero-shot evaluation is not available ({e}); set eval.every: 0") from e
    state_dict = full_state_dict_on_rank0(model, ep_size)
    metrics = None
    if state_dict is not None:
        full = create_model(model.config)
        full.load_state_dict(state_dict)
        full.to(device)
        result = evaluate_zeroshot(full, image_transform(model.config.image_size, train=False), tokenizer,
                                   eval_config.data, classnames=eval_config.classnames,
                                   templates=eval_config.templates, batch_size=eval_config.batch_size,
                                   max_images=eval_config.max_images, device=device)
        metrics = {k: float(result[k]) for k in ("top1", "top5", "mean_per_class_recall") if k in result}
        del full
    if dist.is_initialized():
        dist.barrier()
    return metrics
