"""Model configuration: dataclasses and named presets.

A preset name like "limoe-b-16" gives the sparse model; appending "-dense"
("limoe-b-16-dense") gives its dense twin: the same backbone with every MoE
layer replaced by one MLP of the same shape, so FLOPs per token match (k=1).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

MODALITIES = ("image", "text")
# How data.caption_positives spreads an image's target (limoe.losses.CaptionPositivesLoss).
POSITIVES_MODES = ("both", "text")
AUX_LOSS_NAMES = ("importance", "load", "switch_load", "local_entropy", "global_entropy", "zloss")


@dataclass
class AuxLossWeights:
    """Weights of the auxiliary routing losses for one modality (0 turns a term off).

    Each weight applies per MoE layer; the model sums the weighted terms over its MoE
    layers, as V-MoE does (so its 0.005 per layer means the same at any depth).
    Formulas: limoe/routing.py and docs/model.md."""

    importance: float = 0.005  # V-MoE importance loss
    load: float = 0.005  # V-MoE load loss (needs router noise)
    switch_load: float = 0.0  # Switch/GShard E * sum_e f_e P_e (noise-free alternative to load)
    local_entropy: float = 0.0
    global_entropy: float = 0.0
    zloss: float = 0.0
    # S_m of the global-entropy threshold tau = log(S_m): the modality is pushed to spread
    # over at least about S_m experts, and no further. Required (1 < S_m <= num_experts)
    # wherever global_entropy > 0; there is no default.
    global_entropy_experts: float | None = None


def validate_aux_weights(w: AuxLossWeights, key: str, num_experts: int, noise_std: float) -> None:
    for term in AUX_LOSS_NAMES:
        value = getattr(w, term)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{key}.{term} must be a finite number >= 0, got {value!r}")
    if w.load and noise_std <= 0:
        raise ValueError(f"{key}.load={w.load} needs router noise: V-MoE's load loss is the probability of each "
                         "expert winning if the noise were drawn again, undefined without noise. Set "
                         f"moe.noise_std > 0, or use {key}.switch_load (the noise-free Switch form) instead")
    s_m = w.global_entropy_experts
    if w.global_entropy and s_m is None:
        raise ValueError(f"{key}.global_entropy={w.global_entropy} needs {key}.global_entropy_experts: the soft "
                         f"minimum number of experts S_m the modality should spread over (tau = log S_m), "
                         f"1 < S_m <= num_experts={num_experts}")
    if s_m is not None and not 1 < s_m <= num_experts:
        raise ValueError(f"{key}.global_entropy_experts must satisfy 1 < S_m <= num_experts={num_experts}, "
                         f"got {s_m}")


@dataclass
class MoEConfig:
    num_experts: int = 8  # 0 = dense twin
    k: int = 1
    # Which blocks get an MoE MLP: "every 2" (blocks 1, 3, 5, ...), "last N", or "0,3,5".
    placement: str = "every 2"
    capacity_factor: float = 1.0  # training
    eval_capacity_factor: float = 1.0  # only used when eval_dropless is False
    eval_dropless: bool = True  # inference never depends on batch composition
    # Training without a capacity: every route reaches its expert, each expert computes exactly
    # its rows (as eval_dropless), so no token skips its MoE MLP and training routes as eval
    # does. V-MoE / LIMoE train with the capacity above (capacity_factor is then unused).
    train_dropless: bool = False
    batch_priority_routing: bool = True
    # A modality whose tokens take the expert slots before the other's ("text" or "image"),
    # then BPR within each; None (default, as in LIMoE): one ranking over all tokens.
    priority_modality: str | None = None
    noise_std: float = 1.0  # router noise sigma = noise_std / num_experts, training only
    renormalize_gates: bool = False  # for k > 1; V-MoE does not renormalise
    # Combine with the chosen probabilities renormalised to sum 1 (1 at k = 1), with the
    # gradient of the raw ones (straight-through). V-MoE and LIMoE weight by the raw ones.
    straight_through_gates: bool = False
    expert_type: str = "mlp"  # "mlp" (GELU) or "swiglu"
    # Hidden width of each expert; 0 = the model's mlp_dim. With k = 2 and half of mlp_dim,
    # each token spends what one full-width expert costs ("fine-grained" experts).
    expert_mlp_dim: int = 0
    # Hidden width of a dense MLP beside the experts in every MoE block: every token passes
    # through it and its output adds to the experts' (DeepSeekMoE's "shared expert"); 0 (the
    # default, as V-MoE and LIMoE) = none. With 2x the experts at half width it keeps the FLOPs
    # per token: a 256-wide shared MLP plus one 256-wide expert cost one 512-wide expert.
    shared_expert_mlp_dim: int = 0
    # Dropout on each expert's hidden activations in training; None = the model's mlp_dropout.
    # Switch Transformer fine-tuned with 0.4 in the experts and 0.1 elsewhere ("expert dropout").
    expert_dropout: float | None = None
    # Per-modality importance + load keep both modalities balanced (docs/quality.md). The
    # entropy losses are off by default and set explicitly by the configs that use them: the
    # CPU demo (with 8 experts they helped there) and the large-model training configs.
    image: AuxLossWeights = field(default_factory=AuxLossWeights)
    text: AuxLossWeights = field(default_factory=AuxLossWeights)

    def moe_layers(self, depth: int) -> list[int]:
        if self.num_experts == 0:
            return []
        spec = self.placement.strip().lower()
        if spec.startswith("every"):
            step = int(spec.split()[1])
            layers = list(range(step - 1, depth, step))
        elif spec.startswith("last"):
            n = int(spec.split()[1])
            layers = list(range(max(0, depth - n), depth))
        else:
            layers = sorted({int(s) for s in spec.replace(" ", "").split(",") if s})
        bad = [i for i in layers if not 0 <= i < depth]
        if bad:
            raise ValueError(f"moe.placement {self.placement!r} names blocks {bad} outside 0..{depth - 1}")
        return layers


@dataclass
class LIMoEConfig:
    name: str = "custom"
    # Shared transformer
    width: int = 192
    depth: int = 6
    heads: int = 3
    kv_heads: int | None = None  # < heads: grouped-query attention
    mlp_dim: int = 768
    # Dropout on the hidden activations of every MLP in the blocks (dense ones and, unless
    # moe.expert_dropout says otherwise, the experts) in training. 0 (default, as LIMoE) = none.
    mlp_dropout: float = 0.0
    # Image side
    image_size: int = 32
    patch_size: int = 4
    image_pool: str = "map"  # "map" (attention pooling), "mean", or "cls" (a class token)
    # Text side
    vocab_size: int = 8000
    context_length: int = 16
    text_pool: str = "eos"  # "eos" or "map"
    # Parts of each block the text gets its own copy of: [] (all shared, as LIMoE),
    # "norms" (both LayerNorms), "attention" (the attention weights), "mlp" (the MLP of
    # each dense block; the experts stay shared). Same FLOPs.
    modality_specific: list[str] = field(default_factory=list)
    # Modalities whose embedded sequence is LayerNormed before the first block (open_clip's
    # image tower does this, `ln_pre`: ["image"]). [] (the default, as LIMoE) adds nothing.
    pre_norm: list[str] = field(default_factory=list)
    # Heads
    embed_dim: int = 128
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = 100.0
    loss: str = "clip"  # "clip" (softmax InfoNCE) or "siglip"
    moe: MoEConfig = field(default_factory=MoEConfig)
    # The blocks' Linear weights: "torch" (PyTorch's default, uniform +-1/sqrt(fan_in)),
    # "xavier" (big_vision's ViT and LIMoE: xavier-uniform, zero biases; routers unchanged)
    # or "scaled_normal" (open_clip's text tower: normal, output projections scaled down by
    # sqrt(2 * depth); routers unchanged).
    init: str = "torch"

    def __post_init__(self):
        if isinstance(self.moe, dict):
            moe = dict(self.moe)
            for m in MODALITIES:
                if isinstance(moe.get(m), dict):
                    moe[m] = AuxLossWeights(**moe[m])
            self.moe = MoEConfig(**moe)
        for name in ("modality_specific", "pre_norm"):  # a single name may be given as a string
            value = getattr(self, name)
            setattr(self, name, [value] if isinstance(value, str) else list(value))
        self.validate()

    def validate(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        kv = self.kv_heads or self.heads
        if self.heads % kv:
            raise ValueError(f"heads {self.heads} is not divisible by kv_heads {kv}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.image_pool not in ("map", "mean", "cls"):
            raise ValueError(f"image_pool must be 'map', 'mean' or 'cls', got {self.image_pool!r}")
        if self.text_pool not in ("eos", "map"):
            raise ValueError(f"text_pool must be 'eos' or 'map', got {self.text_pool!r}")
        bad = sorted(set(self.modality_specific) - {"norms", "attention", "mlp"})
        if bad:
            raise ValueError(f"modality_specific may name 'norms', 'attention' and 'mlp', got {bad}")
        bad = sorted(set(self.pre_norm) - set(MODALITIES))
        if bad:
            raise ValueError(f"pre_norm may name {list(MODALITIES)}, got {bad}")
        if self.init not in ("torch", "xavier", "scaled_normal"):
            raise ValueError(f"init must be 'torch', 'xavier' or 'scaled_normal', got {self.init!r}")
        if self.loss not in ("clip", "siglip"):
            raise ValueError(f"loss must be 'clip' or 'siglip', got {self.loss!r}")
        moe = self.moe
        if moe.num_experts < 0 or (moe.num_experts and not 1 <= moe.k <= moe.num_experts):
            raise ValueError(f"moe.k={moe.k} must be in 1..num_experts={moe.num_experts}")
        if moe.expert_type not in ("mlp", "swiglu"):
            raise ValueError(f"moe.expert_type must be 'mlp' or 'swiglu', got {moe.expert_type!r}")
        if moe.expert_mlp_dim < 0:
            raise ValueError(f"moe.expert_mlp_dim must be >= 0 (0 = mlp_dim), got {moe.expert_mlp_dim}")
        if moe.shared_expert_mlp_dim < 0:
            raise ValueError(f"moe.shared_expert_mlp_dim must be >= 0 (0 = none), got {moe.shared_expert_mlp_dim}")
        for key, p in (("mlp_dropout", self.mlp_dropout), ("moe.expert_dropout", moe.expert_dropout)):
            if p is not None and not (isinstance(p, (int, float)) and 0 <= p < 1):
                raise ValueError(f"{key} must be a number in [0, 1), got {p!r}")
        if moe.capacity_factor <= 0 or moe.eval_capacity_factor <= 0:
            raise ValueError("capacity factors must be positive")
        if moe.priority_modality is not None and moe.priority_modality not in MODALITIES:
            raise ValueError(f"moe.priority_modality must be one of {MODALITIES} or null, "
                             f"got {moe.priority_modality!r}")
        if moe.noise_std < 0:
            raise ValueError(f"moe.noise_std must be >= 0, got {moe.noise_std}")
        moe.moe_layers(self.depth)
        if moe.num_experts:
            for m in MODALITIES:
                validate_aux_weights(getattr(moe, m), f"moe.{m}", moe.num_experts, moe.noise_std)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def expert_dropout(self) -> float:
        """Dropout rate on the experts' hidden activations in training."""
        return self.mlp_dropout if self.moe.expert_dropout is None else self.moe.expert_dropout

    @property
    def expert_hidden(self) -> int:
        """Hidden width of one expert (the dense MLPs keep mlp_dim)."""
        return self.moe.expert_mlp_dim or self.mlp_dim

    @property
    def is_dense(self) -> bool:
        return self.moe.num_experts == 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> "LIMoEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {unknown}")
        return cls(**data)

    def dense_twin(self) -> "LIMoEConfig":
        twin = dataclasses.replace(self, name=self.name + "-dense",
                                   moe=dataclasses.replace(self.moe, num_experts=0))
        return twin


