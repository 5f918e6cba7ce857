"""The training loop, run by every rank (launch/train.py is its entry point).

torchtitan-style composition: the model (limoe/) knows nothing of DeepSpeed
or of other processes. Here it is built identically on every rank, its MoE
layers are made DeepSpeed's (launch/expert_parallel.py), it is handed to
DeepSpeed (data parallel + expert parallel + ZeRO 1/2), and trained by a
straight-line loop, `train`:

    set up the processes -> build model, optimizer, engine -> resume -> data
    -> repeat: train_step -> eval (every eval.every) -> log -> checkpoint (every checkpoint.every)
    -> checkpoint, export, summary

`train_step` is one optimizer step, over train.accum_freq micro-batches:

    draw a batch -> seed RNGs from (seed, batch number, rank) -> forward -> loss
    -> agree across ranks (stop requested? non-finite loss? the numbers to log)
    -> backward -> step; then clamp logit_scale

A data "epoch" here is the stretch between two periodic checkpoints
(checkpoint.every optimizer steps): each one's draws are seeded by (seed,
epoch, rank, worker), so a run resumed from a periodic checkpoint starts a
fresh epoch with no batches to skip, and one resumed from an interruption
skips the batches it had already drawn in that epoch. Together with the
per-batch RNG seeding (router noise), a resumed run reproduces the losses of
an uninterrupted one. Checkpoints and the run's state: launch/checkpoints.py;
metrics, trackers and the log: launch/run_log.py.
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data_pipelines.loader import build_train_loader, stable_seed
from limoe.config import MODALITIES

from .checkpoints import Checkpoints, TrainState
from .distributed import Ranks, init_processes, sum_over_ranks
from .eval_hook import due_evaluators, run_evaluators
from .resume import Layout
from .run_log import RunLog, setup_logging
from .train_config import TrainConfig, augment_config, save_config

log = logging.getLogger("limoe.train")


class StopRequest:
    """Set by SIGINT/SIGTERM; the loop finishes its step, checkpoints and exits."""

    signum: int | None = None

    @classmethod
    def install(cls) -> None:
        def handler(signum, frame):
            if cls.signum is None:  # keep the first: the deepspeed launcher follows Ctrl-C with SIGTERM
                cls.signum = signum

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)


# -- model and optimizer ----------------------------------------------------------


def build_model(model_config, ep_size: int, ep_rank: int, seed: int):
    """The same model on every rank, whatever ep_size: initialise the full ep_size=1
    model from the seed, keep this rank's slice of the experts, and make its MoE
    layers DeepSpeed's (launch/expert_parallel.py)."""
    from limoe.checkpoint import shard_experts
    from limoe.factory import create_model

    from .expert_parallel import apply_expert_parallel

    torch.manual_seed(seed)
    model = create_model(model_config)
    if ep_size > 1:
        state_dict = shard_experts(model.state_dict(), ep_rank, ep_size, model_config.moe.num_experts)
        del model
        model = create_model(model_config, ep_size=ep_size)
        model.load_state_dict(state_dict)
    return apply_expert_parallel(model)


def set_batched_experts(model, choice: bool | str) -> None:
    """train.batched_experts on every MoE layer: "auto" (None: batched matmuls on CUDA,
    a loop over the experts on CPU), or True/False to force one way."""
    batched = None if choice == "auto" else bool(choice)
    for layer in model.moe_layers():
        layer.experts.batched = batched


def expert_mode(model, device) -> str:
    """How the experts will run on `device`, for the log."""
    if not model.moe_layers():
        return "none (dense model)"
    batched = model.moe_layers()[0].experts.batched
    return "batched matmuls" if (device.type == "cuda" if batched is None else batched) else "one after another"


# Parameters that get no weight decay besides every 1-d tensor (norms, biases):
# embeddings, position embeddings, the MAP probe token, and the temperature; the same
# ones under open_clip's names for the two-tower peer (limoe/two_tower.py).
NO_DECAY_NAMES = ("token_embed.weight", "image_pos", "image_cls", "text_pos", ".probe", "logit_scale",
                  "logit_bias", "token_embedding.weight", "positional_embedding", "class_embedding")


