"""Quality ablation: does limoe's LIMoE learn at least as well as a dense open_clip CLIP of equal
compute, and which choices decide it? On the emoji data.

Every variant is a real training run of the `cpu-demo` config through the `deepspeed`
launcher (`launch.launcher.run_training`), on the Noto (google) emoji, with the same
steps, batch size, data, schedule, augmentation and seeds; only the overrides (and the
tokenizer) in VARIANTS differ. The default budget is the demo's: 935 steps x 128 pairs on
2 ranks. The models compared: LIMoE as the demo trains it (`limoe-e8e-bpe-postext-xavier-lnpre-aug`:
open_clip's BPE, images pooled at a class token, 8 experts, LIMoE's entropy losses, caption
positives on the caption side, xavier initialisation, a LayerNorm on the embedded image
sequence, crops of 50-100 % with colour jitter 0.2; the demo's default since round 17;
`limoe-e8e-bpe-postext-xavier-lnpre` is the same with the older augmentation, crops of 70-100 %,
the default of rounds 14-16; `limoe-e8e-bpe-postext-xavier` is the same without
that LayerNorm, the default of round 13; `limoe-e8e-bpe-postext` is the same with PyTorch's
default initialisation, the default of rounds 11-12; `limoe-e8e-bpe` is the same without caption positives, the default of rounds 8-10; `limoe-sp8000-cls-e8-entropy` is the same with the largest SentencePiece the
captions give, the default of rounds 5-7; `limoe-sp8000-cls` has 4 experts and no entropy
losses, rounds 3-5; `limoe-sp8000` pools images by MAP, and `limoe` is the first demo's,
with 1,000 pieces), its dense one-tower twin (`dense-cls-bpe-postext-xavier-lnpre-aug`; `dense-cls-bpe-postext-xavier-lnpre`, `dense-cls-bpe-postext-xavier`, `dense-cls-bpe-postext`, `dense-cls-bpe`, `dense-sp8000-cls`,
`dense-sp8000`, `dense` for the older defaults), and the peer, open_clip's two-tower CLIP of
the same width and depth and so the same FLOPs per pair (`open_clip-aug`, limoe/two_tower.py,
with open_clip's BPE and plain InfoNCE, as open_clip trains it, and the demo's augmentation;
`open_clip` with the older augmentation). The
other variants change one thing each. Each run is then measured on the Twemoji (twitter)
style, which no run ever trains on:

- zero-shot top-1 / top-5 at three granularities (emoji name, subcategory, category),
  with `limoe demo`'s caption-like prompts (`launch.demo.evaluate`);
- routing health per modality on Twemoji image-caption pairs, routed as in training
  (no router noise, capacity-limited at the run's capacity factor, batches of the
  per-rank training batch size so capacity sees as many tokens as in training):
  share of the modality's tokens on its busiest expert (worst MoE layer), number of
  experts receiving at least 1/(2E) of them (worst layer), and the drop rate.
  Dense runs have no routing (n/a).

Results: one JSON per run in OUT/results/ (a run whose file exists is finished; with
--resume it is skipped), each also appended to OUT/results.jsonl; then mean, std, min and
max over seeds per variant and metric (OUT/summary.json; summary-NAME.json for --section NAME),
seed-paired differences for the
contrasts in CONTRASTS, tables (parameters and FLOPs per pair included), a plot, and the
generated section of the report (docs/quality.md, between its `<!-- generated:start -->` /
`<!-- generated:end -->` markers).

    python benchmarks/quality.py                                    # the demo's LIMoE, its dense twin, open_clip x 3 seeds (~1.5 h)
    python benchmarks/quality.py --variants limoe-bpe limoe-t14 --resume   # add variants to the same table
    python benchmarks/quality.py --steps 3 --batch-size 8 --seeds 0 --variants dense limoe \\
        --out /tmp/quality-smoke --report /tmp/quality-smoke/quality.md   # a smoke test (minutes)
    python benchmarks/quality.py --report-only                      # re-render table, plot and doc from OUT
    python benchmarks/quality.py --report-only --out benchmarks/results/quality/round5 --section round5
                                                                    # one round's committed results, its own section
    python benchmarks/quality.py --report-only --out benchmarks/results/quality/round5 --section targets \
        --seeds 0 1 2 --variants limoe-e8e-bpe-postext open_clip dense-cls-bpe   # some of them
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "benchmarks"):  # launch.demo and friends; benchmarks/common.py
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from launch.demo import GRANULARITIES, build_data, evaluate, prepare_tokenizer, train  # noqa: E402 (light imports)
from launch.distributed import free_port  # noqa: E402
from limoe.config import MODALITIES  # noqa: E402
from limoe import files  # noqa: E402
from limoe.files import atomic_path, atomic_write  # noqa: E402

GENERATED_START = "<!-- generated:start -->"
GENERATED_END = "<!-- generated:end -->"


def markers(section: str) -> tuple[str, str]:
    """The markers around one generated section: the main one (`section` "") or a named one, so
    that one report can hold the tables of several result folders (one per round of runs)."""
    if not section:
        return GENERATED_START, GENERATED_END
    return f"<!-- generated:{section}:start -->", f"<!-- generated:{section}:end -->"

# -- the variants: every override each run adds to cpu-demo, spelled out ------------------------

# A variant is (what it tests, overrides of launch/configs/cpu-demo.yaml). The key "tokenizer"
# is not a config key: it names the variant's tokenizer (TOKENIZERS; default "sp1000", the
# demo's), trained or written once in the data folder and shared by every run that uses it.
TOKENIZERS = {
    "sp1000": "SentencePiece unigram, 1,000 pieces, trained on the Noto captions (the demo's)",
    "sp8000": "SentencePiece unigram asked for 8,000 pieces: the Noto captions give at most ~1.9k",
    "bpe": "open_clip's bundled BPE (49,408 tokens, ids shifted by one; nothing trained)",
    "spbpe8000": "SentencePiece BPE, 8,000 pieces, trained on the Noto captions (unlike unigram, BPE reaches "
                 "8,000 on them: 1,742 of the 1,826 words of the Twemoji names are one piece, against 458)",
}
BASE_TOKENIZER = "sp1000"  # the first demo's; variants built on LIMOE_SP name "sp8000"

# The limoe-nano defaults of the demo (cpu-demo.yaml + limoe/config.py), written out so a
# variant's row says everything: 4 full-width experts in blocks 1 and 3, k=1, capacity factor 1, BPR,
# V-MoE importance + load (0.005 per layer, summed over layers) for each modality.
BALANCE = {"importance": 0.005, "load": 0.005, "switch_load": 0.0, "local_entropy": 0.0, "global_entropy": 0.0,
           "zloss": 0.0}
ENTROPY_IMAGE = {**BALANCE, "local_entropy": 0.01}
ENTROPY_TEXT = {**BALANCE, "local_entropy": 0.01, "global_entropy": 0.05, "global_entropy_experts": 2.0}
NO_AUX = {k: 0.0 for k in BALANCE}
# Image pooling is pinned to MAP, limoe-nano's default when these rows were measured (the preset
# pools at a class token since; that is the "-cls" variants).
LIMOE = {
    "model.preset": "limoe-nano",
    "model.image_pool": "map",
    "model.moe.num_experts": 4,
    "model.moe.k": 1,
    "model.moe.capacity_factor": 1.0,
    "model.moe.batch_priority_routing": True,
    # MoE in blocks 1 and 3, full-width experts, no shared expert (limoe-nano's since round 22:
    # blocks 2 and 3, 16 experts 256 wide beside a shared expert of 256; that is "-last2-shared").
    "model.moe.placement": "every 2",
    "model.moe.expert_mlp_dim": 0,
    "model.moe.shared_expert_mlp_dim": 0,
    "model.moe.image": BALANCE,
    "model.moe.text": BALANCE,
    "data.caption_positives": False,  # the demo's config sets "text" since round 11
    "model.init": "torch",  # limoe-nano has xavier since round 13
    "model.pre_norm": [],  # and the image's LayerNorm before the blocks since round 14
    "data.augment": True,  # crops of 70-100 %: the demo's config augments more since round 17
}
DENSE = {"model.preset": "limoe-nano-dense", "model.image_pool": "map", "data.caption_positives": False,
         "model.init": "torch", "model.pre_norm": [], "data.augment": True}
PEER = {"model.preset": "open_clip-nano", "tokenizer": "bpe", "data.caption_positives": False, "data.augment": True}
LIMOE_SP = {**LIMOE, "tokenizer": "sp8000"}
LIMOE_CLS = {**LIMOE_SP, "model.image_pool": "cls"}  # the demo's default in rounds 3-5
LIMOE_E8E = {**LIMOE_CLS, "model.moe.num_experts": 8, "model.moe.image": ENTROPY_IMAGE,
             "model.moe.text": ENTROPY_TEXT}  # the demo's model since round 5 (with open_clip's BPE since round 8)
# The round-11 default and its dense twin (caption positives on the caption side, open_clip's BPE).
LIMOE_POSTEXT = {**LIMOE_E8E, "tokenizer": "bpe", "data.caption_positives": "text"}
DENSE_POSTEXT = {**DENSE, "model.image_pool": "cls", "tokenizer": "bpe", "data.caption_positives": "text"}
# The round-13 default (xavier initialisation) and its dense twin.
LIMOE_XAVIER = {**LIMOE_POSTEXT, "model.init": "xavier"}
DENSE_XAVIER = {**DENSE_POSTEXT, "model.init": "xavier"}
# The round-14 default (a LayerNorm on the embedded image sequence).
LIMOE_LNPRE = {**LIMOE_XAVIER, "model.pre_norm": ["image"]}
DENSE_LNPRE = {**DENSE_XAVIER, "model.pre_norm": ["image"]}
PEER_SP = {"model.preset": "open_clip-nano", "model.text_pool": "eos", "model.eos_id": 2,
           "data.caption_positives": False, "data.augment": True}

# The round-14 default and its dense twin, the base of the with_dense_twin pairs and the comparisons of
# rounds 15-17.
ROUND14_LIMOE, ROUND14_DENSE = "limoe-e8e-bpe-postext-xavier-lnpre", "dense-cls-bpe-postext-xavier-lnpre"
# Round 17's stronger augmentation (limoe.transforms.AugmentConfig fields).
STRONG_AUGMENT = {"scale_min": 0.5, "color_jitter": 0.2}
AUG_WHAT = ("random crops of 50-100 % of the image's area and brightness / contrast / saturation jitter 0.2 "
            "(the default: 70-100 %, no jitter)")
# Round 18: further along the same line, on the round-17 default.
STRONGER_AUGMENT = {"scale_min": 0.35, "color_jitter": 0.3}
AUG2_WHAT = ("still stronger augmentation: random crops of 35-100 % of the image's area and brightness / contrast / "
             "saturation jitter 0.3 (the round-17 default: 50-100 %, 0.2)")

# The round-17 default (the demo's model since), the base of round 19's variants.
ROUND17_LIMOE, ROUND17_DENSE = f"{ROUND14_LIMOE}-aug", f"{ROUND14_DENSE}-aug"
LIMOE_AUG = {**LIMOE_LNPRE, "data.augment": STRONG_AUGMENT}
DENSE_AUG = {**DENSE_LNPRE, "data.augment": STRONG_AUGMENT}  # with_dense_twin("aug") builds the same
PEER_POSTEXT_AUG = {**PEER, "data.caption_positives": "text", "data.augment": STRONG_AUGMENT}

# Round 20: half the width (the experts, and each tower of the peer, likewise); embed_dim stays 128.
W64 = {"model.width": 64, "model.heads": 2, "model.mlp_dim": 256}
W64_WHAT = "width 64, 2 heads of 32, MLPs and experts 256 wide (limoe-nano: 128, 4, 512)"

# Round 19's expert layouts, on their own (rounds 19-22) and together (round 22).
LAST2 = {"model.moe.placement": "last 2"}  # V-MoE's "last n": blocks 2 and 3 of 4
SHARED = {"model.moe.num_experts": 16, "model.moe.expert_mlp_dim": 256, "model.moe.shared_expert_mlp_dim": 256}

# The round-22 default (the demo's model since): round 17's with both of round 19's expert layouts.
# Its dense twin is round 17's (a dense model has no expert layout).
ROUND22_LIMOE = f"{ROUND17_LIMOE}-last2-shared"
LIMOE_ROUND22 = {**LIMOE_AUG, **LAST2, **SHARED}

# Round 24: the moving average's decay. Its horizon, 1 / (1 - decay) = 200 steps, is the last fifth
# of the demo's 935, where the cosine schedule has fallen below 14 % of the peak learning rate.
EMA_DECAY = 0.995


def with_dense_twin(suffix: str, what: str, overrides: dict) -> dict:
    """A change to the round-14 default and the same change to its dense twin, as two variants
    (`limoe-e8e-bpe-postext-xavier-lnpre-SUFFIX`, `dense-cls-bpe-postext-xavier-lnpre-SUFFIX`)."""
    return {f"{ROUND14_LIMOE}-{suffix}": (f"{ROUND14_LIMOE} with {what}", {**LIMOE_LNPRE, **overrides}),
            f"{ROUND14_DENSE}-{suffix}": (f"{ROUND14_DENSE} with {what} (the dense twin of {ROUND14_LIMOE}-{suffix})",
                                          {**DENSE_LNPRE, **overrides})}


VARIANTS: dict[str, tuple[str, dict]] = {
    # The three models of the first comparison, with the first demo's settings (SentencePiece 1k).
    "limoe": ("LIMoE as the first demo trained it: limoe-nano, 4 experts, SentencePiece 1k", LIMOE),
    "dense": ("dense twin (limoe-nano-dense): one shared tower, one MLP where the experts were", DENSE),
    "open_clip": ("the peer: open_clip's two-tower CLIP (open_clip-nano), open_clip's BPE", PEER),
    # Tokenizer.
    "open_clip-sp1000": ("the peer with LIMoE's SentencePiece 1k (pooling at its end token)", PEER_SP),
    "limoe-sp8000": ("limoe with the largest SentencePiece the captions give (~1.9k pieces)",
                     {**LIMOE, "tokenizer": "sp8000"}),
    "limoe-bpe": ("limoe with open_clip's BPE", {**LIMOE, "tokenizer": "bpe"}),
    "dense-bpe": ("dense twin with open_clip's BPE: one shared tower vs the peer's two", {**DENSE, "tokenizer": "bpe"}),
    # Pooling.
    "limoe-mean": ("limoe, image pooling by the mean of the patches instead of MAP", {**LIMOE, "model.image_pool": "mean"}),
    "limoe-cls": ("limoe, image pooling at a class token (as the peer's ViT)", {**LIMOE, "model.image_pool": "cls"}),
    "limoe-textmap": ("limoe, text pooling by MAP instead of the end token", {**LIMOE, "model.text_pool": "map"}),
    # Temperature, captions, schedule.
    "limoe-t14": ("limoe, initial temperature 1/0.07 = 14.3 (open_clip's) instead of 30",
                  {**LIMOE, "model.logit_scale_init": 2.6593}),
    "limoe-random-captions": ("limoe, each sample's caption drawn uniformly (no per-batch unique caption)",
                              {**LIMOE, "data.unique_captions": False}),
    "limoe-lr2e-3": ("limoe, peak learning rate 2e-3 instead of 1e-3", {**LIMOE, "optimizer.lr": 2e-3}),
    "limoe-lr5e-4": ("limoe, peak learning rate 5e-4 instead of 1e-3", {**LIMOE, "optimizer.lr": 5e-4}),
    # Experts.
    "limoe-e8": ("limoe, 8 experts", {**LIMOE, "model.moe.num_experts": 8}),
    "limoe-e16": ("limoe, 16 experts", {**LIMOE, "model.moe.num_experts": 16}),
    "limoe-every1": ("limoe, an MoE MLP in every block (4 MoE layers) instead of every other",
                     {**LIMOE, "model.moe.placement": "every 1"}),
    "limoe-k2": ("limoe, top-2 routing (more FLOPs per token: not equal compute)", {**LIMOE, "model.moe.k": 2}),
    "limoe-cf1.25": ("limoe, capacity factor 1.25", {**LIMOE, "model.moe.capacity_factor": 1.25}),
    # Auxiliary losses (summed over MoE layers).
    "limoe-no-aux": ("limoe without any auxiliary loss", {**LIMOE, "model.moe.image": NO_AUX, "model.moe.text": NO_AUX}),
    "limoe-entropy": ("limoe plus LIMoE's entropy losses (local 0.01; text global 0.05, S_text = 2)",
                      {**LIMOE, "model.moe.image": ENTROPY_IMAGE, "model.moe.text": ENTROPY_TEXT}),
    "limoe-no-bpr": ("limoe without Batch Priority Routing", {**LIMOE, "model.moe.batch_priority_routing": False}),
    # Round 2: around the best tokenizer of round 1 (the largest SentencePiece, ~1.9k pieces).
    "dense-sp8000": ("dense twin with the largest SentencePiece", {**DENSE, "tokenizer": "sp8000"}),
    "open_clip-sp8000": ("the peer with LIMoE's largest SentencePiece (pooling at its end token)",
                         {**PEER_SP, "tokenizer": "sp8000"}),
    "limoe-sp8000-e8": ("limoe-sp8000 with 8 experts", {**LIMOE_SP, "model.moe.num_experts": 8}),
    "limoe-sp8000-e16": ("limoe-sp8000 with 16 experts", {**LIMOE_SP, "model.moe.num_experts": 16}),
    "limoe-sp8000-every1": ("limoe-sp8000 with an MoE MLP in every block (4 MoE layers)",
                            {**LIMOE_SP, "model.moe.placement": "every 1"}),
    "limoe-sp8000-e8-every1": ("limoe-sp8000 with 8 experts in every block",
                               {**LIMOE_SP, "model.moe.num_experts": 8, "model.moe.placement": "every 1"}),
    "limoe-sp8000-cf2": ("limoe-sp8000 at training capacity factor 2 (almost nothing dropped; the experts' buffers "
                         "are twice the tokens, so not equal compute)", {**LIMOE_SP, "model.moe.capacity_factor": 2.0}),
    "limoe-sp8000-no-aux": ("limoe-sp8000 without any auxiliary loss",
                            {**LIMOE_SP, "model.moe.image": NO_AUX, "model.moe.text": NO_AUX}),
    "limoe-sp8000-entropy": ("limoe-sp8000 plus LIMoE's entropy losses (local 0.01; text global 0.05, S_text = 2)",
                             {**LIMOE_SP, "model.moe.image": ENTROPY_IMAGE, "model.moe.text": ENTROPY_TEXT}),
    "limoe-sp8000-no-bpr": ("limoe-sp8000 without Batch Priority Routing",
                            {**LIMOE_SP, "model.moe.batch_priority_routing": False}),
    "limoe-sp8000-lr2e-3": ("limoe-sp8000, peak learning rate 2e-3 instead of 1e-3",
                            {**LIMOE_SP, "optimizer.lr": 2e-3}),
    "limoe-sp8000-aug": ("limoe-sp8000 with stronger augmentation: crops of 50-100% of the image and colour "
                         "jitter 0.2 (instead of 70-100%, no jitter)",
                         {**LIMOE_SP, "data.augment": {"scale_min": 0.5, "color_jitter": 0.2}}),
    "limoe-sp8000-cls": ("limoe-sp8000, image pooling at a class token instead of MAP: the demo's default in rounds 3-5",
                         LIMOE_CLS),
    "dense-sp8000-cls": ("dense twin of the demo's default of rounds 3-7: the largest SentencePiece, a class token",
                         {**DENSE, "tokenizer": "sp8000", "model.image_pool": "cls"}),
    "limoe-sp8000-mean": ("limoe-sp8000, image pooling by the mean of the patches instead of MAP",
                          {**LIMOE_SP, "model.image_pool": "mean"}),
    "limoe-sp8000-textmap": ("limoe-sp8000, text pooling by MAP instead of the end token",
                             {**LIMOE_SP, "model.text_pool": "map"}),
    "limoe-sp8000-random-captions": ("limoe-sp8000, each sample's caption drawn uniformly (no per-batch unique caption)",
                                     {**LIMOE_SP, "data.unique_captions": False}),
    "limoe-sp8000-t50": ("limoe-sp8000, initial temperature 50 instead of 30",
                         {**LIMOE_SP, "model.logit_scale_init": 3.9120}),
    # On the class-token default (LIMOE_CLS):
    "limoe-sp8000-cls-lr5e-4": ("limoe-sp8000-cls, peak learning rate 5e-4 instead of 1e-3",
                                {**LIMOE_CLS, "optimizer.lr": 5e-4}),
    "limoe-sp8000-cls-warmup5": ("limoe-sp8000-cls, warmup over 5% of the steps (46) instead of 10%",
                                 {**LIMOE_CLS, "schedule.warmup": 46}),
    "limoe-sp8000-cls-warmup25": ("limoe-sp8000-cls, warmup over 25% of the steps (233) instead of 10%",
                                  {**LIMOE_CLS, "schedule.warmup": 233}),
    "limoe-sp8000-cls-siglip": ("limoe-sp8000-cls with the sigmoid loss (SigLIP: temperature 10, bias -10) "
                                "instead of softmax InfoNCE",
                                {**LIMOE_CLS, "model.loss": "siglip", "model.logit_scale_init": 2.3026}),
    "limoe-sp8000-cls-e8": ("limoe-sp8000-cls with 8 experts (more parameters, the same FLOPs)",
                            {**LIMOE_CLS, "model.moe.num_experts": 8}),
    "limoe-sp8000-cls-wd0.5": ("limoe-sp8000-cls, weight decay 0.5 instead of 0.1",
                               {**LIMOE_CLS, "optimizer.wd": 0.5}),
    "limoe-sp8000-cls-bpe": ("limoe-sp8000-cls with open_clip's BPE instead of SentencePiece",
                             {**LIMOE_CLS, "tokenizer": "bpe"}),
    "limoe-sp8000-cls-e8-bpe": ("limoe-sp8000-cls with 8 experts and open_clip's BPE",
                                {**LIMOE_CLS, "tokenizer": "bpe", "model.moe.num_experts": 8}),
    # Round 5: keep 8 experts' name-level gain without losing text to capacity.
    "limoe-sp8000-cls-e8-cf1.25": ("limoe-sp8000-cls-e8 at training capacity factor 1.25 (expert buffers 1.25x "
                                   "the tokens, so up to 1.25x the MoE layers' MLP FLOPs)",
                                   {**LIMOE_CLS, "model.moe.num_experts": 8, "model.moe.capacity_factor": 1.25}),
    "limoe-sp8000-cls-e8-entropy": ("limoe-sp8000-cls-e8 plus LIMoE's entropy losses (local 0.01; text global "
                                    "0.05, S_text = 2): the demo's default in rounds 5-7", LIMOE_E8E),
    # Round 5: whole words as single pieces without open_clip's 49k-token table.
    "limoe-sp8000-cls-spbpe8000": ("limoe-sp8000-cls with SentencePiece BPE (8,000 pieces) instead of unigram "
                                   "(~1.9k)", {**LIMOE_CLS, "tokenizer": "spbpe8000"}),
    "limoe-sp8000-cls-e8-spbpe8000": ("limoe-sp8000-cls with 8 experts and SentencePiece BPE (8,000 pieces)",
                                      {**LIMOE_CLS, "tokenizer": "spbpe8000", "model.moe.num_experts": 8}),
    "dense-sp8000-cls-spbpe8000": ("dense-sp8000-cls with SentencePiece BPE (8,000 pieces)",
                                   {**DENSE, "model.image_pool": "cls", "tokenizer": "spbpe8000"}),
    "open_clip-spbpe8000": ("the peer with SentencePiece BPE (8,000 pieces; pooling at its end token)",
                            {**PEER_SP, "tokenizer": "spbpe8000"}),
    "limoe-sp8000-cls-last2": ("limoe-sp8000-cls with its 2 MoE layers in the last two blocks (2, 3; V-MoE's "
                               "\"last n\") instead of blocks 1 and 3", {**LIMOE_CLS, "model.moe.placement": "last 2"}),
    # Round 6: k = 2 at equal FLOPs, with experts of half the MLP width ("fine-grained" experts).
    "limoe-sp8000-cls-e8k2": ("limoe-sp8000-cls with 8 experts of half width (256) and top-2 routing: the same "
                              "expert weights and FLOPs as 4 full experts at k = 1",
                              {**LIMOE_CLS, "model.moe.num_experts": 8, "model.moe.k": 2,
                               "model.moe.expert_mlp_dim": 256}),
    "limoe-sp8000-cls-e16k2": ("limoe-sp8000-cls with 16 experts of half width (256) and top-2 routing: the same "
                               "expert weights and FLOPs as 8 full experts at k = 1",
                               {**LIMOE_CLS, "model.moe.num_experts": 16, "model.moe.k": 2,
                                "model.moe.expert_mlp_dim": 256}),
    # Round 8: whole-word pieces for the names, with sub-word pieces still seen in training.
    "limoe-e8e-spbpe8000": ("the round-5 default (limoe-sp8000-cls-e8-entropy) with SentencePiece BPE "
                            "(8,000 pieces)", {**LIMOE_E8E, "tokenizer": "spbpe8000"}),
    "limoe-e8e-spbpe8000-drop0.1": ("limoe-e8e-spbpe8000 with BPE-dropout 0.1 in training (each merge skipped "
                                    "with probability 0.1: whole words, and their pieces now and then)",
                                    {**LIMOE_E8E, "tokenizer": "spbpe8000", "data.subword_sampling": 0.1}),
    "limoe-e8e-bpe": ("the round-5 default with open_clip's BPE (the peer's tokenizer): the demo's default in "
                      "rounds 8-10",
                      {**LIMOE_E8E, "tokenizer": "bpe"}),
    "dense-cls-bpe": ("dense twin of limoe-e8e-bpe: one shared tower, one MLP where the experts were, a class "
                      "token, open_clip's BPE", {**DENSE, "model.image_pool": "cls", "tokenizer": "bpe"}),
    "limoe-e16e": ("the round-5 default with 16 experts instead of 8 (more parameters, the same FLOPs)",
                   {**LIMOE_E8E, "model.moe.num_experts": 16}),
    "limoe-e16k2e": ("the round-5 default with 16 experts of half width (256) and top-2 routing (the same FLOPs "
                     "and expert weights as 8 full experts at k = 1)",
                     {**LIMOE_E8E, "model.moe.num_experts": 16, "model.moe.k": 2, "model.moe.expert_mlp_dim": 256}),
    "limoe-e8e-sample0.2": ("the round-5 default with unigram subword sampling in training (alpha 0.2, all "
                            "segmentations)", {**LIMOE_E8E, "data.subword_sampling": 0.2}),
    # Round 9: the text tokens take the expert slots before the image patches (BPR within each).
    "limoe-e8e-bpe-textfirst": ("limoe-e8e-bpe with the text tokens first to the expert slots "
                                "(`moe.priority_modality: text`; the same capacity and FLOPs)",
                                {**LIMOE_E8E, "tokenizer": "bpe", "model.moe.priority_modality": "text"}),
    # Round 10: the text gets its own copy of parts of each block (the same FLOPs; the experts stay shared).
    "limoe-e8e-bpe-textnorms": ("limoe-e8e-bpe with the text's own LayerNorms in every block "
                                "(`modality_specific: [norms]`)",
                                {**LIMOE_E8E, "tokenizer": "bpe", "model.modality_specific": ["norms"]}),
    "limoe-e8e-bpe-textattn": ("limoe-e8e-bpe with the text's own LayerNorms and attention in every block "
                               "(`modality_specific: [norms, attention]`; only the MLPs and experts shared)",
                               {**LIMOE_E8E, "tokenizer": "bpe", "model.modality_specific": ["norms", "attention"]}),
    # Round 11: a caption drawn for one sample is a positive of every image of the batch that has it.
    "limoe-e8e-bpe-pos": ("limoe-e8e-bpe with caption positives (`data.caption_positives`: a class caption "
                          "drawn for one sample is a positive of every image in the batch that has it)",
                          {**LIMOE_E8E, "tokenizer": "bpe", "data.caption_positives": True}),
    "limoe-e8e-bpe-postext": ("limoe-e8e-bpe with caption positives on the caption side only "
                              "(`data.caption_positives: text`: a caption's target spread over the images that "
                              "have it; an image's stays on its own caption, its other captions out of its softmax)",
                              LIMOE_POSTEXT),
    "open_clip-pos": ("the open_clip peer with caption positives (`data.caption_positives`)",
                      {**PEER, "data.caption_positives": True}),
    "open_clip-postext": ("the open_clip peer with caption positives on the caption side "
                          "(`data.caption_positives: text`)", {**PEER, "data.caption_positives": "text"}),
    "dense-cls-bpe-postext": ("dense-cls-bpe with caption positives on the caption side "
                              "(`data.caption_positives: text`)",
                              DENSE_POSTEXT),
    # Round 12: experts in every block instead of every other one (twice the expert parameters, the same FLOPs).
    "limoe-e8e-bpe-postext-all": ("limoe-e8e-bpe-postext with MoE layers in all 4 blocks (`moe.placement: every 1`) "
                                  "instead of blocks 1 and 3: twice the expert parameters, the same FLOPs per pair",
                                  {**LIMOE_POSTEXT, "model.moe.placement": "every 1"}),
    # Round 13: the text's own MLP in the dense blocks (0 and 2); the experts stay shared, the same FLOPs.
    "limoe-e8e-bpe-postext-textmlp": ("limoe-e8e-bpe-postext with the text's own MLP in the 2 dense blocks "
                                      "(`modality_specific: [mlp]`; the experts stay shared, 263k more parameters, "
                                      "the same FLOPs per pair)",
                                      {**LIMOE_POSTEXT, "model.modality_specific": ["mlp"]}),
    "limoe-e8e-bpe-postext-textdense": ("limoe-e8e-bpe-postext with the text's own norms and attention in every "
                                        "block and its own MLP in the dense blocks (`modality_specific: [norms, "
                                        "attention, mlp]`: two towers but for the shared experts; the same FLOPs)",
                                        {**LIMOE_POSTEXT, "model.modality_specific": ["norms", "attention", "mlp"]}),
    # Round 13: big_vision's ViT initialisation, the one LIMoE trained with.
    "limoe-e8e-bpe-postext-xavier": ("limoe-e8e-bpe-postext with the blocks' Linear weights xavier-uniform and "
                                     "zero biases (`init: xavier`, big_vision's ViT and LIMoE's) instead of "
                                     "PyTorch's default: the demo's default in round 13",
                                     LIMOE_XAVIER),
    "dense-cls-bpe-postext-xavier": ("dense-cls-bpe-postext with `init: xavier` (the dense twin of "
                                     "limoe-e8e-bpe-postext-xavier)",
                                     DENSE_XAVIER),
    # Round 14: two things the open_clip peer has and LIMoE lacks.
    "limoe-e8e-bpe-postext-xavier-lnpre": ("limoe-e8e-bpe-postext-xavier with a LayerNorm on the embedded image "
                                           "sequence before the first block (`pre_norm: [image]`, open_clip's "
                                           "`ln_pre`; 256 more parameters, the same FLOPs per pair): the demo's "
                                           "default since round 14",
                                           LIMOE_LNPRE),
    "dense-cls-bpe-postext-xavier-lnpre": ("dense-cls-bpe-postext-xavier with `pre_norm: [image]` (the dense twin "
                                           "of limoe-e8e-bpe-postext-xavier-lnpre)",
                                           DENSE_LNPRE),
    "limoe-e8e-bpe-postext-xavier-lnpreboth": ("limoe-e8e-bpe-postext-xavier with a LayerNorm on each modality's "
                                               "embedded sequence before the first block (`pre_norm: [image, "
                                               "text]`; 512 more parameters, the same FLOPs per pair)",
                                               {**LIMOE_XAVIER, "model.pre_norm": ["image", "text"]}),
    "limoe-e8e-bpe-postext-xavier-lnpre-stgate": ("limoe-e8e-bpe-postext-xavier-lnpre with straight-through gates "
                                                  "(`moe.straight_through_gates`: a kept token's expert output "
                                                  "enters at weight 1, as the dense twin's MLP, the router "
                                                  "trained by the gradient of its probability; the same "
                                                  "parameters and FLOPs per pair)",
                                                  {**LIMOE_LNPRE, "model.moe.straight_through_gates": True}),
    "limoe-e8e-bpe-postext-xavier-lnpre-noise0.25": ("limoe-e8e-bpe-postext-xavier-lnpre with a quarter of V-MoE's "
                                                     "router noise in training (`moe.noise_std: 0.25`, sigma "
                                                     "1/32 instead of 1/8; the same parameters and FLOPs per "
                                                     "pair)",
                                                     {**LIMOE_LNPRE, "model.moe.noise_std": 0.25}),
    "limoe-e8e-bpe-postext-xavier-lnpre-textlocal0.05": ("limoe-e8e-bpe-postext-xavier-lnpre with 5x the local "
                                                         "entropy loss on the text (`moe.text.local_entropy: "
                                                         "0.05`), to sharpen the text's near-uniform routing",
                                                         {**LIMOE_LNPRE,
                                                          "model.moe.text": {**ENTROPY_TEXT, "local_entropy": 0.05}}),
    "limoe-e8e-bpe-postext-xavier-lnpre-e16": ("limoe-e8e-bpe-postext-xavier-lnpre with 16 experts instead of 8 "
                                               "(more parameters, the same FLOPs per pair)",
                                               {**LIMOE_LNPRE, "model.moe.num_experts": 16}),
    # Round 16: dropout, for a model that sees each of its 1,911 training images about 63 times.
    **with_dense_twin("drop0.1", "dropout 0.1 on the hidden activations of every MLP (`mlp_dropout: 0.1`)",
                      {"model.mlp_dropout": 0.1}),
    "limoe-e8e-bpe-postext-xavier-lnpre-edrop0.2": ("limoe-e8e-bpe-postext-xavier-lnpre with dropout 0.2 on the "
                                                    "experts' hidden activations only (`moe.expert_dropout: 0.2`, "
                                                    "Switch Transformer's expert dropout; dense MLPs none)",
                                                    {**LIMOE_LNPRE, "model.moe.expert_dropout": 0.2}),
    "limoe-e8e-bpe-postext-xavier-lnpre-dropless": ("limoe-e8e-bpe-postext-xavier-lnpre trained without a capacity "
                                                    "(`moe.train_dropless`: every route reaches its expert, as in "
                                                    "eval; the default drops about 9 % of patches and 30 % of text "
                                                    "in training; the same parameters and FLOPs per pair)",
                                                    {**LIMOE_LNPRE, "model.moe.train_dropless": True}),
    # Round 17: more distinct training images (round 16's half budget hinted that the experts need
    # more distinct data than 1,911 images seen ~63 times each).
    **with_dense_twin("aug", f"stronger augmentation: {AUG_WHAT}", {"data.augment": STRONG_AUGMENT}),
    "open_clip-aug": (f"the open_clip peer with stronger augmentation: {AUG_WHAT}",
                      {**PEER, "data.augment": STRONG_AUGMENT}),
    "open_clip-postext-aug": (f"the open_clip peer with caption positives on the caption side and stronger "
                              f"augmentation: {AUG_WHAT}",
                              PEER_POSTEXT_AUG),
    **with_dense_twin("aug2", AUG2_WHAT, {"data.augment": STRONGER_AUGMENT}),
    # Round 19: the experts' shape on the round-17 default: two hypotheses of the issue's list measured
    # on old bases with one seed only (rounds 6-7), finer experts at k = 2 and V-MoE's placement, and
    # DeepSeekMoE's shared expert (a dense MLP beside the experts carries what every token needs).
    f"{ROUND17_LIMOE}-e16k2": (f"{ROUND17_LIMOE} with 16 experts of half width (256) and top-2 routing: the same "
                               "expert weights and FLOPs per pair as 8 full experts at k = 1",
                               {**LIMOE_AUG, "model.moe.num_experts": 16, "model.moe.k": 2,
                                "model.moe.expert_mlp_dim": 256}),
    f"{ROUND17_LIMOE}-last2": (f"{ROUND17_LIMOE} with its 2 MoE layers in the last two blocks (2, 3; V-MoE's "
                               "\"last n\") instead of blocks 1 and 3", {**LIMOE_AUG, **LAST2}),
    f"{ROUND17_LIMOE}-shared": (f"{ROUND17_LIMOE} with a shared expert (`moe.shared_expert_mlp_dim: 256`, "
                                "DeepSeekMoE's: a dense MLP every token passes through beside the experts) and 16 "
                                "experts of half width (256) at k = 1: the same expert weights and FLOPs per pair",
                                {**LIMOE_AUG, **SHARED}),
    # Round 22: the two round-19 changes that each gained where the other lost (the last two blocks:
    # by name and category; the shared expert: by subcategory and category), together.
    f"{ROUND17_LIMOE}-last2-shared": (f"{ROUND17_LIMOE} with its MoE layers in the last two blocks (2, 3) and "
                                      "in each a shared expert (256 wide) beside 16 half-width experts at k = 1: "
                                      "the -last2 and -shared changes together, the same FLOPs per pair",
                                      LIMOE_ROUND22),
    # Round 23: DeepSeekMoE's other half on the round-22 default, finer experts at a higher k: 32
    # experts of 128 at k = 2 beside the same shared expert (the same expert parameters and FLOPs).
    f"{ROUND22_LIMOE}-e32k2": (f"{ROUND22_LIMOE} with 32 experts of a quarter width (128) at k = 2 beside the "
                               "same 256-wide shared expert: the same expert parameters, the same FLOPs per pair but for "
                               "the router over 32 experts (0.5 % more)",
                               {**LIMOE_ROUND22, "model.moe.num_experts": 32, "model.moe.k": 2,
                                "model.moe.expert_mlp_dim": 128}),
    # Round 24: an exponential moving average of the weights (train.ema_decay), exported and evaluated
    # in their place; training itself is unchanged (a seed's raw weights are the default's).
    f"{ROUND22_LIMOE}-ema": (f"{ROUND22_LIMOE} exported as the moving average of its weights (`train.ema_decay: "
                             f"{EMA_DECAY}`, about the last {round(1 / (1 - EMA_DECAY))} steps)",
                             {**LIMOE_ROUND22, "train.ema_decay": EMA_DECAY}),
    f"{ROUND17_DENSE}-ema": (f"{ROUND17_DENSE} exported as the moving average of its weights (`train.ema_decay: "
                             f"{EMA_DECAY}`; the dense twin of {ROUND22_LIMOE}-ema)",
                             {**DENSE_AUG, "train.ema_decay": EMA_DECAY}),
    # Round 20: the same three models at half the width, where the data is larger against the model.
    f"{ROUND17_LIMOE}-w64": (f"{ROUND17_LIMOE} at half the width: {W64_WHAT}", {**LIMOE_AUG, **W64}),
    f"{ROUND17_DENSE}-w64": (f"{ROUND17_DENSE} at half the width (the dense twin of {ROUND17_LIMOE}-w64): {W64_WHAT}",
                             {**DENSE_AUG, **W64}),
    "open_clip-postext-aug-w64": (f"open_clip-postext-aug at half the width (the peer trained as "
                                  f"{ROUND17_LIMOE}-w64): {W64_WHAT}, each tower",
                                  {**PEER_POSTEXT_AUG, **W64}),
    "limoe-e8e-bpe-postext-scaledinit": ("limoe-e8e-bpe-postext with open_clip's text-tower initialisation "
                                         "(`init: scaled_normal`: normal weights, the ones writing to the residual "
                                         "stream scaled down by sqrt(2 x depth)) instead of xavier",
                                         {**LIMOE_POSTEXT, "model.init": "scaled_normal"}),
}
# The demo's LIMoE (its default tokenizer and pooling), its dense twin with the same, and the peer.
DEFAULT_VARIANTS = (ROUND22_LIMOE, ROUND17_DENSE, "open_clip-aug")


def variant_tokenizer(variant: str) -> str:
    return VARIANTS[variant][1].get("tokenizer", BASE_TOKENIZER)


def variant_config(variant: str) -> dict:
    """The variant's config overrides (the "tokenizer" entry is not one)."""
    return {k: v for k, v in VARIANTS[variant][1].items() if k != "tokenizer"}