@dataclass
class TwoTowerConfig:
    """A dense two-tower CLIP built by open_clip (`open_clip.CLIP`: a ViT and a text
    transformer, each `depth` blocks wide `width`, no experts): the peer LIMoE is measured
    against. At equal width and depth it has the FLOPs per pair of the LIMoE preset of that
    size (LIMoE runs both sequences through one tower, this model through two) and about
    twice the non-expert backbone parameters. Model code: limoe/two_tower.py."""

    name: str = "open_clip-custom"
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_dim: int = 512
    image_size: int = 32
    patch_size: int = 4
    image_pool: str = "tok"  # open_clip's class token ("tok") or the mean of the patches ("avg")
    vocab_size: int = 49409  # open_clip's BPE (limoe.tokenizer.BPETokenizer: ids shifted by one)
    context_length: int = 16
    # "argmax": the end token is the largest id (BPE); "eos": the first `eos_id` (SentencePiece: 2)
    text_pool: str = "argmax"
    eos_id: int = 2
    embed_dim: int = 128
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = 100.0
    loss: str = "clip"
    family: str = "open_clip"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.family != "open_clip":
            raise ValueError(f"family must be 'open_clip' for a two-tower config, got {self.family!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.image_pool not in ("tok", "avg"):
            raise ValueError(f"image_pool must be 'tok' or 'avg' for an open_clip model, got {self.image_pool!r}")
        if self.text_pool not in ("argmax", "eos"):
            raise ValueError(f"text_pool must be 'argmax' or 'eos' for an open_clip model, got {self.text_pool!r}")
        if self.loss != "clip":
            raise ValueError(f"the open_clip peer trains with the 'clip' loss, got {self.loss!r}")

    # What the trainer, exports and reports read off any model config.
    moe = property(lambda self: MoEConfig(num_experts=0))
    kv_heads = None
    is_dense = True

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> "TwoTowerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown open_clip model config keys: {unknown}")
        return cls(**data)