def exempt_from_weight_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim < 2 or name.endswith(NO_DECAY_NAMES)


def optimizer_param_groups(model, weight_decay: float) -> list[dict]:
    """decay / no_decay groups, each split into expert and non-expert groups as DeepSpeed MoE needs."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if exempt_from_weight_decay(name, param) else decay).append(param)
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return [g for g in groups if g["params"]]


def warmup_cosine(step: int, warmup: int, total: int, lr: float, min_lr: float) -> float:
    """Learning rate after `step` optimizer steps: linear warmup to lr, cosine decay to min_lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def clamp_logit_scale(model) -> None:
    """model.clamp_logit_scale(), and the optimizer's fp32 master copy follows, or the
    next step would write the unclamped value back."""
    from deepspeed.utils import safe_set_full_fp32_param

    before = model.logit_scale.detach().clone()
    model.clamp_logit_scale()
    if not torch.equal(before, model.logit_scale.detach()):
        safe_set_full_fp32_param(model.logit_scale, model.logit_scale.detach().float())


def stop_after_bad_steps_message(bad_in_a_row: int, step: int, saved: str | None, latest: str | None) -> str:
    """Why the run stopped and where usable weights are: a checkpoint is named as holding the
    step's weights only when it was written (save() refuses non-finite weights)."""
    head = f"stopping: {bad_in_a_row} non-finite losses in a row (train.max_bad_steps) at step {step}"
    if saved is not None:
        where = f"the weights of step {step} (all finite) are in checkpoint {saved}"
    else:
        last = f"the last checkpoint, whose weights were finite, is {latest}" if latest else "there is no checkpoint"
        where = f"the weights of step {step} are not finite and were not saved; {last}"
    return f"{head}; {where}. Lower optimizer.lr, raise schedule.warmup or check the data."


def hold_run_lock(run_dir: Path):
    """Rank 0 locks the run directory for the job's life, unless `limoe train` holds it (run_lock.py)."""
    from .run_lock import RunLock

    lock = RunLock(run_dir)
    return None if lock.is_held_by_parent() else lock.acquire()


# -- the run ---------------------------------------------------------------------------------


