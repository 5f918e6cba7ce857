"""Periodic evaluation during training: the evaluators of the config (eval/evaluators.py) due at a step.

With expert parallelism each rank holds only its experts, and an MoE forward
needs every rank of the group. So the ranks send their weights to rank 0,
which builds the full ep_size=1 model (the same one an export would give) and
runs every due evaluator on it alone while the others wait. That costs one model
copy on rank 0; for runs where that does not fit, evaluate exports instead (`limoe eval`).

Metrics are logged as eval/<name>/<metric> for `evals.<name>`, and as
eval/<metric> (eval/top1, ...) for the old `eval:` section, the names it always had.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from eval.evaluators import Evaluator
from limoe.checkpoint import EXPERT_KEY, gather_experts
from limoe.factory import create_model

log = logging.getLogger("limoe.train")  # the trainer's logger: rank 0's out.log


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


def due_evaluators(config, step: int) -> list[tuple[str, Evaluator]]:
    """(metric prefix, evaluator) of each evaluator due at `step`, the same on every rank."""
    due = [("eval", config.eval)] if config.eval.due(step) else []
    return due + [(f"eval/{name}", e) for name, e in config.evals.items() if e.due(step)]


def run_evaluators(model, tokenizer, due: list[tuple[str, Evaluator]], step: int, ep_size: int, device) -> dict:
    """Every rank calls this; rank 0 runs the `due` evaluators on the full model and returns their
    metrics under their prefixes, the other ranks an empty dict."""
    for prefix, evaluator in due:
        try:
            evaluator.check_available()
        except ImportError as e:
            raise EvalNotAvailable(f"{prefix}: {evaluator.what} evaluation is not available ({e}); "
                                   "set its every: 0") from e
    state_dict = full_state_dict_on_rank0(model, ep_size)
    metrics = {}
    if state_dict is not None:
        full = create_model(model.config)
        full.load_state_dict(state_dict)
        full.to(device)
        for prefix, evaluator in due:
            result = evaluator.run(full, tokenizer, device=device)
            metrics.update({f"{prefix}/{k}": v for k, v in result.items()})
            log.info("step %d %s: %s: %s", step, prefix, evaluator.describe(), result)
        del full
    if dist.is_initialized():
        dist.barrier()
    return metrics