def config_from_dict(data: dict) -> "LIMoEConfig | TwoTowerConfig":
    """A model config from its JSON form: LIMoE, or an open_clip two-tower (`family: open_clip`)."""
    return (TwoTowerConfig if data.get("family") == "open_clip" else LIMoEConfig).from_dict(data)


# The presets, as big_vision writes its configs: every field a preset sets, by name; the rest are
# the dataclass defaults (MoEConfig: 8 experts, top-1, MoE in every 2nd block).
PRESETS = {c.name: c for c in (
    # The demo preset: 32 px emoji, small enough to train in minutes on 2 CPU cores. Images pool at
    # a class token, not the paper's MAP head; the paper's xavier initialisation; a LayerNorm on the
    # embedded image sequence (open_clip's ln_pre). Its two MoE layers are the last two blocks
    # (V-MoE's "last 2"), each with 16 experts of half width (256) beside a shared expert of 256 that
    # every token passes (DeepSeekMoE's, not the paper's): the same FLOPs per token as 8 full-width
    # experts. The demo config adds LIMoE's entropy losses. Each was chosen on the emoji benchmark
    # (docs/quality.md).
    LIMoEConfig(name="limoe-nano", width=128, depth=4, heads=4, mlp_dim=512, image_size=32, patch_size=4,
                embed_dim=128, vocab_size=4000, logit_scale_init=math.log(30.0), image_pool="cls",
                init="xavier", pre_norm=["image"],
                moe=MoEConfig(num_experts=16, placement="last 2", expert_mlp_dim=256, shared_expert_mlp_dim=256)),
    LIMoEConfig(name="limoe-ti-16", width=192, depth=12, heads=3, mlp_dim=768, image_size=224, patch_size=16,
                embed_dim=256, vocab_size=16000),
    # V-MoE backbone widths (docs/model.md).
    LIMoEConfig(name="limoe-s-16", width=512, depth=8, heads=8, mlp_dim=2048, image_size=224, patch_size=16,
                embed_dim=512, vocab_size=32000),
    LIMoEConfig(name="limoe-b-32", width=768, depth=12, heads=12, mlp_dim=3072, image_size=224, patch_size=32,
                embed_dim=512, vocab_size=32000),
    LIMoEConfig(name="limoe-b-16", width=768, depth=12, heads=12, mlp_dim=3072, image_size=224, patch_size=16,
                embed_dim=512, vocab_size=32000),
    LIMoEConfig(name="limoe-l-16", width=1024, depth=24, heads=16, mlp_dim=4096, image_size=224, patch_size=16,
                embed_dim=768, vocab_size=32000),
    LIMoEConfig(name="limoe-h-14", width=1280, depth=32, heads=16, mlp_dim=5120, image_size=224, patch_size=14,
                embed_dim=1024, vocab_size=32000,
                # As in the paper's H/14: MoE every other block of the last 24 (12 MoE layers).
                moe=MoEConfig(num_experts=32, placement=",".join(str(i) for i in range(9, 32, 2)))),
)}
# open_clip two-tower peers: the same width and depth as the LIMoE preset of the name.
TWO_TOWER_PRESETS = {c.name: c for c in (
    TwoTowerConfig(name="open_clip-nano", width=128, depth=4, heads=4, mlp_dim=512, image_size=32, patch_size=4,
                   embed_dim=128),
)}


def list_models() -> list[str]:
    names = []
    for name in PRESETS:
        names += [name, name + "-dense"]
    return names + list(TWO_TOWER_PRESETS)


def get_config(name: str, **overrides) -> "LIMoEConfig | TwoTowerConfig":
    """Return a fresh copy of a preset ("limoe-b-16", "limoe-b-16-dense", "open_clip-nano"), with overrides."""
    if name in TWO_TOWER_PRESETS:
        return TwoTowerConfig.from_dict({**TWO_TOWER_PRESETS[name].to_dict(), **overrides})
    dense = name.endswith("-dense")
    base = name[: -len("-dense")] if dense else name
    if base not in PRESETS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    data = PRESETS[base].to_dict()
    moe_over = overrides.pop("moe", None) or {}
    data.update(overrides)
    data["moe"].update(moe_over)
    config = LIMoEConfig.from_dict(data)
    return config.dense_twin() if dense else config