# The defaults variants are compared with, by the round that made them the default: (LIMoE, dense twin).
DEFAULTS_BY_ROUND = {14: (ROUND14_LIMOE, ROUND14_DENSE), 17: (ROUND17_LIMOE, ROUND17_DENSE),
                     22: (ROUND22_LIMOE, ROUND17_DENSE)}


def vs_default(what: str, variant: str, round_: int = 14) -> list[tuple]:
    """The two comparisons of a variant: against the round-`round_` default (with drop rates) and
    against that default's dense twin (rounds 15-16 against round 14's, round 19 against round 17's)."""
    limoe, dense = DEFAULTS_BY_ROUND[round_]
    return [(f"{what} (round-{round_} default)", variant, limoe,
             TOP1 + ["routing/text/drop_rate", "routing/image/drop_rate"]),
            (f"{what} vs the dense twin", variant, dense, TOP1)]


def twin_contrasts(what: str, suffix: str, base: str = "") -> list[tuple]:
    """A with_dense_twin pair's comparisons: the dense twin with the change against the dense twin
    without it, and LIMoE against its dense twin, both with the change. `base`: the suffix of the
    pair the change was measured against ("" = the round-14 default's dense twin itself)."""
    dense_base = f"{ROUND14_DENSE}-{base}" if base else ROUND14_DENSE
    return [(f"{what}, the dense twin", f"{ROUND14_DENSE}-{suffix}", dense_base, TOP1),
            (f"{what}: LIMoE vs its dense twin", f"{ROUND14_LIMOE}-{suffix}", f"{ROUND14_DENSE}-{suffix}", TOP1)]


