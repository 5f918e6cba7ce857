"""Training configs: YAML files of plain data, parsed into one typed tree and checked before launch.

TrainConfig is a tree of dataclasses: the sections below, and `model`, the
LIMoEConfig itself (TwoTowerConfig for an `open_clip-*` preset), seeded from
`model.preset`. Every key of a YAML file or an override, down to
`model.moe.text.global_entropy_experts`, goes through the same parser
(`_from_dict`): the key must exist, the value is coerced to the annotated type,
and a key left out keeps the default (the preset's value, under `model`). The
tokenizer then decides the model's vocab_size and context_length, in one step:
`TrainConfig.fit_tokenizer`.

Command-line overrides use open_clip's flag names where one exists
(`--batch-size`, `--lr`, ...; see OVERRIDE_FLAGS) and `--set key.sub=value`
for any other key. Every mistake that can be seen before launch (an unknown
key, a value of the wrong type, missing shards, an ep_size that does not
divide the experts or the world size, ZeRO stage 3 with MoE) raises
ConfigError with the dotted key in the message.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from data_pipelines.loader import DataSource
from eval.evaluators import EVALUATORS, Evaluator, ZeroShot
from limoe.config import POSITIVES_MODES, LIMoEConfig, TwoTowerConfig, get_config, list_models

CONFIG_DIR = Path(__file__).parent / "configs"
PRECISIONS = ("fp32", "bf16")
BATCHED_EXPERTS = ("auto", True, False)
REPORT_TARGETS = ("tensorboard", "wandb")
ACCELERATORS = ("auto", "cpu", "cuda")
DEFAULT_PRESET = "limoe-nano"


class ConfigError(ValueError):
    """A mistake in a training config, found before launch; the message names the key."""


# -- sections -----------------------------------------------------------------


@dataclass
class DataSection:
    train: list[DataSource] = field(default_factory=list)
    # SentencePiece model; when the file is missing, `limoe train` trains one on
    # the training captions (tokenizer_vocab_size pieces) and saves it here.
    tokenizer: str | None = None
    tokenizer_vocab_size: int = 1000
    workers: int = 1  # DataLoader workers per rank
    # Training augmentation: false = none (resize only), true = limoe.transforms.AugmentConfig's
    # defaults (random resized crop), or a mapping of AugmentConfig fields (scale_min, hflip, ...).
    augment: bool | dict = False
    shuffle_buffer: int = 1000
    # Give each sample of a batch a caption no other sample of the batch has, when it has one
    # (identical captions in a contrastive batch are false negatives); false: uniform choice.
    unique_captions: bool = True
    # Multi-positive contrastive loss: an image whose captions include a caption drawn for
    # another sample of the batch counts as a positive of that caption too (a class-level
    # caption describes every image of the class). false: off; true or "both": every
    # caption-sharing pair a positive in both directions (UniCL); "text": a caption's target is
    # spread over the images that have it, an image's stays on its own caption (its other
    # captions in the batch left out of its softmax). Softmax loss (model.loss clip) only.
    caption_positives: bool | str = False
    # Subword regularization of the training captions (SentencePiece tokenizers; 0 = off): each
    # caption gets a randomly drawn segmentation. For a BPE model, the probability of skipping
    # each merge (BPE-dropout, 0.1 is usual); for a unigram model, the sampling exponent alpha
    # (smaller is more random). Evaluation and exports always use the best segmentation. The draws
    # repeat for a seed only with data.workers 0 (SentencePiece's generator, see data_pipelines.loader).
    subword_sampling: float = 0.0


@dataclass
class TrainSection:
    batch_size: int = 32  # per process (per GPU), as open_clip's --batch-size
    accum_freq: int = 1  # gradient accumulation: micro-batches per optimizer step
    steps: int = 1000  # optimizer steps; the schedule spans exactly this many
    # Stop (with a checkpoint) after this many steps, as if interrupted; the
    # schedule still spans `steps`. For resume tests and time-boxed jobs.
    stop_after: int | None = None
    grad_clip: float = 1.0  # global grad-norm clip; 0 turns it off
    precision: str = "fp32"  # fp32 (CPU) or bf16 (GPU)
    grad_checkpointing: bool = False
    # The experts' matmuls: "auto" batches them on CUDA (one kernel per weight) and loops
    # over them on CPU; true/false force one way (true on CPU runs the path a GPU takes).
    batched_experts: bool | str = "auto"
    max_bad_steps: int = 5  # consecutive NaN/inf losses (each skipped) before the run stops
    # Keep an exponential moving average of the weights with this decay (0: off); exports and
    # evaluation during training then use the average (launch/ema.py).
    ema_decay: float = 0.0
    log_every: int = 1  # steps between metrics.jsonl / TensorBoard records


@dataclass
class OptimizerSection:
    lr: float = 5e-4
    wd: float = 0.1  # decoupled (AdamW); never applied to norms, biases, embeddings, logit_scale
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6


@dataclass
class ScheduleSection:
    warmup: int = 100  # linear warmup steps (from 0 to lr)
    min_lr: float = 0.0  # cosine decay floor


@dataclass
class ParallelSection:
    num_procs: int = 1  # processes per node: one per GPU, or CPU ranks
    num_nodes: int = 1
    ep_size: int = 1  # expert-parallel group size; experts are split over its ranks
    zero_stage: int = 1  # 0, 1 or 2 (DeepSpeed's native MoE does not support 3)
    accelerator: str = "auto"  # auto (DeepSpeed detects), cpu, cuda
    hostfile: str | None = None  # DeepSpeed/MPI-style hostfile for multi-node runs
    master_addr: str | None = None
    master_port: int | None = None  # None: a free port on one node, 29500 across nodes
    # Your own ds_config JSON template, used as written; null: ds_config_template.json + ds_config.stage_keys.
    ds_config: str | None = None
    threads_per_proc: int | None = None  # torch/OMP threads per rank; null = cores / local ranks


@dataclass
class EvalSection(ZeroShot):
    """The `eval:` section from before `evals:`: one zero-shot evaluator, with this section's old
    defaults, logging under the names it always had (eval/top1, ...). Kept so that existing
    configs and run directories (a resumed run continues its metric series) work unchanged."""

    templates: str | None = "openai"
    max_images: int | None = 1000  # a quick estimate during training; null = all


@dataclass
class CheckpointSection:
    every: int = 500  # steps between checkpoints (one is always written at the end)
    keep: int = 2  # the newest K checkpoints are kept
    export: bool = True  # write a limoe.save export into <run>/export at the end


@dataclass
class LoggingSection:
    # Where rank 0 sends its metrics besides metrics.jsonl (always written), as open_clip's
    # --report-to: "tensorboard", "wandb", "tensorboard,wandb", "all" or "none".
    report_to: str = "tensorboard"
    wandb_project: str = "limoe"  # open_clip's --wandb-project-name
    wandb_notes: str | None = None


def report_targets(report_to: str | None) -> list[str]:
    """`logging.report_to` as a list of targets ("all" = every one, "none" or "" = none)."""
    items = [item.strip().lower() for item in (report_to or "").split(",") if item.strip()]
    if items == ["all"]:
        return list(REPORT_TARGETS)
    if items == ["none"]:
        return []
    unknown = [item for item in items if item not in REPORT_TARGETS]
    if unknown:
        raise ConfigError(f"'logging.report_to': unknown target {unknown[0]!r}; use a comma-separated list of "
                          f"{', '.join(REPORT_TARGETS)}, or all, or none")
    return items


@dataclass
class TrainConfig:
    name: str | None = None  # run name: logs/<name>/; null = a timestamp
    logs: str = "logs"
    seed: int = 0
    # In YAML `model: {preset: NAME, <field>: value, ...}`: the preset's config with those fields changed.
    model: LIMoEConfig | TwoTowerConfig = field(default_factory=lambda: get_config(DEFAULT_PRESET))
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    # name -> evaluator (eval/evaluators.py); `type` picks the class, its fields are the other keys.
    evals: dict[str, Evaluator] = field(default_factory=dict)
    eval: EvalSection = field(default_factory=EvalSection)  # the old single zero-shot section
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    # What `model` was seeded from; not a key of its own in YAML, where it is model.preset.
    preset: str = field(default=DEFAULT_PRESET, metadata={"key": "model.preset"})

    @property
    def run_dir(self) -> Path:
        return Path(self.logs) / self.name

    @property
    def world_size(self) -> int:
        return self.parallel.num_procs * self.parallel.num_nodes

    def evaluators(self) -> dict[str, Evaluator]:
        """Every evaluator by its config key: `evals.<name>`, and `eval` for the old section."""
        return {"eval": self.eval, **{f"evals.{name}": e for name, e in self.evals.items()}}

    def fit_tokenizer(self, vocab_size: int, context_length: int | None = None) -> LIMoEConfig | TwoTowerConfig:
        """Give the model the tokenizer's vocab_size (and context_length): the one place they are decided.
        The preset's values are placeholders; a value the config changed must agree. Returns the model."""
        preset = get_config(self.preset)
        sizes = {k: v for k, v in (("vocab_size", vocab_size), ("context_length", context_length)) if v is not None}
        for key, value in sizes.items():
            if getattr(self.model, key) not in (getattr(preset, key), value):
                raise ConfigError(f"'model.{key}' is {getattr(self.model, key)} but the tokenizer has {key}={value}")
        self.model = dataclasses.replace(self.model, **sizes)
        return self.model

    def to_dict(self) -> dict:
        """The YAML form: every section in full, the model as its preset plus the fields that differ from it
        (so a later model.preset override still takes effect when the dict is loaded again)."""
        out = dataclasses.asdict(self)
        out["evals"] = {name: {"type": e.type, **out["evals"][name]} for name, e in self.evals.items()}
        if self.eval == EvalSection():  # written only by the configs that still use it
            del out["eval"]
        preset = out.pop("preset")
        out["model"] = {"preset": preset, **_changed(out["model"], get_config(preset).to_dict())}
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _changed(new: dict, old: dict) -> dict:
    """The entries of `new` that differ from `old`, recursing into mappings."""
    return {k: _changed(v, old.get(k) or {}) if isinstance(v, dict) else v
            for k, v in new.items() if v != old.get(k)}


