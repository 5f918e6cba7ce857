"""`limoe export`: turn a training run's DeepSpeed checkpoint into one `limoe.save` export.

A DeepSpeed MoE checkpoint folder (`<run>/checkpoints/<tag>/`) holds

    mp_rank_00_model_states.pt                        every non-expert weight, plus our
                                                      client state ("limoe": model config, step)
    layer_<L>_expert_<E>_mp_rank_00_model_states.pt   expert E of MoE layer L (global id,
                                                      key names already global)
    zero_pp_rank_*_optim_states.pt ...                optimizer shards (not needed here)

The expert files were written by the ranks of each expert-parallel group, so
together they hold all E experts of every layer. Reading them back needs
`torch.load`; these are files our own training wrote into the run directory,
and they are opened with `weights_only=True` (tensors and plain containers
only, no arbitrary objects). The result is a safetensors export that
`limoe.load` opens on one CPU process, with no DeepSpeed process group.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

from limoe.checkpoint import EXPERT_KEY, ExportError, save
from limoe.config import LIMoEConfig, TwoTowerConfig, config_from_dict
from limoe.factory import create_model
from limoe.tokenizer import load_tokenizer

MODEL_STATES = "mp_rank_00_model_states.pt"
EXPERT_FILE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")
CLIENT_KEY = "limoe"  # our entry in DeepSpeed's client state


def checkpoint_dir(run_or_checkpoint: str | Path, tag: str = "latest") -> Path:
    """The checkpoint folder for a run directory (its `latest`, or `tag`) or a checkpoint folder itself."""
    path = Path(run_or_checkpoint)
    if (path / MODEL_STATES).is_file():
        return path
    checkpoints = path / "checkpoints"
    if not checkpoints.is_dir():
        raise ExportError(f"{path}: neither a run directory (no checkpoints/) nor a checkpoint folder "
                          f"(no {MODEL_STATES})")
    if tag == "latest":
        latest = checkpoints / "latest"
        if not latest.is_file():
            raise ExportError(f"{latest}: missing (the run has not written a checkpoint yet)")
        tag = latest.read_text().strip()
    folder = checkpoints / tag
    if not (folder / MODEL_STATES).is_file():
        raise ExportError(f"{folder / MODEL_STATES}: missing (checkpoint {tag!r} is incomplete or was removed)")
    return folder


def _load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, or not written by our training
        raise ExportError(f"{path}: unreadable checkpoint file ({type(e).__name__}: {e})") from e


def read_checkpoint(folder: Path) -> tuple[LIMoEConfig | TwoTowerConfig, dict, dict]:
    """(model config, full ep_size=1 state dict, client state) from one checkpoint folder."""
    states = _load(folder / MODEL_STATES)
    client = states.get(CLIENT_KEY)
    if not isinstance(client, dict) or "model_config" not in client:
        raise ExportError(f"{folder / MODEL_STATES}: no '{CLIENT_KEY}' client state (not written by limoe training)")
    config = config_from_dict(client["model_config"])
    state_dict = dict(states["module"])
    for path in sorted(folder.iterdir()):
        if EXPERT_FILE.match(path.name):
            for key, value in _load(path).items():
                if not EXPERT_KEY.match(key):
                    raise ExportError(f"{path}: unexpected non-expert key {key!r}")
                state_dict[key] = value
    expected = _meta_model(config).state_dict()
    missing = sorted(set(expected) - set(state_dict))
    if missing:
        experts = sorted({m.group(0).rsplit(".", 2)[0] for k in missing if (m := EXPERT_KEY.match(k))})
        detail = f"expert weights missing ({experts[:4]}...)" if experts else f"missing {missing[:5]}"
        raise ExportError(f"{folder}: incomplete checkpoint: {detail}")
    unexpected = sorted(set(state_dict) - set(expected))
    if unexpected:
        raise ExportError(f"{folder}: checkpoint has weights the model config does not: {unexpected[:5]}")
    for key, tensor in expected.items():
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise ExportError(f"{folder}: {key} has shape {tuple(state_dict[key].shape)}, "
                              f"the model config implies {tuple(tensor.shape)}")
    return config, state_dict, client


WEIGHTS = ("auto", "ema", "raw")


def export_run(run_dir: str | Path, out_dir: str | Path | None = None, tag: str = "latest",
               weights: str = "auto") -> Path:
    """Gather a run's checkpoint (all experts) into `out_dir` (default <run>/export); return it.
    `weights`: "raw" the trained weights, "ema" their moving average (train.ema_decay; an error
    if the checkpoint has none), "auto" the average when the checkpoint has one."""
    from .ema import has_ema, read_ema

    if weights not in WEIGHTS:
        raise ExportError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    folder = checkpoint_dir(run_dir, tag)
    config, state_dict, client = read_checkpoint(folder)
    model = _meta_model(config)  # only its config and parameter names are used; the weights come from state_dict
    averaged = has_ema(folder)
    if weights == "ema" and not averaged:
        raise ExportError(f"{folder}: no weight average (the run trained without train.ema_decay)")
    use_average = weights != "raw" and averaged
    if use_average:
        try:
            average = read_ema(folder)
        except ValueError as e:
            raise ExportError(str(e)) from e
        params = {name for name, _ in model.named_parameters()}
        if set(average) != params:
            raise ExportError(f"{folder}: the weight average does not cover the model's parameters "
                              f"(missing {sorted(params - set(average))[:4]}, extra {sorted(set(average) - params)[:4]})")
        state_dict.update(average)
    run = folder.parent.parent
    try:
        tokenizer = load_tokenizer(run)
    except FileNotFoundError as e:
        raise ExportError(f"{e} (training copies the tokenizer into the run directory)") from e
    out = Path(out_dir) if out_dir is not None else run / "export"
    metadata = {"run_dir": str(run), "checkpoint": folder.name, "step": client.get("step"),
                "weights": "ema" if use_average else "raw"}
    return save(model, tokenizer, out, state_dict=state_dict, metadata=metadata)


def _meta_model(config):
    with torch.device("meta"):
        return create_model(config)


def run_export_command(args) -> int:
    try:
        out = export_run(args.checkpoint, args.out, args.tag, args.weights)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} (open it with limoe.load({str(out)!r}))")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="gather a training checkpoint (all experts) into one safetensors export",
        description="Read a run's DeepSpeed checkpoint (non-expert weights and every expert file) and "
                    "write one folder with model.safetensors, config.json and tokenizer.model, which "
                    "limoe.load opens on one CPU process.")
    p.add_argument("--checkpoint", required=True,
                   help="a run directory (logs/<name>; uses its latest checkpoint) or a checkpoint folder")
    p.add_argument("--out", default=None, help="output folder (default: <run>/export)")
    p.add_argument("--tag", default="latest", help="checkpoint tag inside the run (default: latest)")
    p.add_argument("--weights", choices=WEIGHTS, default="auto",
                   help="raw: the trained weights; ema: their moving average (runs with train.ema_decay); "
                        "auto (default): the average when the checkpoint has one")
    p.set_defaults(func=run_export_command)