# Seed-paired differences (first minus second).
TOP1 = [f"zeroshot/{g}/top1" for g in GRANULARITIES]
CONTRASTS = [
    ("LIMoE vs the open_clip peer", "limoe", "open_clip", TOP1),
    ("LIMoE vs its dense twin", "limoe", "dense", TOP1),
    ("one shared tower vs two (dense, BPE)", "dense-bpe", "open_clip", TOP1),
    ("tokenizer: the peer", "open_clip-sp1000", "open_clip", TOP1),
    ("tokenizer: LIMoE", "limoe-sp8000", "limoe", TOP1),
    ("tokenizer: LIMoE", "limoe-bpe", "limoe", TOP1),
    ("pooling", "limoe-mean", "limoe", TOP1),
    ("pooling", "limoe-cls", "limoe", TOP1),
    ("pooling", "limoe-textmap", "limoe", TOP1),
    ("temperature", "limoe-t14", "limoe", TOP1),
    ("captions", "limoe-random-captions", "limoe", TOP1),
    ("learning rate", "limoe-lr2e-3", "limoe", TOP1),
    ("learning rate", "limoe-lr5e-4", "limoe", TOP1),
    ("experts", "limoe-e8", "limoe", TOP1),
    ("experts", "limoe-e16", "limoe", TOP1),
    ("experts", "limoe-every1", "limoe", TOP1),
    ("experts", "limoe-k2", "limoe", TOP1),
    ("experts", "limoe-cf1.25", "limoe", TOP1),
    ("routing losses", "limoe-no-aux", "limoe",
     TOP1 + ["routing/text/busiest_expert_share", "routing/text/drop_rate"]),
    ("routing losses", "limoe-entropy", "limoe",
     TOP1 + ["routing/text/busiest_expert_share", "routing/text/drop_rate"]),
    ("routing losses", "limoe-no-bpr", "limoe", TOP1 + ["routing/text/drop_rate"]),
    # Round 2, against limoe-sp8000.
    ("LIMoE (SentencePiece ~1.9k) vs the open_clip peer", "limoe-sp8000", "open_clip", TOP1),
    ("LIMoE (SentencePiece ~1.9k) vs its dense twin", "limoe-sp8000", "dense-sp8000", TOP1),
    ("LIMoE vs the peer, both with SentencePiece ~1.9k", "limoe-sp8000", "open_clip-sp8000", TOP1),
    ("experts (sp8000)", "limoe-sp8000-e8", "limoe-sp8000", TOP1),
    ("experts (sp8000)", "limoe-sp8000-e16", "limoe-sp8000", TOP1),
    ("experts (sp8000)", "limoe-sp8000-every1", "limoe-sp8000", TOP1),
    ("experts (sp8000)", "limoe-sp8000-e8-every1", "limoe-sp8000", TOP1),
    ("experts (sp8000)", "limoe-sp8000-cf2", "limoe-sp8000", TOP1 + ["routing/text/drop_rate"]),
    ("temperature (sp8000)", "limoe-sp8000-t50", "limoe-sp8000", TOP1),
    ("pooling (sp8000)", "limoe-sp8000-cls", "limoe-sp8000", TOP1),
    ("pooling (sp8000)", "limoe-sp8000-mean", "limoe-sp8000", TOP1),
    ("pooling (sp8000)", "limoe-sp8000-textmap", "limoe-sp8000", TOP1),
    ("captions (sp8000)", "limoe-sp8000-random-captions", "limoe-sp8000", TOP1),
    ("learning rate (sp8000)", "limoe-sp8000-lr2e-3", "limoe-sp8000", TOP1),
    ("augmentation (sp8000)", "limoe-sp8000-aug", "limoe-sp8000", TOP1),
    ("routing losses (sp8000)", "limoe-sp8000-no-aux", "limoe-sp8000",
     TOP1 + ["routing/text/busiest_expert_share", "routing/text/drop_rate"]),
    ("routing losses (sp8000)", "limoe-sp8000-entropy", "limoe-sp8000",
     TOP1 + ["routing/text/busiest_expert_share", "routing/text/drop_rate"]),
    ("routing losses (sp8000)", "limoe-sp8000-no-bpr", "limoe-sp8000", TOP1 + ["routing/text/drop_rate"]),
    # Round 3: the demo's default now pools images at a class token.
    ("LIMoE (class token) vs the open_clip peer", "limoe-sp8000-cls", "open_clip", TOP1),
    ("LIMoE (class token) vs its dense twin", "limoe-sp8000-cls", "dense-sp8000-cls", TOP1),
    ("pooling (dense twin)", "dense-sp8000-cls", "dense-sp8000", TOP1),
    # Round 4, against the class-token default.
    ("learning rate (cls)", "limoe-sp8000-cls-lr5e-4", "limoe-sp8000-cls", TOP1),
    ("warmup (cls)", "limoe-sp8000-cls-warmup5", "limoe-sp8000-cls", TOP1),
    ("warmup (cls)", "limoe-sp8000-cls-warmup25", "limoe-sp8000-cls", TOP1),
    ("loss (cls)", "limoe-sp8000-cls-siglip", "limoe-sp8000-cls", TOP1),
    ("experts (cls)", "limoe-sp8000-cls-e8", "limoe-sp8000-cls", TOP1),
    ("weight decay (cls)", "limoe-sp8000-cls-wd0.5", "limoe-sp8000-cls", TOP1),
    ("tokenizer (cls)", "limoe-sp8000-cls-bpe", "limoe-sp8000-cls", TOP1),
    ("8 experts and BPE (cls)", "limoe-sp8000-cls-e8-bpe", "limoe-sp8000-cls", TOP1),
    # Round 5, 8 experts against 8 experts.
    ("capacity with 8 experts (cls)", "limoe-sp8000-cls-e8-cf1.25", "limoe-sp8000-cls-e8",
     TOP1 + ["routing/text/drop_rate"]),
    ("entropy losses with 8 experts (cls)", "limoe-sp8000-cls-e8-entropy", "limoe-sp8000-cls-e8",
     TOP1 + ["routing/text/busiest_expert_share", "routing/text/drop_rate"]),
    ("tokenizer: SentencePiece BPE (cls)", "limoe-sp8000-cls-spbpe8000", "limoe-sp8000-cls", TOP1),
    ("tokenizer: SentencePiece BPE (cls)", "limoe-sp8000-cls-e8-spbpe8000", "limoe-sp8000-cls", TOP1),
    ("tokenizer: SentencePiece BPE (dense twin)", "dense-sp8000-cls-spbpe8000", "dense-sp8000-cls", TOP1),
    ("LIMoE vs its dense twin, both SentencePiece BPE", "limoe-sp8000-cls-spbpe8000", "dense-sp8000-cls-spbpe8000",
     TOP1),
    ("LIMoE vs the peer, both SentencePiece BPE", "limoe-sp8000-cls-spbpe8000", "open_clip-spbpe8000", TOP1),
    ("LIMoE (SentencePiece BPE) vs the open_clip peer", "limoe-sp8000-cls-spbpe8000", "open_clip", TOP1),
    ("experts placement (cls)", "limoe-sp8000-cls-last2", "limoe-sp8000-cls", TOP1),
    # Round 5's adopted change: the demo's default since.
    ("8 experts with the entropy losses vs the default of rounds 3-5", "limoe-sp8000-cls-e8-entropy",
     "limoe-sp8000-cls", TOP1 + ["routing/text/drop_rate"]),
    ("LIMoE (the demo's default in rounds 5-7) vs the open_clip peer", "limoe-sp8000-cls-e8-entropy", "open_clip",
     TOP1),
    ("LIMoE (the demo's default in rounds 5-7) vs its dense twin", "limoe-sp8000-cls-e8-entropy",
     "dense-sp8000-cls", TOP1),
    # Round 6: fine-grained experts, against the class-token default.
    ("8 half-width experts, k = 2 (cls)", "limoe-sp8000-cls-e8k2", "limoe-sp8000-cls",
     TOP1 + ["routing/text/drop_rate"]),
    ("16 half-width experts, k = 2 (cls)", "limoe-sp8000-cls-e16k2", "limoe-sp8000-cls",
     TOP1 + ["routing/text/drop_rate"]),
    ("LIMoE (16 half-width experts, k = 2) vs the open_clip peer", "limoe-sp8000-cls-e16k2", "open_clip", TOP1),
    # Round 8: tokenizers and subword regularization on the round-5 default.
    ("tokenizer: SentencePiece BPE (round-5 default)", "limoe-e8e-spbpe8000", "limoe-sp8000-cls-e8-entropy", TOP1),
    ("tokenizer: open_clip's BPE (round-5 default)", "limoe-e8e-bpe", "limoe-sp8000-cls-e8-entropy", TOP1),
    ("LIMoE with open_clip's BPE vs the open_clip peer", "limoe-e8e-bpe", "open_clip", TOP1),
    ("LIMoE with open_clip's BPE vs its dense twin", "limoe-e8e-bpe", "dense-cls-bpe", TOP1),
    ("tokenizer: open_clip's BPE (dense twin)", "dense-cls-bpe", "dense-sp8000-cls", TOP1),
    ("BPE-dropout (round-5 default)", "limoe-e8e-spbpe8000-drop0.1", "limoe-sp8000-cls-e8-entropy", TOP1),
    ("BPE-dropout (round-5 default)", "limoe-e8e-spbpe8000-drop0.1", "limoe-e8e-spbpe8000", TOP1),
    ("unigram sampling (round-5 default)", "limoe-e8e-sample0.2", "limoe-sp8000-cls-e8-entropy", TOP1),
    ("16 experts (round-5 default)", "limoe-e16e", "limoe-sp8000-cls-e8-entropy", TOP1 + ["routing/text/drop_rate"]),
    ("16 half-width experts, k = 2 (round-5 default)", "limoe-e16k2e", "limoe-sp8000-cls-e8-entropy",
     TOP1 + ["routing/text/drop_rate"]),
    ("text first to the expert slots (round-8 default)", "limoe-e8e-bpe-textfirst", "limoe-e8e-bpe",
     TOP1 + ["routing/text/drop_rate", "routing/image/drop_rate"]),
    ("text first to the expert slots vs the open_clip peer", "limoe-e8e-bpe-textfirst", "open_clip", TOP1),
    # Round 10: text-specific norms / attention in the shared tower.
    ("the text's own norms (round-8 default)", "limoe-e8e-bpe-textnorms", "limoe-e8e-bpe", TOP1),
    ("the text's own norms and attention (round-8 default)", "limoe-e8e-bpe-textattn", "limoe-e8e-bpe", TOP1),
    ("the text's own norms vs the open_clip peer", "limoe-e8e-bpe-textnorms", "open_clip", TOP1),
    ("the text's own norms and attention vs the open_clip peer", "limoe-e8e-bpe-textattn", "open_clip", TOP1),
    ("caption positives (round-8 default)", "limoe-e8e-bpe-pos", "limoe-e8e-bpe", TOP1),
    ("caption positives vs the open_clip peer", "limoe-e8e-bpe-pos", "open_clip", TOP1),
    ("caption positives vs the peer with them", "limoe-e8e-bpe-pos", "open_clip-pos", TOP1),
    ("caption positives, the peer", "open_clip-pos", "open_clip", TOP1),
    ("caption positives on the caption side (round-8 default)", "limoe-e8e-bpe-postext", "limoe-e8e-bpe", TOP1),
    ("caption positives on the caption side vs both sides", "limoe-e8e-bpe-postext", "limoe-e8e-bpe-pos", TOP1),
    ("caption positives on the caption side vs the open_clip peer", "limoe-e8e-bpe-postext", "open_clip", TOP1),
    ("caption positives on the caption side vs the peer with them", "limoe-e8e-bpe-postext", "open_clip-postext",
     TOP1),
    ("caption positives on the caption side vs the dense twin with them", "limoe-e8e-bpe-postext",
     "dense-cls-bpe-postext", TOP1),
    ("caption positives on the caption side, the peer", "open_clip-postext", "open_clip", TOP1),
    ("caption positives on the caption side, the dense twin", "dense-cls-bpe-postext", "dense-cls-bpe", TOP1),
    ("MoE in every block (round-11 default)", "limoe-e8e-bpe-postext-all", "limoe-e8e-bpe-postext",
     TOP1 + ["routing/text/drop_rate", "routing/image/drop_rate"]),
    ("MoE in every block vs the open_clip peer", "limoe-e8e-bpe-postext-all", "open_clip", TOP1),
    ("MoE in every block vs the dense twin with caption positives", "limoe-e8e-bpe-postext-all",
     "dense-cls-bpe-postext", TOP1),
    ("the text's own dense MLPs (round-11 default)", "limoe-e8e-bpe-postext-textmlp", "limoe-e8e-bpe-postext",
     TOP1 + ["routing/text/drop_rate"]),
    ("the text's own dense blocks (round-11 default)", "limoe-e8e-bpe-postext-textdense", "limoe-e8e-bpe-postext",
     TOP1 + ["routing/text/drop_rate"]),
    ("the text's own dense MLPs vs the peer with caption positives", "limoe-e8e-bpe-postext-textmlp",
     "open_clip-postext", TOP1),
    ("the text's own dense blocks vs the peer with caption positives", "limoe-e8e-bpe-postext-textdense",
     "open_clip-postext", TOP1),
    ("the text's own dense blocks vs the dense twin with caption positives", "limoe-e8e-bpe-postext-textdense",
     "dense-cls-bpe-postext", TOP1),
    ("xavier initialisation (round-11 default)", "limoe-e8e-bpe-postext-xavier", "limoe-e8e-bpe-postext", TOP1),
    ("xavier initialisation vs the peer with caption positives", "limoe-e8e-bpe-postext-xavier",
     "open_clip-postext", TOP1),
    ("xavier initialisation vs the dense twin with caption positives", "limoe-e8e-bpe-postext-xavier",
     "dense-cls-bpe-postext", TOP1),
    ("xavier initialisation, the dense twin", "dense-cls-bpe-postext-xavier", "dense-cls-bpe-postext", TOP1),
    ("xavier initialisation: LIMoE vs its dense twin", "limoe-e8e-bpe-postext-xavier",
     "dense-cls-bpe-postext-xavier", TOP1),
    ("the image's LayerNorm before the blocks (round-13 default)", "limoe-e8e-bpe-postext-xavier-lnpre",
     "limoe-e8e-bpe-postext-xavier", TOP1 + ["routing/text/drop_rate", "routing/image/drop_rate"]),
    ("the image's LayerNorm before the blocks, the dense twin", "dense-cls-bpe-postext-xavier-lnpre",
     "dense-cls-bpe-postext-xavier", TOP1),
    ("the image's LayerNorm before the blocks: LIMoE vs its dense twin", "limoe-e8e-bpe-postext-xavier-lnpre",
     "dense-cls-bpe-postext-xavier-lnpre", TOP1),
    ("the image's LayerNorm before the blocks vs the dense twin without it", "limoe-e8e-bpe-postext-xavier-lnpre",
     "dense-cls-bpe-postext-xavier", TOP1),
    ("LayerNorms on both modalities before the blocks (round-13 default)", "limoe-e8e-bpe-postext-xavier-lnpreboth",
     "limoe-e8e-bpe-postext-xavier", TOP1 + ["routing/text/drop_rate", "routing/image/drop_rate"]),
    ("LayerNorms on both modalities before the blocks (round-14 default)", "limoe-e8e-bpe-postext-xavier-lnpreboth",
     "limoe-e8e-bpe-postext-xavier-lnpre", TOP1 + ["routing/text/drop_rate", "routing/image/drop_rate"]),
    ("open_clip's initialisation (round-13 default)", "limoe-e8e-bpe-postext-scaledinit",
     "limoe-e8e-bpe-postext-xavier", TOP1 + ["routing/text/drop_rate", "routing/image/drop_rate"]),
    ("the image's LayerNorm before the blocks vs the peer with caption positives",
     "limoe-e8e-bpe-postext-xavier-lnpre", "open_clip-postext", TOP1),
    *vs_default("straight-through gates", "limoe-e8e-bpe-postext-xavier-lnpre-stgate"),
    *vs_default("a quarter of the router noise", "limoe-e8e-bpe-postext-xavier-lnpre-noise0.25"),
    *vs_default("5x the text's local entropy loss", "limoe-e8e-bpe-postext-xavier-lnpre-textlocal0.05"),
    *vs_default("16 experts", "limoe-e8e-bpe-postext-xavier-lnpre-e16"),
    *vs_default("dropout 0.1 in every MLP", "limoe-e8e-bpe-postext-xavier-lnpre-drop0.1"),
    *twin_contrasts("dropout 0.1 in every MLP", "drop0.1"),
    *vs_default("expert dropout 0.2", "limoe-e8e-bpe-postext-xavier-lnpre-edrop0.2"),
    *vs_default("dropless training", "limoe-e8e-bpe-postext-xavier-lnpre-dropless"),
    *vs_default("stronger augmentation", "limoe-e8e-bpe-postext-xavier-lnpre-aug"),
    *twin_contrasts("stronger augmentation", "aug"),
    ("stronger augmentation, the peer", "open_clip-aug", "open_clip", TOP1),
    ("stronger augmentation: LIMoE vs the peer", "limoe-e8e-bpe-postext-xavier-lnpre-aug", "open_clip-aug", TOP1),
    ("stronger augmentation: LIMoE vs the peer with caption positives", "limoe-e8e-bpe-postext-xavier-lnpre-aug",
     "open_clip-postext-aug", TOP1),
    ("still stronger augmentation (round-17 default)", f"{ROUND14_LIMOE}-aug2", f"{ROUND14_LIMOE}-aug",
     TOP1 + ["routing/text/drop_rate", "routing/image/drop_rate"]),
    *twin_contrasts("still stronger augmentation", "aug2", base="aug"),
    *vs_default("16 half-width experts, k = 2", f"{ROUND17_LIMOE}-e16k2", round_=17),
    *vs_default("MoE in the last two blocks", f"{ROUND17_LIMOE}-last2", round_=17),
    ("MoE in the last two blocks vs the peer trained alike", f"{ROUND17_LIMOE}-last2", "open_clip-postext-aug", TOP1),
    *vs_default("a shared expert", f"{ROUND17_LIMOE}-shared", round_=17),
    *vs_default("the last two blocks with a shared expert", f"{ROUND17_LIMOE}-last2-shared", round_=17),
    ("the round-22 default vs the peer trained alike", ROUND22_LIMOE, "open_clip-postext-aug", TOP1),
    ("the round-22 default vs the peer", ROUND22_LIMOE, "open_clip-aug", TOP1),
    *vs_default("32 quarter-width experts at k = 2 beside the shared expert", f"{ROUND22_LIMOE}-e32k2", round_=22),
    *vs_default("the moving average of the weights", f"{ROUND22_LIMOE}-ema", round_=22),
    ("the moving average of the weights, the dense twin", f"{ROUND17_DENSE}-ema", ROUND17_DENSE, TOP1),
    ("the moving average of the weights: LIMoE vs its dense twin", f"{ROUND22_LIMOE}-ema", f"{ROUND17_DENSE}-ema",
     TOP1),
    ("half the width: LIMoE vs its dense twin", f"{ROUND17_LIMOE}-w64", f"{ROUND17_DENSE}-w64", TOP1),
    ("half the width: LIMoE vs the peer trained alike", f"{ROUND17_LIMOE}-w64", "open_clip-postext-aug-w64", TOP1),
    ("half the width: the dense twin vs the peer trained alike", f"{ROUND17_DENSE}-w64",
     "open_clip-postext-aug-w64", TOP1),
    ("half the width against the full width, LIMoE", f"{ROUND17_LIMOE}-w64", ROUND17_LIMOE, TOP1),
    ("half the width against the full width, the dense twin", f"{ROUND17_DENSE}-w64", ROUND17_DENSE, TOP1),
    ("open_clip's initialisation vs the peer with caption positives", "limoe-e8e-bpe-postext-scaledinit",
     "open_clip-postext", TOP1),
]