def train(config: TrainConfig, resume: str | None = None) -> int:
    """Train to train.steps (or train.stop_after) from a fresh start or `resume`; the exit code
    (3 after train.max_bad_steps non-finite losses in a row)."""
    import deepspeed.comm as dist

    from limoe.losses import LIMoELoss
    from limoe.tokenizer import load_tokenizer

    # -- processes, model, optimizer, engine -----------------------------------------------------
    ranks = init_processes(config)
    run_lock = open_run(config.run_dir, ranks.rank)  # noqa: F841 (the kernel releases it when this process exits)
    tokenizer = load_tokenizer(config.data.tokenizer)
    model_config = config.fit_tokenizer(tokenizer.vocab_size, tokenizer.context_length)
    engine, ds_config = build_engine(config, model_config, ranks)
    loss_fn = LIMoELoss(model_config.loss, rank=ranks.rank, world_size=ranks.world_size,
                        positives="text" if config.data.caption_positives == "text" else "both")
    dtype = torch.bfloat16 if config.train.precision == "bf16" else torch.float32

    # -- resume, data ----------------------------------------------------------------------------
    p = config.parallel
    checkpoints = Checkpoints(config.run_dir, config.checkpoint.keep, ranks.rank,
                              Layout(ranks.world_size, p.ep_size, p.zero_stage))
    fresh = TrainState(batches_per_epoch=config.checkpoint.every * config.train.accum_freq)
    state = checkpoints.restore(engine, resume, fresh, model_config.moe.num_experts)
    ema = weight_average(engine, checkpoints, config.train.ema_decay, model_config.moe.num_experts, ranks)
    if ranks.rank == 0:
        save_run_files(config, ds_config, tokenizer)
    loader = train_loader(config, tokenizer, model_config, state, ranks)
    batches = data_batches(loader, state)

    # -- the loop -------------------------------------------------------------------------------
    stop_at = config.train.stop_after or config.train.steps
    run_log = RunLog(config.run_dir, state.step, config.train.steps, enabled=ranks.rank == 0, config=config)
    log.info("training %s: %d ranks (ep_size %d, ZeRO %d, %s), batch %d x %d ranks x %d accum, steps %d..%d",
             model_config.name, ranks.world_size, p.ep_size, p.zero_stage, config.train.precision,
             config.train.batch_size, ranks.world_size, config.train.accum_freq, state.step, stop_at)
    engine.train()
    step = StepResult()  # none taken yet
    while state.step < stop_at:
        step = train_step(engine, loss_fn, batches, state, config, ranks, dtype)
        if step.stop:
            break
        if ema is not None:
            ema.update(engine.module, state.step)

        evaluated = periodic_eval(engine, tokenizer, config, state.step, ranks.device, ema)

        if evaluated or state.step % config.train.log_every == 0 or state.step == stop_at:
            metrics = {**evaluated, **step_metrics(step, engine, state, ranks.world_size)}
            run_log.record(state.step, metrics)
            run_log.progress(state.step, metrics)
        if state.step % config.checkpoint.every == 0:
            checkpoints.save(engine, state, model_config, config.seed, ema)

    # -- the end: checkpoint, export, summary ---------------------------------------------------
    run_log.close()
    tag = checkpoints.save(engine, state, model_config, config.seed, ema) if state.step > 0 else None
    if tag is not None:
        log.info("checkpoint %s", checkpoints.dir / tag)
    if step.stop == "signal":
        name = signal.Signals(StopRequest.signum).name if StopRequest.signum else "a signal on another rank"
        log.warning("stopped by %s at step %d; continue with --resume latest", name, state.step)
    elif step.stop == "bad_steps":
        log.error(stop_after_bad_steps_message(step.bad_in_a_row, state.step, tag, checkpoints.latest_tag()))
    elif state.step == config.train.steps and config.checkpoint.export and tag is not None:
        with ema.swapped_in(engine.module) if ema is not None else contextlib.nullcontext():
            export_and_check(engine, config.run_dir, tokenizer, model_config, ranks.rank, ranks.world_size,
                             ranks.device, dtype)
    if loader.skips.total:
        log.warning("data: %s", loader.skips.summary())
    dist.barrier()
    return 3 if step.stop == "bad_steps" else 0


def weight_average(engine, checkpoints: Checkpoints, decay: float | None, num_experts: int, ranks: Ranks):
    """The EMA of the weights (launch/ema.py) when train.ema_decay is set, else None: the resumed
    checkpoint's average if it has one (resharded onto this run's layout), else one starting
    from the current weights."""
    from .ema import WeightAverage

    if not decay:
        return None
    ema = WeightAverage(engine.module, decay)
    if checkpoints.restored_from is not None:
        ep_size = checkpoints.layout.ep_size
        try:
            found = ema.load(checkpoints.restored_from, ranks.rank % ep_size, ep_size, num_experts)
        except ValueError as e:  # an unreadable or incomplete average: the checkpoint is damaged
            raise SystemExit(f"error: {e}") from e
        if not found:
            log.warning("checkpoint %s has no weight average: the EMA starts again from the resumed weights",
                        checkpoints.restored_from)
    log.info("weight average: EMA with decay %g (exports and evaluation use it)", decay)
    return ema


def open_run(run_dir: Path, rank: int):
    """Rank 0 makes and locks the run directory (the lock, or None); then every rank logs and
    listens for SIGINT/SIGTERM."""
    import deepspeed.comm as dist

    run_lock = None
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        run_lock = hold_run_lock(run_dir)
    dist.barrier()
    setup_logging(run_dir, rank)
    StopRequest.install()
    return run_lock