# -- parsing mappings into the dataclasses, naming the key on every mistake ---------------------


def _unknown_key_error(key: str, prefix: str, known) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; known keys: {', '.join(sorted(known))}"
    return ConfigError(f"unknown config key '{prefix}{key}'{hint}")


def _did_you_mean(value, known) -> str:
    close = difflib.get_close_matches(str(value), list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# The leaf types a config uses: what a value must be, and how the error says it.
_SCALARS = {
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (lambda v: _is_number(v) and float(v).is_integer(), "an integer"),
    float: (_is_number, "a number"),
    str: (lambda v: isinstance(v, str) or _is_number(v), "a string"),
    dict: (lambda v: isinstance(v, dict), "a mapping"),
}


def _coerce(tp, value, key: str, base=None):
    """Check/convert one value to the annotated type `tp`; the error names `key`. A mapping for a
    dataclass changes the fields of `base` (the type's defaults when None)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        *first, last = [a for a in args if a is not type(None)]
        for arg in first:  # bool | dict and the like: the first type that accepts the value
            with contextlib.suppress(ConfigError):
                return _coerce(arg, value, key, base)
        return _coerce(last, value, key, base)
    if tp is Evaluator:
        return _evaluator(value, key)
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, key + ".", base)
    if typing.get_origin(tp) is dict:  # dict[str, X]: names chosen by the user, each value checked as an X
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}")
        _, item = typing.get_args(tp)
        return {str(name): _coerce(item, v, f"{key}.{name}") for name, v in value.items()}
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            raise ConfigError(f"'{key}' must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp not in _SCALARS:
        return value
    accepts, what = _SCALARS[tp]
    number = value
    if tp is float and isinstance(value, str):  # YAML reads "1e-3" (no dot) as a string
        with contextlib.suppress(ValueError):
            number = float(value)
    if not accepts(number):
        raise ConfigError(f"'{key}' must be {what}, got {value!r}")
    if tp is float and not math.isfinite(number):  # YAML's .inf / .nan would pass every range check
        raise ConfigError(f"'{key}' must be a finite number, got {value!r}")
    return tp(number)


def _from_dict(cls, data, prefix: str = "", base=None):
    """A `cls` from a mapping, each key checked and coerced; keys left out keep `base`'s values
    (the defaults without one). The class's own checks (LIMoEConfig.validate) name the section."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"'{where}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if "key" not in f.metadata]  # metadata "key": written elsewhere
    for key in data:
        if key not in names:
            raise _unknown_key_error(key, prefix, names)
    kwargs = {k: _coerce(hints[k], v, prefix + k, getattr(base, k, None)) for k, v in data.items()}
    try:
        return cls(**kwargs) if base is None else dataclasses.replace(base, **kwargs)
    except (TypeError, ValueError) as e:  # a required field is missing, or the values do not fit together
        raise ConfigError(f"'{where}': {e}") from e


