"""Export and load: one folder with model.safetensors, config.json and the tokenizer
(tokenizer.model for SentencePiece, or tokenizer.bpe.json + its vocabulary for open_clip's BPE).

Nothing here unpickles: weights are safetensors, the config is JSON and the
tokenizer is a SentencePiece protobuf. Missing, truncated or mismatched files
raise `ExportError` naming the file and the problem.

Expert parameters are named as in DeepSpeed's MoE
(`...deepspeed_moe.experts.deepspeed_experts.<i>...`). An export always holds
all experts under their global ids (the ep_size=1 layout); `shard_experts`
and `gather_experts` convert to and from one expert-parallel rank's slice.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import LIMoEConfig, TwoTowerConfig, config_from_dict
from .files import replace_directory

FORMAT_VERSION = 1
WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.model"
EXPERT_KEY = re.compile(r"^(.*\.deepspeed_experts\.)(\d+)(\..*)$")


class ExportError(RuntimeError):
    pass


def shard_experts(state_dict: dict, ep_rank: int, ep_size: int, num_experts: int) -> dict:
    """Keep the experts owned by `ep_rank` and renumber them locally (0..E/ep_size-1)."""
    local = num_experts // ep_size
    out = {}
    for key, value in state_dict.items():
        m = EXPERT_KEY.match(key)
        if m is None:
            out[key] = value
            continue
        global_id = int(m.group(2))
        if ep_rank * local <= global_id < (ep_rank + 1) * local:
            out[f"{m.group(1)}{global_id - ep_rank * local}{m.group(3)}"] = value
    return out


def gather_experts(shards: list[dict]) -> dict:
    """Inverse of shard_experts: shards[r] is expert-parallel rank r's state dict."""
    out = {}
    for rank, shard in enumerate(shards):
        local = 1 + max((int(m.group(2)) for k in shard if (m := EXPERT_KEY.match(k))), default=-1)
        for key, value in shard.items():
            m = EXPERT_KEY.match(key)
            if m is None:
                out.setdefault(key, value)
            else:
                out[f"{m.group(1)}{rank * local + int(m.group(2))}{m.group(3)}"] = value
    return out


def save(model, tokenizer, out_dir: str | os.PathLike, state_dict: dict | None = None,
         metadata: dict | None = None) -> Path:
    """Write an export folder atomically (a temp folder renamed into place)."""
    out_dir = Path(out_dir)
    if state_dict is None:
        if getattr(model, "ep_size", 1) != 1:
            raise ExportError("model has ep_size > 1: pass the gathered state_dict (see gather_experts)")
        state_dict = model.state_dict()
    state_dict = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(state_dict, str(tmp / WEIGHTS), metadata={"format": "pt"})
        doc = {"format_version": FORMAT_VERSION, "model": model.config.to_dict(), "metadata": metadata or {}}
        (tmp / CONFIG).write_text(json.dumps(doc, indent=2))
        tokenizer.save(tmp / getattr(tokenizer, "FILENAME", TOKENIZER))
        replace_directory(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_config(export_dir: str | os.PathLike) -> tuple[LIMoEConfig | TwoTowerConfig, dict]:
    path = Path(export_dir) / CONFIG
    if not path.is_file():
        raise ExportError(f"{path}: missing (is {export_dir} a limoe export folder?)")
    try:
        doc = json.loads(path.read_text())
        config = config_from_dict(doc["model"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ExportError(f"{path}: not a valid limoe config ({e})") from e
    if doc.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path}: format_version {doc.get('format_version')} is not {FORMAT_VERSION}")
    return config, doc.get("metadata", {})


def load_weights(model: torch.nn.Module, export_dir: str | os.PathLike) -> None:
    path = Path(export_dir) / WEIGHTS
    if not path.is_file():
        raise ExportError(f"{path}: missing")
    try:
        state_dict = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ExportError(f"{path}: unreadable or truncated safetensors file ({e})") from e
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ExportError(f"{path}: does not match config.json: missing {missing[:5]}"
                          f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                          f"{'...' if len(unexpected) > 5 else ''}")
    bad = [k for k in expected if expected[k].shape != state_dict[k].shape]
    if bad:
        k = bad[0]
        raise ExportError(f"{path}: tensor {k} has shape {tuple(state_dict[k].shape)}, "
                          f"config.json implies {tuple(expected[k].shape)}")
    model.load_state_dict(state_dict)


def load_tokenizer(export_dir: str | os.PathLike, context_length: int | None = None):
    from .tokenizer import BPETokenizer, Tokenizer

    bpe = Path(export_dir) / BPETokenizer.FILENAME
    if bpe.is_file():
        try:
            return BPETokenizer.load(bpe, context_length=context_length)
        except (OSError, ValueError, KeyError) as e:
            raise ExportError(f"{bpe}: not a valid open_clip BPE tokenizer ({e})") from e
    path = Path(export_dir) / TOKENIZER
    if not path.is_file():
        raise ExportError(f"{path}: missing")
    try:
        return Tokenizer.load(path, context_length=context_length)
    except Exception as e:  # sentencepiece raises plain RuntimeError/OSError on bad protos
        raise ExportError(f"{path}: not a valid SentencePiece model ({e})") from e