def build_engine(config: TrainConfig, model_config, ranks: Ranks):
    """(DeepSpeed engine, its ds_config): the model (built alike on every rank, this rank's experts),
    AdamW and the warmup-cosine schedule."""
    import deepspeed
    from deepspeed.utils import groups

    from .deepspeed_compat import patch_broadcast_of_scalar_parameters
    from .ds_config import build_ds_config

    ep_size = config.parallel.ep_size
    ep_rank = ranks.rank % ep_size  # DeepSpeed puts consecutive ranks in one expert-parallel group (checked below)
    model = build_model(model_config, ep_size, ep_rank, config.seed)
    model.set_grad_checkpointing(config.train.grad_checkpointing)
    set_batched_experts(model, config.train.batched_experts)
    log.info("experts: %s; gradient checkpointing %s", expert_mode(model, ranks.device),
             "on" if config.train.grad_checkpointing else "off")
    o, s = config.optimizer, config.schedule
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, o.wd), lr=o.lr, betas=(o.beta1, o.beta2),
                                  eps=o.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, s.warmup, config.train.steps, o.lr, s.min_lr) / o.lr)
    ds_config = build_ds_config(config)
    patch_broadcast_of_scalar_parameters()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    if model.moe_layers():
        actual = groups._get_expert_parallel_rank(model.moe_layers()[0].expert_group_name)
        if actual != ep_rank:
            raise SystemExit(f"error: DeepSpeed gave rank {ranks.rank} expert-parallel rank {actual}, "
                             f"expected {ep_rank}")
    return engine, ds_config


def save_run_files(config: TrainConfig, ds_config: dict, tokenizer) -> None:
    """config.yaml, ds_config.json and the tokenizer in the run directory (rank 0)."""
    from limoe.files import write_json

    run_dir = config.run_dir
    save_config(config, run_dir / "config.yaml")
    write_json(ds_config, run_dir / "ds_config.json")
    if Path(config.data.tokenizer).resolve() != (run_dir / tokenizer.FILENAME).resolve():
        tokenizer.save(run_dir / tokenizer.FILENAME)  # exports take it from the run directory


def train_loader(config: TrainConfig, tokenizer, model_config, state: TrainState, ranks: Ranks):
    return build_train_loader(
        config.data.train, tokenizer,
        image_size=model_config.image_size, batch_size=config.train.batch_size,
        batches_per_epoch=state.batches_per_epoch, rank=ranks.rank, world_size=ranks.world_size,
        num_workers=config.data.workers, seed=config.seed,
        augment=augment_config(config.data.augment),
        shuffle_buffer=config.data.shuffle_buffer, pin_memory=ranks.device.type == "cuda",
        unique_captions=config.data.unique_captions, subword_sampling=config.data.subword_sampling,
        caption_positives=bool(config.data.caption_positives))


def data_batches(loader, state: TrainState):
    """Endless (epoch, batch) from the data position in `state`; a batch is (images, tokens)
    or, with data.caption_positives, (images, tokens, caption_keys)."""
    epoch, skip = divmod(state.batches_drawn, state.batches_per_epoch)
    while True:
        loader.set_epoch(epoch)
        # DataLoader workers inherit the signal mask: block SIGINT/SIGTERM while they fork,
        # so Ctrl-C reaches the ranks (which checkpoint) and not the workers (whose death
        # would abort the rank in the middle of a step).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            batches = iter(loader)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for batch in batches:
            if skip:
                skip -= 1
                continue
            yield epoch, batch
        epoch += 1


# -- the step ---------------------------------------------------------------------------------


@dataclass
class StepResult:
    """One optimizer step, or why the run stops without taking it."""

    stop: str | None = None  # "signal" (some rank got SIGINT/SIGTERM) or "bad_steps" (train.max_bad_steps)
    bad_in_a_row: int = 0  # non-finite losses in a row, when stop == "bad_steps"
    sums: dict[str, float] = field(default_factory=dict)  # step_numbers summed over micro-batches, mean over ranks
    micro_batches: int = 0  # with a finite loss (skipped ones are not counted)
    samples: int = 0  # in those micro-batches, all ranks
    epoch: int = 0  # the data epoch of the last micro-batch
    lr: float = 0.0  # the learning rate the step used
    seconds: float = 0.0  # wall time of the step
    data_seconds: float = 0.0  # of which waiting for batches