def _evaluator(data, key: str) -> Evaluator:
    """One `evals.<name>` entry: its `type` picks the evaluator class (a plug-in), whose fields the
    other keys set, parsed like any section."""
    if not isinstance(data, dict):
        raise ConfigError(f"'{key}' must be a mapping with a 'type' key, got {data!r}")
    fields = dict(data)
    kind = fields.pop("type", None)
    known = ", ".join(EVALUATORS)
    if kind is None:
        raise ConfigError(f"'{key}.type' is required: one of {known}")
    if kind not in EVALUATORS:
        raise ConfigError(f"'{key}.type': unknown evaluator {kind!r}{_did_you_mean(kind, EVALUATORS)}; "
                          f"one of {known}")
    return _from_dict(EVALUATORS[kind], fields, key + ".")


def parse_model(data) -> tuple[str, LIMoEConfig | TwoTowerConfig]:
    """`model: {preset: NAME, <field>: value, moe: {...}}` -> (NAME, its LIMoEConfig with those fields
    changed), or for an `open_clip-*` preset the dense two-tower peer's TwoTowerConfig."""
    if not isinstance(data, dict):
        raise ConfigError(f"'model' must be a mapping with a 'preset' key, got {data!r}")
    fields = dict(data)
    preset = fields.pop("preset", None)
    if preset is None:
        raise ConfigError("'model.preset' is required (see `limoe info --list`)")
    if preset not in list_models():
        raise ConfigError(f"'model.preset': unknown model {preset!r}{_did_you_mean(preset, list_models())}; "
                          "see `limoe info --list`")
    base = get_config(preset)
    if isinstance(base, TwoTowerConfig):
        # Like a dense twin, the open_clip peer has no experts: routing settings do not apply to it.
        fields.pop("moe", None)
    return preset, _from_dict(type(base), fields, "model.", base)