# The demo's budget: 935 steps x 128 pairs = 119,680 Noto pairs per run (`limoe demo`'s default).
DEFAULT_STEPS = 935
DEFAULT_BATCH = 128
DEFAULT_NUM_PROCS = 2
DEFAULT_SEEDS = (0, 1, 2)
# Settings that must agree between runs aggregated together (paths may move).
SETTING_KEYS = ("config", "steps", "batch_size", "num_procs", "extra_overrides")


# -- running one variant x seed -------------------------------------------------------------------


def run_name(variant: str, seed: int) -> str:
    return f"{variant}-seed{seed}"


def result_path(out: Path, variant: str, seed: int) -> Path:
    return out / "results" / f"{run_name(variant, seed)}.json"


def load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def write_json(path: Path, data) -> Path:
    """Temp file then rename: a killed run never leaves half a result."""
    return files.write_json(data, path)


def run_overrides(variant: str, seed: int, settings: dict) -> list[tuple[str, object]]:
    """Everything this run adds to cpu-demo on top of `launch.demo.train`'s own overrides
    (name, logs, data, tokenizer, steps, warmup = steps // 10, checkpoint at the end, export)."""
    num_procs = settings["num_procs"]
    return [
        *variant_config(variant).items(),
        ("seed", seed),
        ("train.batch_size", settings["batch_size"] // num_procs),  # per rank: the global batch is equal
        ("parallel.num_procs", num_procs),
        ("parallel.ep_size", 1),  # every rank holds all experts: the same model whatever num_procs
        ("parallel.threads_per_proc", max(1, (os.cpu_count() or 1) // num_procs)),
        ("parallel.master_port", free_port()),
        ("evals.*.every", 0),  # no evaluation during training: the export is evaluated afterwards
        ("checkpoint.keep", 1),
        *[tuple(item) for item in settings["extra_overrides"]],
    ]


def training_set_size(data: dict, extra_overrides: list) -> int | None:
    """Distinct training samples: the Noto shards', or those of the sources a `--set data.train=...`
    gives instead (None where a source's sizes.json is missing)."""
    from data_pipelines.shards import count_samples, resolve_shards

    sources = [{"shards": str(data["train"] / "shards")}]
    for key, value in extra_overrides:
        if key == "data.train":
            sources = value
    counts = [count_samples(resolve_shards(source["shards"])) for source in sources]
    return None if None in counts else sum(counts)


def training_summary(metrics_path: Path) -> dict:
    """Training losses and drop rates averaged over the last tenth of the steps, and throughput."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        raise ValueError(f"{metrics_path}: no training steps recorded")
    tail = rows[-max(1, len(rows) // 10):]
    out = {"steps_logged": len(rows), "tail_steps": len(tail),
           "samples_per_s": statistics.median(r["samples_per_s"] for r in rows)}
    for key in ("loss", "contrastive_loss", "aux_loss", "drop_rate/image", "drop_rate/text"):
        if key in tail[0]:
            out[key] = statistics.fmean(r[key] for r in tail)
    return out


def routing_health(export_dir: Path, eval_dir: Path, batch_size: int, max_pairs: int | None) -> dict:
    """Parameter counts, and for a sparse model the routing of Twemoji caption pairs at the training
    capacity factor, in batches of the per-rank training batch (capacity is per routing call)."""
    import limoe
    from eval.evaluators import Routing
    from limoe.flops import count_parameters, flops_per_pair, measured_flops_per_pair

    model, _, tokenizer = limoe.load(export_dir)
    health = {"parameters": count_parameters(model), "routing": None,
              "flops_per_pair": {"analytic": flops_per_pair(model.config)["total"],
                                 "measured": measured_flops_per_pair(model)}}
    if model.config.is_dense:
        return health
    routing = Routing(data=str(eval_dir / "shards"), batch_size=batch_size, max_pairs=max_pairs)
    result = routing.evaluate(model, tokenizer)
    health["routing"] = {
        "num_experts": result["num_experts"],
        "capacity_factor": result["capacity_factor"],
        "pairs": result["pairs"],
        "batch_size": batch_size,
        "summary": result["summary"],
        "layers": [{"block": layer["block"], "expert_roles": layer["expert_roles"],
                    **{m: {k: layer[m][k] for k in ("tokens", "drop_rate", "tokens_per_expert",
                                                      "busiest_expert_share", "experts_used", "mean_entropy")}
                       for m in MODALITIES}}
                   for layer in result["layers"]],
    }
    return health


def prepare_run_dir(run_dir: Path, resume: bool) -> bool:
    """True if the run's training is already complete (its export exists). A run directory
    left by an interrupted training is moved aside (never deleted) under --resume."""
    if (run_dir / "export" / "config.json").is_file():
        return True
    if run_dir.exists():
        if not resume:
            raise SystemExit(f"error: {run_dir} exists from an earlier ablation; pass --resume to continue "
                             "it, or choose another --out")
        aside = run_dir.with_name(f"{run_dir.name}.interrupted-{time.strftime('%Y%m%d-%H%M%S')}")
        print(f"{run_dir}: training did not finish; moved to {aside}, training again from the start")
        run_dir.rename(aside)
    return False


def run_one(variant: str, seed: int, settings: dict, data: dict, tokenizers: dict[str, Path], out: Path,
            resume: bool, max_pairs: int | None) -> dict:
    name = run_name(variant, seed)
    runs = out / "runs"
    run_dir = runs / name
    load_start = load_average()
    t0 = time.time()
    if prepare_run_dir(run_dir, resume):
        print(f"{name}: training finished earlier ({run_dir / 'export'}); evaluating it")
        train_seconds = None
    else:
        preset = VARIANTS[variant][1]["model.preset"]
        run_dir = train(name, preset, data, tokenizers[variant_tokenizer(variant)], runs, settings["steps"],
                        run_overrides(variant, seed, settings))
        train_seconds = time.time() - t0
    t1 = time.time()
    rows = evaluate(run_dir / "export", data["eval"])
    health = routing_health(run_dir / "export", data["eval"], settings["batch_size"] // settings["num_procs"],
                            max_pairs)
    eval_seconds = time.time() - t1
    result = {
        "variant": variant,
        "seed": seed,
        "description": VARIANTS[variant][0],
        "overrides": VARIANTS[variant][1],
        "tokenizer": variant_tokenizer(variant),
        "settings": settings,
        "run_dir": str(run_dir),
        "zeroshot": {r["granularity"]: r for r in rows},
        **health,
        "training": training_summary(run_dir / "metrics.jsonl"),
        "seconds": {"train": train_seconds, "evaluate": eval_seconds, "total": time.time() - t0},
        "load_average": {"start": load_start, "end": load_average()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
    }
    write_json(result_path(out, variant, seed), result)
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    return result


def machine() -> dict:
    from common import machine as describe_machine  # benchmarks/common.py imports torch: not at the top

    return describe_machine()


# -- aggregation ------------------------------------------------------------------------------------


def flat_metrics(result: dict) -> dict[str, float]:
    """One run's numbers under flat keys ("zeroshot/name/top1", "routing/text/drop_rate", ...)."""
    m = {}
    for g, row in result["zeroshot"].items():
        for k in ("top1", "top5"):
            if row.get(k) is not None:
                m[f"zeroshot/{g}/{k}"] = row[k]
    if result.get("routing"):
        for modality, s in result["routing"]["summary"].items():
            m[f"routing/{modality}/busiest_expert_share"] = s["busiest_expert_share"]
            m[f"routing/{modality}/experts_used"] = s["min_experts_used"]
            m[f"routing/{modality}/drop_rate"] = s["drop_rate"]
            m[f"routing/{modality}/mean_entropy"] = s["mean_entropy"]
        m["routing/num_experts"] = result["routing"]["num_experts"]
    for k, v in result.get("training", {}).items():
        if isinstance(v, (int, float)) and k not in ("steps_logged", "tail_steps"):
            m[f"train/{k}"] = v
    for k, v in result.get("seconds", {}).items():
        if v is not None:
            m[f"seconds/{k}"] = v
    return m


def describe(values: list[float]) -> dict:
    """Mean, sample std (None for one seed), min, max and count."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "n": len(values)}


def aggregate(results: list[dict]) -> dict[str, dict]:
    """{variant: {"seeds": [...], "metrics": {key: describe(values over seeds)}}}, in VARIANTS order."""
    by_variant: dict[str, list[dict]] = {}
    for r in sorted(results, key=lambda r: (variant_order(r["variant"]), r["seed"])):
        by_variant.setdefault(r["variant"], []).append(r)
    summary = {}
    for variant, runs in by_variant.items():
        values: dict[str, list[float]] = {}
        for r in runs:
            for k, v in flat_metrics(r).items():
                values.setdefault(k, []).append(v)
        summary[variant] = {"seeds": [r["seed"] for r in runs],
                            "metrics": {k: describe(v) for k, v in values.items()}}
    return summary


def variant_order(name: str) -> tuple[int, str]:
    names = list(VARIANTS)
    return (names.index(name), "") if name in names else (len(names), name)


# Two-sided 95 % quantiles of Student's t for 1-30 degrees of freedom (the standard table);
# past 30 the normal quantile 1.96 is within 2 % of t's.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042)


def ci95_halfwidth(std: float | None, n: int) -> float | None:
    """Half-width of the 95 % confidence interval of a mean of n values with sample std `std`
    (Student's t; None for one value). For paired differences over seeds: an interval that
    contains 0 means the seeds do not tell which variant is ahead."""
    if std is None or n < 2:
        return None
    return (T975[n - 2] if n - 1 <= len(T975) else 1.96) * std / n ** 0.5


def paired_differences(results: list[dict], first: str, second: str, metric: str) -> dict | None:
    """first - second, seed by seed, over the seeds both have; None if they share none."""
    a = {r["seed"]: flat_metrics(r).get(metric) for r in results if r["variant"] == first}
    b = {r["seed"]: flat_metrics(r).get(metric) for r in results if r["variant"] == second}
    seeds = sorted(s for s in a.keys() & b.keys() if a[s] is not None and b[s] is not None)
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    d = describe(diffs)
    return {**d, "ci95": ci95_halfwidth(d["std"], d["n"]), "seeds": seeds,
            "first_higher": sum(x > 0 for x in diffs)}


def contrasts(results: list[dict]) -> list[dict]:
    rows = []
    for claim, first, second, metrics in CONTRASTS:
        for metric in metrics:
            d = paired_differences(results, first, second, metric)
            if d is not None:
                rows.append({"claim": claim, "first": first, "second": second, "metric": metric, **d})
    return rows


def check_settings(results: list[dict]) -> dict:
    """The settings every result shares; mixing settings in one table would be meaningless."""
    if not results:
        raise SystemExit("error: no results to report")
    first = {k: results[0]["settings"].get(k) for k in SETTING_KEYS}
    for r in results[1:]:
        other = {k: r["settings"].get(k) for k in SETTING_KEYS}
        if other != first:
            diff = {k: (first[k], other[k]) for k in SETTING_KEYS if first[k] != other[k]}
            raise SystemExit(f"error: {run_name(r['variant'], r['seed'])} was run with other settings than "
                             f"{run_name(results[0]['variant'], results[0]['seed'])}: {diff}")
    return first


def load_results(out: Path) -> list[dict]:
    results = []
    for path in sorted((out / "results").glob("*.json")):
        try:
            results.append(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise SystemExit(f"error: {path} is not valid JSON ({e}); delete it to rerun that run") from e
    return results


# -- tables, plot, report ----------------------------------------------------------------------------


def pct(stat: dict | None) -> str:
    if stat is None:
        return "n/a"
    spread = f" ± {100 * stat['std']:.1f}" if stat["std"] is not None else ""
    return f"{100 * stat['mean']:.1f}{spread}"


def num(stat: dict | None, digits: int = 2) -> str:
    if stat is None:
        return "n/a"
    spread = f" ± {stat['std']:.{digits}f}" if stat["std"] is not None else ""
    return f"{stat['mean']:.{digits}f}{spread}"


def zeroshot_table(summary: dict, results: list[dict]) -> str:
    head = "| variant | seeds | " + " | ".join(f"{g} top-1 | {g} top-5" for g in GRANULARITIES) + " |"
    lines = [head, "|---|---:|" + "---:|" * (2 * len(GRANULARITIES))]
    for variant, s in summary.items():
        cells = [pct(s["metrics"].get(f"zeroshot/{g}/{k}")) for g in GRANULARITIES for k in ("top1", "top5")]
        lines.append(f"| {variant} | {len(s['seeds'])} | " + " | ".join(cells) + " |")
    chance = []
    any_run = results[0]["zeroshot"]
    for g in GRANULARITIES:
        row = any_run.get(g, {})
        chance += [f"{100 * row['chance_top1']:.1f}" if row else "-", f"{100 * row['chance_top5']:.1f}" if row else "-"]
    lines.append("| chance | | " + " | ".join(chance) + " |")
    classes = ", ".join(f"{g} {any_run[g]['classes']}" for g in GRANULARITIES if g in any_run)
    return "\n".join(lines) + f"\n\nPercent, mean ± sample std over seeds. Classes: {classes}; " \
                              f"{any_run[GRANULARITIES[0]]['images']} Twemoji images."


def routing_table(summary: dict) -> str:
    lines = ["| variant | experts | " + " | ".join(
        f"{m}: busiest expert | {m}: experts used | {m}: dropped" for m in MODALITIES) + " | train drop image / text |",
        "|---|---:|" + "---:|" * (3 * len(MODALITIES)) + "---:|"]
    for variant, s in summary.items():
        m = s["metrics"]
        experts = m.get("routing/num_experts")
        cells = []
        for mod in MODALITIES:
            cells += [pct(m.get(f"routing/{mod}/busiest_expert_share")),
                      num(m.get(f"routing/{mod}/experts_used"), 1),
                      pct(m.get(f"routing/{mod}/drop_rate"))]
        train_drop = (f"{pct(m['train/drop_rate/image'])} / {pct(m['train/drop_rate/text'])}"
                      if "train/drop_rate/image" in m else "n/a")
        lines.append(f"| {variant} | {int(experts['mean']) if experts else 'n/a'} | " + " | ".join(cells)
                     + f" | {train_drop} |")
    return "\n".join(lines)


def training_table(summary: dict) -> str:
    lines = ["| variant | params total / active per token | forward FLOPs per pair (analytic / counted) | "
             "final contrastive loss | final aux loss | train pairs/s | train s | eval s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for variant, s in summary.items():
        m = s["metrics"]
        params = s.get("parameters")
        p = f"{params['total'] / 1e6:.2f}M / {params['active_per_token'] / 1e6:.2f}M" if params else "-"
        f = s.get("flops_per_pair")
        flops = f"{f['analytic'] / 1e6:.0f}M / {f['measured'] / 1e6:.0f}M" if f else "-"
        lines.append(f"| {variant} | {p} | {flops} | {num(m.get('train/contrastive_loss'), 3)} | "
                     f"{num(m.get('train/aux_loss'), 4)} | {num(m.get('train/samples_per_s'), 0)} | "
                     f"{num(m.get('seconds/train'), 0)} | {num(m.get('seconds/evaluate'), 0)} |")
    return "\n".join(lines)


def metric_label(metric: str) -> str:
    return metric.replace("zeroshot/", "zero-shot ").replace("routing/", "").replace("/", " ")


def contrast_table(rows: list[dict]) -> str:
    if not rows:
        return "(no pair of variants with common seeds)"
    lines = ["| claim | difference | metric | mean ± std over seeds | 95 % CI of the mean | min … max | first higher |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        counted = r["metric"].endswith("experts_used")
        fmt = (lambda x: f"{x:+.2f}") if counted else (lambda x: f"{100 * x:+.1f} pt")  # noqa: E731
        spread = f" ± {fmt(r['std'])[1:]}" if r["std"] is not None else ""  # a std has no sign
        half = r.get("ci95")
        interval = f"{fmt(r['mean'] - half)} … {fmt(r['mean'] + half)}" if half is not None else "-"
        lines.append(f"| {r['claim']} | {r['first']} − {r['second']} | {metric_label(r['metric'])} | "
                     f"{fmt(r['mean'])}{spread} | {interval} | {fmt(r['min'])} … {fmt(r['max'])} | "
                     f"{r['first_higher']}/{r['n']} |")
    return "\n".join(lines)


def overrides_table(variants: list[str]) -> str:
    """Each variant's preset, tokenizer and every override beyond cpu-demo.yaml, spelled out."""
    def value(v) -> str:
        if isinstance(v, dict):  # per-modality loss weights: the non-zero ones
            return "{" + ", ".join(f"{k} {w:g}" for k, w in v.items() if w) + "}" if any(v.values()) else "{none}"
        return f"{v:g}" if isinstance(v, float) else str(v)

    lines = ["| variant | preset | tokenizer | overrides of cpu-demo.yaml | what it is |", "|---|---|---|---|---|"]
    for v in variants:
        description, o = VARIANTS.get(v, ("(not in this version of the script)", {}))
        rest = {k: x for k, x in variant_config(v).items() if k != "model.preset"} if v in VARIANTS else {}
        cells = [o.get("model.preset", "?"), variant_tokenizer(v) if v in VARIANTS else "?",
                 "<br>".join(f"`{k}={value(x)}`" for k, x in rest.items()) or "-"]
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {description} |")
    return "\n".join(lines) + ("\n\nLoss weights are per MoE layer, summed over layers (docs/model.md). Tokenizers: "
                               + "; ".join(f"`{k}`: {d}" for k, d in TOKENIZERS.items()) + ".")


def plot_summary(summary: dict, results: list[dict], path: Path) -> Path:
    """Zero-shot top-1/top-5 per granularity (bars = mean, whiskers = std, dots = seeds, dashes = chance),
    and routing health per modality (busiest-expert share, experts used, drop rate)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    variants = list(summary)
    seeds_of = {v: [flat_metrics(r) for r in results if r["variant"] == v] for v in variants}
    fig = Figure(figsize=(max(12.0, 1.4 * len(variants) * 3), 8.0))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    x = list(range(len(variants)))

    def bars(ax, keys_labels, scale, offset_width=0.38):
        n = len(keys_labels)
        for i, (key, label, color) in enumerate(keys_labels):
            shift = (i - (n - 1) / 2) * offset_width
            stats = [summary[v]["metrics"].get(key) for v in variants]
            means = [scale * s["mean"] if s else float("nan") for s in stats]  # nan: no bar
            errs = [scale * s["std"] if s and s["std"] is not None else 0.0 for s in stats]
            ax.bar([xi + shift for xi in x], means, width=offset_width, yerr=errs, capsize=3, color=color,
                   label=label, alpha=0.85, error_kw={"elinewidth": 1})
            for xi, v in zip(x, variants):
                points = [scale * m[key] for m in seeds_of[v] if key in m]
                ax.scatter([xi + shift] * len(points), points, s=10, color="black", zorder=3)
        for xi, v in zip(x, variants):
            if all(summary[v]["metrics"].get(key) is None for key, _, _ in keys_labels):
                ax.text(xi, 0, "n/a", ha="center", va="bottom", fontsize=8, color="gray")
        ax.set_xticks(x)
        ax.set_xlim(-0.6, len(variants) - 0.4)  # nan bars do not count for autoscaling
        ax.set_xticklabels(variants, rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)

    any_run = results[0]["zeroshot"]
    for ax, g in zip(axes[0], GRANULARITIES):
        bars(ax, [(f"zeroshot/{g}/top1", "top-1", "tab:blue"), (f"zeroshot/{g}/top5", "top-5", "tab:cyan")], 100)
        if g in any_run:
            ax.axhline(100 * any_run[g]["chance_top1"], color="tab:blue", ls="--", lw=1)
            ax.axhline(100 * any_run[g]["chance_top5"], color="tab:cyan", ls="--", lw=1)
            ax.set_title(f"zero-shot on Twemoji: {g} ({any_run[g]['classes']} classes)", fontsize=10)
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=8)
    health = [("busiest_expert_share", "share of tokens on the busiest expert (%)", 100),
              ("experts_used", "experts with >= 1/(2E) of the tokens (of E)", 1),
              ("drop_rate", "tokens dropped at capacity (%)", 100)]
    for ax, (key, title, scale) in zip(axes[1], health):
        bars(ax, [(f"routing/image/{key}", "image", "tab:green"), (f"routing/text/{key}", "text", "tab:orange")],
             scale)
        ax.set_title(title + ", worst layer" if key != "drop_rate" else title, fontsize=10)
        ax.legend(fontsize=8)
    s = results[0]["settings"]
    seed_counts = sorted({len(v["seeds"]) for v in summary.values()})
    seeds = str(seed_counts[0]) if len(seed_counts) == 1 else f"{seed_counts[0]}-{seed_counts[-1]}"
    fig.suptitle(f"limoe quality ablation: {s['steps']} steps x batch {s['batch_size']} on Noto emoji, evaluated on "
                 f"unseen Twemoji; {seeds} seed(s) per variant (bars: mean, whiskers: std, dots: seeds, "
                 "dashes: chance)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return path


def render_generated(summary: dict, results: list[dict], contrast_rows: list[dict], plot: Path | None,
                     report_dir: Path, session: dict, section: str = "") -> str:
    start, end = markers(section)
    settings = check_settings(results)
    run_seconds = sum(r["seconds"]["total"] for r in results)
    untimed = sum(r["seconds"]["train"] is None for r in results)
    loads = [x for r in results for x in r["load_average"].values() if x is not None]
    cores = {r["machine"]["cpu_count"] for r in results}
    cpus = {r["machine"]["cpu"] for r in results}
    dates = sorted(r["date"] for r in results)
    pairs = settings["steps"] * settings["batch_size"]
    train_size = results[0]["settings"].get("train_pairs")
    own_data = any(key == "data.train" for key, _ in settings["extra_overrides"])
    lines = [
        start,
        "<!-- Written by benchmarks/quality.py; edits between these markers are replaced on the next run. -->",
        "",
        "### Setting",
        "",
        f"- command: `{session['command']}`",
        f"- each run: `cpu-demo` config, {settings['steps']} steps x batch {settings['batch_size']} "
        f"({settings['num_procs']} x {settings['batch_size'] // settings['num_procs']} per DeepSpeed rank) = "
        f"{pairs:,} {'training' if own_data else 'Noto'} image-caption pairs"
        + (f" ({pairs / train_size:.1f} passes over {train_size})" if train_size else "")
        + f"; warmup {settings['steps'] // 10} steps; extra overrides: {settings['extra_overrides'] or 'none'}",
        f"- {len(results)} runs: " + ", ".join(f"{v} (seeds {', '.join(map(str, s['seeds']))})"
                                               for v, s in summary.items()),
        f"- machine: {', '.join(sorted(cpus))}, {', '.join(map(str, sorted(cores)))} CPU cores; 1-minute load "
        f"average at the start and end of the runs: "
        + (f"{min(loads):.1f} to {max(loads):.1f}" if loads else "not measured"),
        f"- dates: {dates[0]} to {dates[-1]} (UTC)",
        "- code: " + ", ".join(f"{c[:12] + c[40:] if c else 'commit not recorded'} ({n} run{'s' * (n > 1)})"
                               for c, n in collections.Counter(r["machine"].get("commit") for r in results).items()),
        f"- total run time: {run_seconds / 60:.1f} min summed over runs (training + evaluation"
        + (f"; {untimed} run(s) trained in an earlier invocation count their evaluation only" if untimed else "")
        + f"); this invocation {session['seconds'] / 60:.1f} min",
        "",
        "### Variants (overrides of `launch/configs/cpu-demo.yaml`)",
        "",
        overrides_table(list(summary)),
        "",
        "### Zero-shot on the unseen Twemoji style",
        "",
        zeroshot_table(summary, results),
        "",
        "### Routing health on Twemoji caption pairs",
        "",
        routing_table(summary),
        "",
        "Busiest expert: share of the modality's tokens whose first choice is one expert (worst MoE layer; "
        "1/E is perfectly even). Experts used: experts receiving at least 1/(2E) of the modality's tokens "
        "(fewest over layers). Dropped: routes past capacity at the training capacity factor, batches of the "
        "per-rank training batch, no router noise. Train drop: the same during the last tenth of training "
        "(with router noise). Percent, mean ± std over seeds.",
        "",
        "### Seed-paired differences",
        "",
        contrast_table(contrast_rows),
        "",
        "First minus second, seed by seed (pt = percentage points); \"first higher\": in how many seeds. "
        "95 % CI: mean ± t(0.975, n-1) · std / √n over the n seeds (Student's t); where it contains 0, "
        "these seeds do not tell which of the two is ahead.",
        "",
        "### Training",
        "",
        training_table(summary),
        "",
    ]
    if plot is not None:
        lines += [f"![quality ablation]({os.path.relpath(plot, report_dir)})", ""]
    lines.append(end)
    return "\n".join(lines)


REPORT_HEADER = """# Quality: does limoe learn like LIMoE?

Generated results of `benchmarks/quality.py` follow; see the script's `--help`.

"""


def update_report(path: Path, generated: str, section: str = "") -> Path:
    """Replace the text between the generated markers (or add the section at the end); the rest of
    the document (how to run, conclusions) is kept as written. Temp file, then rename."""
    text = path.read_text() if path.is_file() else REPORT_HEADER
    first, last = markers(section)
    start, end = text.find(first), text.find(last)
    if start != -1 and end > start:
        text = text[:start] + generated + text[end + len(last):]
    elif start != -1 or end != -1:
        raise SystemExit(f"error: {path} has only one of the markers {first} / {last}; "
                         "fix the file so both are there (or neither)")
    else:
        text = text.rstrip("\n") + "\n\n## Results\n\n" + generated + "\n"
    return atomic_write(path, text)


def report(out: Path, report_path: Path | None, plot_path: Path | None, session: dict, section: str = "",
           variants: list[str] | None = None, seeds: list[int] | None = None) -> dict:
    """Aggregate OUT/results (only the given variants and seeds, when given) into tables, a plot,
    the report's section and OUT/summary.json (summary-SECTION.json for a section)."""
    results = [r for r in load_results(out)
               if (variants is None or r["variant"] in variants) and (seeds is None or r["seed"] in seeds)]
    check_settings(results)
    summary = aggregate(results)
    for variant, s in summary.items():  # parameter counts are the same for every seed
        s["parameters"] = next((r["parameters"] for r in results if r["variant"] == variant), None)
        s["flops_per_pair"] = next((r.get("flops_per_pair") for r in results if r["variant"] == variant), None)
    contrast_rows = contrasts(results)
    summary_path = out / (f"summary-{section}.json" if section else "summary.json")
    write_json(summary_path, {"command": session["command"], "settings": results[0]["settings"],
                              "variants": summary, "contrasts": contrast_rows,
                              "runs": [run_name(r["variant"], r["seed"]) for r in results]})
    plot = plot_summary(summary, results, plot_path) if plot_path else None
    print("\nZero-shot on the unseen Twemoji style (top-1 / top-5, %, mean ± std over seeds):\n")
    print(zeroshot_table(summary, results))
    print("\nRouting health (Twemoji pairs):\n")
    print(routing_table(summary))
    print("\nSeed-paired differences:\n")
    print(contrast_table(contrast_rows))
    written = [summary_path] + ([plot] if plot else [])
    if report_path:
        generated = render_generated(summary, results, contrast_rows, plot, report_path.parent, session, section)
        written.append(update_report(report_path, generated, section))
    print("\nwrote " + ", ".join(map(str, written)))
    return summary


# -- command line ------------------------------------------------------------------------------------


def variants_help() -> str:
    width = max(map(len, VARIANTS))
    return "variants (default: " + " ".join(DEFAULT_VARIANTS) + "):\n" + "\n".join(
        f"  {name.ljust(width)}  {description}" for name, (description, _) in VARIANTS.items())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=variants_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, metavar="N",
                   help=f"training steps per run (default {DEFAULT_STEPS})")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, metavar="B",
                   help=f"image-text pairs per step over all processes (default {DEFAULT_BATCH})")
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help="seeds; each variant is trained once per seed (default 0 1 2; with --report-only: "
                        "which results to render, default all)")
    p.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS),
                   metavar="VARIANT", help="which variants to run (listed below; with --report-only: which "
                                           "results to render, default all)")
    p.add_argument("--num-procs", type=int, default=DEFAULT_NUM_PROCS, choices=[1, 2],
                   help="DeepSpeed CPU ranks per run, data parallel (each routes its own share of the batch, as "
                        f"in the demo); threads per rank = cores / ranks (default {DEFAULT_NUM_PROCS})")
    p.add_argument("--out", default="runs/quality", metavar="DIR",
                   help="runs/, results/, results.jsonl, summary.json, quality.png go here (default runs/quality)")
    p.add_argument("--report", default="docs/quality.md", metavar="MD",
                   help="markdown file whose generated section is (re)written; '' for none (default docs/quality.md)")
    p.add_argument("--section", default="", metavar="NAME",
                   help="write the report's section between <!-- generated:NAME:start --> and "
                        "<!-- generated:NAME:end --> (added at the end if missing) instead of the main one, "
                        "so one report can hold several result folders (default: the main section)")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="plot path (default: beside --report, named like it plus -NAME with --section; "
                        "OUT/quality.png without a report)")
    p.add_argument("--resume", action="store_true",
                   help="continue an ablation in OUT: skip runs with a results file, evaluate finished trainings, "
                        "retrain interrupted ones (their folder is moved aside)")
    p.add_argument("--report-only", action="store_true", help="train nothing: re-render from OUT/results")
    p.add_argument("--data", default="data", metavar="DIR",
                   help="folder holding emoji-google/ and emoji-twitter/ (built there if missing; default data)")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="npm tarball cache for building the data (default ~/.cache/limoe/npm)")
    p.add_argument("--tarball-dir", default=None, metavar="DIR",
                   help="read emoji-datasource-*.tgz from this folder instead of npm (offline)")
    p.add_argument("--routing-pairs", type=int, default=None, metavar="N",
                   help="Twemoji pairs for routing health (default: all)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra training config override for every run, e.g. --set data.workers=0 (repeatable)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.batch_size % args.num_procs:
        p.error(f"--batch-size {args.batch_size} is not divisible by --num-procs {args.num_procs}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    command = shlex.join(["python", "benchmarks/quality.py", *(sys.argv[1:] if argv is None else argv)])
    out = Path(args.out).resolve()
    report_path = Path(args.report).resolve() if args.report else None
    stem = report_path.stem + (f"-{args.section}" if args.section else "") if report_path else ""
    plot_path = Path(args.plot).resolve() if args.plot else (
        report_path.with_name(stem + ".png") if report_path else out / "quality.png")
    if args.report_only:
        report(out, report_path, plot_path, {"command": command, "seconds": time.time() - t0}, args.section,
               args.variants, args.seeds)
        return 0
    args.seeds = args.seeds or list(DEFAULT_SEEDS)
    args.variants = args.variants or list(DEFAULT_VARIANTS)

    import limoe
    import torch
    from launch.launcher import TrainingFailed, TrainingInterrupted
    from launch.train_config import ConfigError, parse_set

    torch.set_num_threads(os.cpu_count() or 1)  # evaluation runs here, between trainings
    if args.tarball_dir:
        os.environ["LIMOE_NPM_TARBALL_DIR"] = str(Path(args.tarball_dir).resolve())
    settings = {"config": "cpu-demo", "steps": args.steps, "batch_size": args.batch_size,
                "num_procs": args.num_procs,
                "extra_overrides": [list(parse_set(item)) for item in args.set],
                "data": str(Path(args.data).resolve())}
    planned = [(v, s) for v in args.variants for s in args.seeds]
    done = [(v, s) for v, s in planned if result_path(out, v, s).is_file()]
    if done and not args.resume:
        names = ", ".join(run_name(*d) for d in done[:3]) + (", ..." if len(done) > 3 else "")
        raise SystemExit(f"error: {out} already has results for {len(done)} of these runs ({names}); pass "
                         "--resume to skip them, --report-only to re-render, or choose another --out")
    for v, s in done:
        earlier = json.loads(result_path(out, v, s).read_text())["settings"]
        if any(earlier.get(k) != settings[k] for k in SETTING_KEYS):
            raise SystemExit(f"error: {result_path(out, v, s)} was run with other settings "
                             f"({ {k: earlier.get(k) for k in SETTING_KEYS} }); use another --out")

    print(f"=== emoji data in {settings['data']}; tokenizers ===", flush=True)
    data = build_data(Path(settings["data"]), args.cache)
    context = limoe.get_config("limoe-nano").context_length
    tokenizers = {kind: prepare_tokenizer(data["train"], kind, context)
                  for kind in sorted({variant_tokenizer(v) for v in args.variants})}
    settings["train_pairs"] = training_set_size(data, settings["extra_overrides"])
    todo = [(v, s) for v, s in planned if (v, s) not in done]
    print(f"{len(planned)} runs planned, {len(done)} already done, {len(todo)} to run", flush=True)
    try:
        for i, (variant, seed) in enumerate(todo, 1):
            print(f"\n=== run {i}/{len(todo)}: {run_name(variant, seed)} ({VARIANTS[variant][0]}); "
                  f"{(time.time() - t0) / 60:.1f} min so far ===", flush=True)
            r = run_one(variant, seed, settings, data, tokenizers, out, args.resume, args.routing_pairs)
            print(f"{run_name(variant, seed)}: " + ", ".join(
                f"{g} top-1 {100 * r['zeroshot'][g]['top1']:.1f}%" for g in GRANULARITIES)
                  + f"; {r['seconds']['total']:.0f} s", flush=True)
    except (ConfigError, TrainingFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(f"{e}\nThe ablation stopped; finished runs are kept: continue with the same command and --resume",
              file=sys.stderr)
        return 128 + e.signum
    report(out, report_path, plot_path, {"command": command, "seconds": time.time() - t0}, args.section)
    print(f"total time {(time.time() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