def train_step(engine, loss_fn, batches, state: TrainState, config: TrainConfig, ranks: Ranks, dtype) -> StepResult:
    """Micro-batches until the engine takes an optimizer step (gradient accumulation), each:
    seed -> forward -> loss -> agree across ranks -> backward -> step; then clamp logit_scale.
    A non-finite loss on any rank skips the micro-batch on every rank; a stop request on any rank,
    or train.max_bad_steps skips in a row, return before the step is taken."""
    step = StepResult(lr=engine.lr_scheduler.get_last_lr()[0])
    start, drawn, bad_in_a_row = time.perf_counter(), state.batches_drawn, 0
    while engine.global_steps == state.step:
        t0 = time.perf_counter()
        step.epoch, (images, tokens, *caption_keys) = next(batches)
        step.data_seconds += time.perf_counter() - t0
        drawn += 1
        torch.manual_seed(stable_seed(config.seed, "batch", drawn, ranks.rank))  # router noise, reproducible
        out = engine(images.to(ranks.device, dtype, non_blocking=True), tokens.to(ranks.device, non_blocking=True))
        losses = loss_fn(out, *(keys.to(ranks.device) for keys in caption_keys))
        agreed = agree(losses, out, ranks.device)
        if agreed.stop_requested:
            step.stop = "signal"
            return step
        if agreed.nonfinite_loss:
            state.skipped_batches += 1
            bad_in_a_row += 1
            log.warning("non-finite loss at step %d (batch %d), skipped (%d in a row, %d in all)",
                        state.step + 1, drawn, bad_in_a_row, state.skipped_batches)
            del out, losses  # the skipped batch's graph must not live through the next forward
            if bad_in_a_row >= config.train.max_bad_steps:
                step.stop, step.bad_in_a_row = "bad_steps", bad_in_a_row
                return step
            continue
        bad_in_a_row = 0
        engine.backward(losses["loss"])
        engine.step()
        for name, value in agreed.sums.items():
            step.sums[name] = step.sums.get(name, 0.0) + value / ranks.world_size
        step.micro_batches += 1

    clamp_logit_scale(engine.module)
    step.samples = step.micro_batches * config.train.batch_size * ranks.world_size
    step.seconds = time.perf_counter() - start
    state.step = engine.global_steps
    state.batches_drawn = drawn
    state.samples_seen += step.samples
    return step


@dataclass
class Agreed:
    """What every rank knows after a micro-batch's forward, from one all-reduce."""

    stop_requested: bool  # on some rank
    nonfinite_loss: bool  # on some rank
    sums: dict[str, float]  # step_numbers summed over the ranks


def agree(losses: dict, out: dict, device) -> Agreed:
    flags = {"nonfinite_loss": (~torch.isfinite(losses["loss"].detach())).float(),
             "stop_requested": torch.tensor(float(StopRequest.signum is not None))}
    sums = sum_over_ranks({**flags, **step_numbers(losses, out)}, device)
    return Agreed(stop_requested=sums.pop("stop_requested") > 0, nonfinite_loss=sums.pop("nonfinite_loss") > 0,
                  sums=sums)


def step_numbers(losses: dict, out: dict) -> dict[str, torch.Tensor]:
    """Scalars to all-reduce (summed over ranks) for decisions and logging."""
    numbers = {
        "loss": losses["loss"].detach().float(),
        "contrastive_loss": losses["contrastive_loss"].detach().float(),
        "aux_loss": torch.as_tensor(losses["aux_loss"]).detach().float(),
    }
    for name, value in sorted(out["aux_terms"].items()):
        numbers[f"aux_layer_mean/{name}"] = value.detach().float()  # unweighted, mean over MoE layers
    for modality in MODALITIES:
        if out["routing"]:
            numbers[f"dropped/{modality}"] = sum(s[modality]["dropped"] for s in out["routing"]).float()
            numbers[f"routes/{modality}"] = sum(s[modality]["routes"] for s in out["routing"]).float()
    return numbers