def parse_config(raw) -> TrainConfig:
    """A config mapping (YAML's data) -> TrainConfig; `model` is seeded from model.preset."""
    if not isinstance(raw, dict):
        raise ConfigError(f"'config' must be a mapping, got {raw!r}")
    config = _from_dict(TrainConfig, {k: v for k, v in raw.items() if k != "model"})
    if "model" in raw:
        config.preset, config.model = parse_model(raw["model"])
    return config


# -- overrides ------------------------------------------------------------------

# `--eval-every`: the `every` of each evaluator in `evals` (a `*` in a key stands for each entry of
# the mapping there), and of the old `eval:` section when a config has one.
EVERY_EVALUATOR = "evals.*.every"

# open_clip-style flag -> dotted config key. Flags that open_clip does not have
# use the same spelling style. `--train-data` (open_clip's "::"-joined list) and
# `--set` are turned into (key, value) pairs in overrides_from_args.
OVERRIDE_FLAGS = {
    "model": ("model.preset", str, "model preset, e.g. limoe-nano, limoe-b-16"),
    "batch_size": ("train.batch_size", int, "batch size per process (per GPU)"),
    "accum_freq": ("train.accum_freq", int, "gradient accumulation steps per optimizer step"),
    "steps": ("train.steps", int, "optimizer steps (the schedule spans them)"),
    "stop_after": ("train.stop_after", int, "stop with a checkpoint after this many steps"),
    "lr": ("optimizer.lr", float, "peak learning rate"),
    "wd": ("optimizer.wd", float, "AdamW weight decay"),
    "beta1": ("optimizer.beta1", float, "AdamW beta1"),
    "beta2": ("optimizer.beta2", float, "AdamW beta2"),
    "eps": ("optimizer.eps", float, "AdamW epsilon"),
    "warmup": ("schedule.warmup", int, "linear warmup steps"),
    "precision": ("train.precision", str, "fp32 or bf16"),
    "grad_clip_norm": ("train.grad_clip", float, "gradient-norm clip (0 = off)"),
    "grad_checkpointing": ("train.grad_checkpointing", bool, "recompute activations in backward (saves memory)"),
    "workers": ("data.workers", int, "data loader workers per process"),
    "tokenizer": ("data.tokenizer", str, "SentencePiece tokenizer.model (trained here if missing), "
                                         "or an open_clip BPE *.bpe.json (written here if missing)"),
    "name": ("name", str, "run name: the run directory is <logs>/<name>"),
    "logs": ("logs", str, "folder holding run directories"),
    "seed": ("seed", int, "random seed"),
    "ep_size": ("parallel.ep_size", int, "expert-parallel group size"),
    "zero_stage": ("parallel.zero_stage", int, "DeepSpeed ZeRO stage (0, 1 or 2)"),
    "num_gpus": ("parallel.num_procs", int, "processes per node (GPUs, or CPU ranks)"),
    "num_nodes": ("parallel.num_nodes", int, "number of nodes"),
    "hostfile": ("parallel.hostfile", str, "DeepSpeed hostfile for multi-node runs"),
    "master_addr": ("parallel.master_addr", str, "address of node 0"),
    "master_port": ("parallel.master_port", int, "port on node 0"),
    "save_every": ("checkpoint.every", int, "steps between checkpoints"),
    "eval_every": (EVERY_EVALUATOR, int, "steps between evaluations, for every evaluator (0 = off)"),
    "report_to": ("logging.report_to", str, "metrics besides metrics.jsonl: tensorboard, wandb, tensorboard,wandb, "
                                            "all or none"),
    "wandb_project_name": ("logging.wandb_project", str, "Weights & Biases project"),
}


def add_override_flags(parser) -> None:
    """Add the config-override flags to an argparse parser (shared by `limoe train` and train.py)."""
    group = parser.add_argument_group("config overrides (open_clip-style names)")
    group.add_argument("--train-data", default=None, metavar="SHARDS",
                       help="training shards; several sources joined with '::' (open_clip style)")
    group.add_argument("--train-data-upsampling-factors", default=None, metavar="W::W",
                       help="sampling weight of each --train-data source, joined with '::'")
    for dest, (key, tp, help_text) in OVERRIDE_FLAGS.items():
        flag, help_text = "--" + dest.replace("_", "-"), f"{help_text} ({key})"
        if tp is bool:  # a switch: given means true
            group.add_argument(flag, dest=dest, action="store_true", default=None, help=help_text)
        else:
            group.add_argument(flag, dest=dest, type=tp, default=None, metavar={int: "N", float: "X"}.get(tp, "VALUE"),
                               help=help_text)
    group.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="set any config key, model fields included, e.g. --set model.moe.k=2 (repeatable)")


def overrides_from_args(args) -> list[tuple[str, object]]:
    """The (dotted key, value) pairs the user gave on the command line, in order."""
    pairs: list[tuple[str, object]] = []
    if getattr(args, "train_data", None):
        sources = [s for s in args.train_data.split("::") if s]
        weights = [1.0] * len(sources)
        if args.train_data_upsampling_factors:
            weights = [float(w) for w in args.train_data_upsampling_factors.split("::")]
            if len(weights) != len(sources):
                raise ConfigError(f"--train-data-upsampling-factors has {len(weights)} values for "
                                  f"{len(sources)} --train-data sources")
        pairs.append(("data.train", [{"shards": s, "weight": w} for s, w in zip(sources, weights)]))
    for dest, (key, _, _) in OVERRIDE_FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            pairs.append((key, value))
    for item in getattr(args, "set", None) or []:
        pairs.append(parse_set(item))
    return pairs