def step_metrics(step: StepResult, engine, state: TrainState, world_size: int) -> dict:
    """An optimizer step's record in metrics.jsonl (and TensorBoard, wandb)."""
    m = {k: v / step.micro_batches for k, v in step.sums.items() if not k.startswith(("dropped/", "routes/"))}
    for modality in MODALITIES:
        if f"routes/{modality}" in step.sums:
            m[f"drop_rate/{modality}"] = step.sums[f"dropped/{modality}"] / max(1.0, step.sums[f"routes/{modality}"])
    grad_norm = engine.get_global_grad_norm()
    m.update({
        "lr": step.lr,
        "logit_scale": float(engine.module.logit_scale.detach().float().exp()),
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "samples_per_s": step.samples / step.seconds,
        "samples_per_s_per_device": step.samples / step.seconds / world_size,
        "data_wait_fraction": step.data_seconds / step.seconds,
        "skipped_batches": state.skipped_batches,
        "samples_seen": state.samples_seen,
        "epoch": step.epoch,
        "time": time.time(),
    })
    return m


def periodic_eval(engine, tokenizer, config: TrainConfig, step: int, device, ema=None) -> dict:
    """The metrics (`eval/<name>/...`) of the evaluators due at `step`, on rank 0; {} otherwise.
    With a weight average they score it, as the export will hold it."""
    due = due_evaluators(config, step)
    if not due:
        return {}
    with ema.swapped_in(engine.module) if ema is not None else contextlib.nullcontext():
        metrics = run_evaluators(engine.module, tokenizer, due, step, config.parallel.ep_size, device)
    engine.train()
    return metrics


# -- the end: export and its check -------------------------------------------------------------


EXPORT_CHECK_LOG = "export check: max |training model - export| embedding difference %.2e (tolerance %.0e)"
# The same line as a pattern: the text escaped, each %-field a captured number.
_EXPORT_CHECK_RE = re.compile(r"(\S+)".join(re.escape(part) for part in re.split(r"%\.\d+e", EXPORT_CHECK_LOG)))


def read_export_check(out_log: str) -> tuple[float, float] | None:
    """(difference, tolerance) of the last export check in a run's out.log text; None if it has none."""
    found = _EXPORT_CHECK_RE.findall(out_log)
    return (float(found[-1][0]), float(found[-1][1])) if found else None


def export_and_check(engine, run_dir: Path, tokenizer, model_config, rank: int, world_size: int, device,
                     dtype) -> None:
    """Export the final checkpoint (rank 0), then check the export against the training model:
    each rank embeds its slice of a fixed probe batch with the expert-parallel model (eval
    mode, dropless), and rank 0 compares with the export opened by limoe.load."""
    import deepspeed.comm as dist
    from safetensors.torch import save_file

    import limoe

    from .export import export_run

    if rank == 0:
        export_run(run_dir)
        log.info("exported %s", run_dir / "export")
    dist.barrier()
    generator = torch.Generator().manual_seed(1234)
    per_rank = 2
    images = torch.rand(per_rank * world_size, 3, model_config.image_size, model_config.image_size,
                        generator=generator) * 2 - 1
    captions = [f"probe caption number {i}" for i in range(per_rank * world_size)]
    tokens = tokenizer(captions)
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    module = engine.module
    module.eval()
    with torch.no_grad():
        z_img = module.encode_image(images[mine].to(device, dtype), normalize=True).float()
        z_txt = module.encode_text(tokens[mine].to(device), normalize=True).float()
    module.train()
    gathered = [torch.zeros_like(z_img) for _ in range(world_size)], [torch.zeros_like(z_txt) for _ in range(world_size)]
    dist.all_gather(gathered[0], z_img)
    dist.all_gather(gathered[1], z_txt)
    if rank == 0:
        train_img, train_txt = torch.cat(gathered[0]).cpu(), torch.cat(gathered[1]).cpu()
        model, _, _ = limoe.load(run_dir / "export")
        with torch.no_grad():
            export_img = model.encode_image(images, normalize=True)
            export_txt = model.encode_text(tokens, normalize=True)
        diff = max((train_img - export_img).abs().max().item(), (train_txt - export_txt).abs().max().item())
        # The training model's outputs on the probe, kept so the export can be checked again later.
        save_file({"images": images, "tokens": tokens, "image_features": train_img, "text_features": train_txt},
                  str(run_dir / "export_probe.safetensors"))
        tolerance = 1e-4 if dtype == torch.float32 else 5e-2
        (log.info if diff <= tolerance else log.error)(EXPORT_CHECK_LOG, diff, tolerance)
    dist.barrier()