def parse_set(item: str) -> tuple[str, object]:
    """'a.b=value' -> ('a.b', YAML-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
    return key, yaml.safe_load(raw) if raw.strip() else None


def _expand(raw: dict, key: str) -> list[str]:
    """The dotted keys `key` stands for: itself, or with each `*` replaced by every key of the
    mapping there. An error if that is none, so that a flag never silently does nothing."""
    if "*" not in key.split("."):
        return [key]
    head, _, rest = key.partition(".*")
    node = raw
    for part in head.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    keys = [f"{head}.{name}{rest}" for name in node] if isinstance(node, dict) else []
    if key == EVERY_EVALUATOR and isinstance(raw.get("eval"), dict):
        keys.append("eval.every")  # the old section is one more evaluator
    if not keys:
        raise ConfigError(f"cannot set '{key}': the config has no '{head}' entries")
    return [k for one in keys for k in _expand(raw, one)]


def apply_overrides(raw: dict, overrides) -> dict:
    """Set dotted keys in the raw (not yet parsed) config dict; keys are checked later."""
    raw = copy.deepcopy(raw)
    for key, value in overrides:
        for one in _expand(raw, key):
            _set_key(raw, one, value)
    return raw


def _set_key(raw: dict, key: str, value) -> None:
    """raw[a][b][c] = value for key "a.b.c", making the mappings on the way."""
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{key}': '{'.'.join(parts[:i + 1])}' is not a mapping")
        node = child
    node[parts[-1]] = value


# -- loading and checking ---------------------------------------------------------


def find_config(path: str | os.PathLike) -> Path:
    """A config path, or the name of one shipped in launch/configs ("cpu-demo")."""
    p = Path(path)
    if p.is_file():
        return p
    for candidate in (CONFIG_DIR / p.name, CONFIG_DIR / f"{p.name}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(c.stem for c in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config file {str(path)!r} not found (shipped configs: {shipped})")


def load_config(source: str | os.PathLike | dict, overrides=(), fill_name: bool = True) -> TrainConfig:
    """Read a YAML file (or take a dict), apply overrides, parse and check everything
    that does not touch the file system. A missing name becomes a timestamp
    (`fill_name=False`: an error, for the ranks, which must agree on it)."""
    if isinstance(source, dict):
        raw = source
    else:
        path = find_config(source)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if isinstance(raw, dict) and "model" not in raw:  # the default model, which --set model.<field> then changes
        raw = {**raw, "model": {"preset": DEFAULT_PRESET}}
    config = parse_config(apply_overrides(raw, overrides))
    if config.name is None and not fill_name:
        raise ConfigError("'name': required when train.py is started directly (limoe train fills in a timestamp)")
    if config.name is None:
        config.name = datetime.datetime.now().strftime("%Y_%m_%d-%H_%M_%S") + f"-{config.preset}"
    check_config(config)
    return config


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"'{key}': {message}")


def check_config(config: TrainConfig) -> None:
    """Checks that need no files: value ranges and how the parallel settings fit the model."""
    t, o, s, p, c = config.train, config.optimizer, config.schedule, config.parallel, config.checkpoint
    _check(bool(config.name) and "/" not in config.name and config.name not in (".", ".."), "name",
           f"must be a plain folder name, got {config.name!r}")
    _check(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
    _check(t.accum_freq >= 1, "train.accum_freq", f"must be >= 1, got {t.accum_freq}")
    _check(t.steps >= 1, "train.steps", f"must be >= 1, got {t.steps}")
    _check(t.stop_after is None or 1 <= t.stop_after <= t.steps, "train.stop_after",
           f"must be in 1..train.steps={t.steps}, got {t.stop_after}")
    _check(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0, got {t.grad_clip}")
    _check(t.precision in PRECISIONS, "train.precision", f"must be one of {PRECISIONS}, got {t.precision!r}")
    _check(t.batched_experts in BATCHED_EXPERTS, "train.batched_experts",
           f"must be auto, true or false, got {t.batched_experts!r}")
    _check(t.max_bad_steps >= 1, "train.max_bad_steps", f"must be >= 1, got {t.max_bad_steps}")
    _check(0.0 <= t.ema_decay < 1.0, "train.ema_decay", f"must be in [0, 1) (0 turns it off), got {t.ema_decay}")
    _check(t.log_every >= 1, "train.log_every", f"must be >= 1, got {t.log_every}")
    _check(o.lr > 0, "optimizer.lr", f"must be > 0, got {o.lr}")
    _check(o.wd >= 0, "optimizer.wd", f"must be >= 0, got {o.wd}")
    _check(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optimizer.beta1/beta2", "must be in [0, 1)")
    _check(0 <= s.warmup <= t.steps, "schedule.warmup", f"must be in 0..train.steps={t.steps}, got {s.warmup}")
    _check(0 <= s.min_lr <= o.lr, "schedule.min_lr", f"must be in 0..optimizer.lr={o.lr}, got {s.min_lr}")
    _check(p.num_procs >= 1, "parallel.num_procs", f"must be >= 1, got {p.num_procs}")
    _check(p.num_nodes >= 1, "parallel.num_nodes", f"must be >= 1, got {p.num_nodes}")
    _check(p.accelerator in ACCELERATORS, "parallel.accelerator",
           f"must be one of {ACCELERATORS}, got {p.accelerator!r}")
    _check(p.zero_stage != 3, "parallel.zero_stage",
           "ZeRO stage 3 is not supported with DeepSpeed's native MoE layers (expert parallelism); use 0, 1 or 2")
    _check(p.zero_stage in (0, 1, 2), "parallel.zero_stage", f"must be 0, 1 or 2, got {p.zero_stage}")
    _check(p.zero_stage != 0 or t.grad_clip == 0, "parallel.zero_stage",
           "stage 0 with train.grad_clip > 0 fails in DeepSpeed 0.19.8 (its stage-0 clipping cannot scale the "
           "0-dim logit_scale gradient); use zero_stage 1, or set train.grad_clip: 0")
    _check(p.threads_per_proc is None or p.threads_per_proc >= 1, "parallel.threads_per_proc", "must be >= 1")
    _check(c.every >= 1, "checkpoint.every", f"must be >= 1, got {c.every}")
    _check(c.keep >= 1, "checkpoint.keep", f"must be >= 1, got {c.keep}")
    check_evaluators(config)
    _check(bool(config.data.train), "data.train", "no training data: give at least one {shards: ..., weight: ...}")
    for i, src in enumerate(config.data.train):
        _check(src.weight > 0, f"data.train[{i}].weight", f"must be > 0, got {src.weight}")
    _check(config.data.workers >= 0, "data.workers", f"must be >= 0, got {config.data.workers}")
    _check(0 <= config.data.subword_sampling <= 1, "data.subword_sampling",
           f"must be in [0, 1], got {config.data.subword_sampling}")
    _check(config.data.caption_positives in (False, True, *POSITIVES_MODES), "data.caption_positives",
           f"must be false, true, both or text, got {config.data.caption_positives!r}")
    _check(not config.data.caption_positives or config.model.loss == "clip", "data.caption_positives",
           f"needs the softmax loss (model.loss clip), not {config.model.loss!r}")
    report_targets(config.logging.report_to)
    augment_config(config.data.augment)

    experts = config.model.moe.num_experts
    if experts == 0:
        _check(p.ep_size == 1, "parallel.ep_size", f"must be 1 for a dense model, got {p.ep_size}")
    else:
        _check(p.ep_size >= 1 and experts % p.ep_size == 0, "parallel.ep_size",
               f"{p.ep_size} does not divide the number of experts ({experts}, model.moe.num_experts)")
    _check(config.world_size % p.ep_size == 0, "parallel.ep_size",
           f"{p.ep_size} does not divide the world size {config.world_size} "
           f"(parallel.num_nodes={p.num_nodes} x parallel.num_procs={p.num_procs})")


# An evaluator's name is a part of dotted keys (so no "."), of metric names (eval/<name>/top1, so no "/")
# and of TensorBoard tags.
EVAL_NAME = re.compile(r"[A-Za-z0-9_-]+")


def check_evaluators(config: TrainConfig) -> None:
    """Each evaluator's own checks (Evaluator.problems) under its dotted key, a usable name, and
    a model with experts for those that need one (routing)."""
    for key, evaluator in config.evaluators().items():
        name = key.removeprefix("evals.")
        _check(key == "eval" or bool(EVAL_NAME.fullmatch(name)), key,
               "an evaluator's name must be letters, digits, '_' or '-' (it becomes eval/<name>/<metric>)")
        for field_name, message in evaluator.problems().items():
            _check(False, f"{key}.{field_name}", message)
        _check(not (evaluator.every and evaluator.needs_experts and config.model.moe.num_experts == 0),
               f"{key}.type", f"{evaluator.type} needs a model with experts (model.moe.num_experts is 0)")


def augment_config(augment: bool | dict):
    """data.augment -> limoe.transforms.AugmentConfig (false: a full-image crop, i.e. resize only)."""
    from limoe.transforms import AugmentConfig

    if augment is False or augment is None:
        return AugmentConfig(scale_min=1.0, scale_max=1.0, hflip=False, color_jitter=0.0)
    if augment is True:
        return AugmentConfig()
    return _from_dict(AugmentConfig, augment, "data.augment.")


def check_files(config: TrainConfig, need_tokenizer: bool = True) -> dict[str, list[str]]:
    """Checks against the file system: every shard exists, templates and hostfile exist, wandb if asked for.

    Returns {source index: shard list}.
    """
    from data_pipelines.shards import resolve_shards

    shards = {}
    for i, src in enumerate(config.data.train):
        try:
            shards[i] = resolve_shards(src.shards)
        except FileNotFoundError as e:
            raise ConfigError(f"'data.train[{i}].shards': {e}") from e
    if need_tokenizer:
        _check(bool(config.data.tokenizer) and Path(config.data.tokenizer).is_file(), "data.tokenizer",
               f"tokenizer file {config.data.tokenizer!r} not found (`limoe train` trains one when missing)")
    if config.parallel.hostfile:
        _check(Path(config.parallel.hostfile).is_file(), "parallel.hostfile",
               f"{config.parallel.hostfile} not found")
    if config.parallel.ds_config:
        _check(Path(config.parallel.ds_config).is_file(), "parallel.ds_config",
               f"{config.parallel.ds_config} not found")
    if "wandb" in report_targets(config.logging.report_to):
        import importlib.util

        _check(importlib.util.find_spec("wandb") is not None, "logging.report_to",
               "wandb is asked for but not installed: pip install wandb (WANDB_MODE=offline works without an "
               "account or network), or report to tensorboard only")
    for key, evaluator in config.evaluators().items():
        if not evaluator.every:
            continue
        try:
            evaluator.check_available()  # the hook imports it when the evaluator runs; fail here, not at step N
        except ImportError as e:
            raise ConfigError(f"'{key}.every': {evaluator.what} evaluation is not available ({e}); "
                              f"set {key}.every: 0") from e
        data = evaluator.data
        _check(Path(data).exists() or "::" in data or "{" in data, f"{key}.data", f"{data} not found")
    return shards


def save_config(config: TrainConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config (every default filled in) atomically."""
    from limoe.files import atomic_write

    return atomic_write(path, config.to_yaml())
