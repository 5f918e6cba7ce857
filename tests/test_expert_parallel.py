"""Expert parallelism through DeepSpeed computes what one process computes.

Two CPU ranks (gloo) run a tiny LIMoE with ep_size=2 through `deepspeed.initialize`
(the experts split over the ranks, tokens exchanged by all-to-all). With router
noise off and capacity high enough that nothing is dropped, routing is the same
as in one process, so:

- each rank's outputs (features, logit scale, unweighted aux terms) equal those
  of a single-process ep_size=1 model with the same weights run on that rank's
  half of the batch;
- each rank's contrastive loss equals the single-process loss rows of its half, also
  with caption positives shared across the ranks (data.caption_positives);
- one optimizer step (SGD, so a wrong gradient scale would show) leaves the same
  weights as one single-process step on the whole batch.

This file is also the worker script: the test runs it under the `deepspeed`
launcher, each rank writes its results as safetensors, and the test compares.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

E, EP, SEED, PER_RANK, LR = 4, 2, 7, 3, 0.5
VOCAB, CONTEXT = 50, 8
TINY = dict(width=32, depth=2, heads=2, mlp_dim=64, embed_dim=16, image_size=16, patch_size=4,
            vocab_size=VOCAB, context_length=CONTEXT)
# Routing identical to one process: no router noise; capacity factor E makes the
# capacity at least the number of tokens, so no token is ever dropped.
MOE = dict(num_experts=E, noise_std=0.0, capacity_factor=float(E))


def model_config():
    from limoe.config import AuxLossWeights, get_config

    # Aux weights 0: the loss is the contrastive loss alone, whose global value is the
    # mean of the ranks' local losses (the aux terms are still computed and compared).
    off = dict(importance=0.0, load=0.0, local_entropy=0.0, global_entropy=0.0, zloss=0.0)
    config = get_config("limoe-nano", **TINY, moe={**MOE, "image": off, "text": off})
    config.moe.image, config.moe.text = AuxLossWeights(**off), AuxLossWeights(**off)
    return config


def batch():
    g = torch.Generator().manual_seed(123)
    n = PER_RANK * EP
    images = torch.randn(n, 3, 16, 16, generator=g)
    tokens = torch.randint(3, VOCAB, (n, CONTEXT), generator=g)
    lengths = torch.randint(2, CONTEXT + 1, (n,), generator=g)
    for i, length in enumerate(lengths.tolist()):  # eos (2) then padding (0), as the tokenizer makes
        tokens[i, length - 1] = 2
        tokens[i, length:] = 0
    return images, tokens


def shared_caption_keys():
    """Sample 0 draws "cls", which samples 3 and 4 (on the other rank) have too."""
    from data_pipelines.loader import caption_keys

    n = PER_RANK * EP
    drawn = ["cls"] + [f"own {i}" for i in range(1, n)]
    return caption_keys(drawn, [[f"own {i}"] + ["cls"] * (i in (0, 3, 4)) for i in range(n)])


def run_worker(out_dir: str) -> None:
    """One rank: forward + loss + backward + SGD step through a DeepSpeed engine."""
    import deepspeed
    import deepspeed.comm as dist
    from safetensors.torch import save_file

    from launch.deepspeed_compat import patch_broadcast_of_scalar_parameters
    from launch.trainer import build_model
    from limoe.losses import LIMoELoss

    torch.set_num_threads(1)
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == EP
    model = build_model(model_config(), EP, ep_rank=rank % EP, seed=SEED)
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    groups = split_params_into_different_moe_groups_for_optimizer(
        [{"name": "all", "params": list(model.parameters())}])
    optimizer = torch.optim.SGD(groups, lr=LR)
    ds_config = {"train_micro_batch_size_per_gpu": PER_RANK, "gradient_accumulation_steps": 1,
                 "gradient_clipping": 0.0, "zero_optimization": {"stage": 1},
                 "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    patch_broadcast_of_scalar_parameters()
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    from deepspeed.utils import groups as ds_groups

    ep_rank = ds_groups._get_expert_parallel_rank(model.moe_layers()[0].expert_group_name)
    images, tokens = batch()
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    engine.train()
    out = engine(images[mine], tokens[mine])
    loss = LIMoELoss("clip", rank=rank, world_size=world)(out)
    positives_loss = LIMoELoss("clip", rank=rank, world_size=world)(out, shared_caption_keys()[mine])
    text_mode_loss = LIMoELoss("clip", rank, world, positives="text")(out, shared_caption_keys()[mine])
    engine.backward(loss["loss"])
    engine.step()
    result = {
        "image_features": out["image_features"].detach(),
        "text_features": out["text_features"].detach(),
        "logit_scale": out["logit_scale"].detach(),
        "loss": loss["loss"].detach(),
        "positives_loss": positives_loss["contrastive_loss"].detach(),
        "text_mode_loss": text_mode_loss["contrastive_loss"].detach(),
        "ep_rank": torch.tensor(ep_rank),
        **{f"aux_layer_mean/{k}": v.detach() for k, v in out["aux_terms"].items()},
        **{f"param/{k}": v.detach().clone() for k, v in engine.module.state_dict().items()},
    }
    save_file({k: v.contiguous() for k, v in result.items()}, os.path.join(out_dir, f"rank{rank}.safetensors"))
    dist.barrier()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    from launch.distributed import free_port

    out = tmp_path_factory.mktemp("ep")
    env = dict(os.environ, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    deepspeed = Path(sys.executable).with_name("deepspeed")
    port = free_port()
    cmd = [str(deepspeed), "--num_gpus", str(EP), "--master_port", str(port), __file__, "--out", str(out)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                              cwd=Path(__file__).resolve().parent.parent)
    finally:
        from launch.deepspeed_compat import remove_shm_buffers

        remove_shm_buffers(port)  # what launch.launcher does after every job
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from safetensors.torch import load_file

    return [load_file(str(out / f"rank{r}.safetensors")) for r in range(EP)]


@pytest.fixture(scope="module")
def reference():
    """The single-process ep_size=1 model with the same initial weights."""
    from launch.trainer import build_model

    return build_model(model_config(), 1, 0, seed=SEED)


pytestmark = pytest.mark.slow


def test_deepspeed_groups_consecutive_ranks_into_one_expert_parallel_group(ranks):
    assert [int(r["ep_rank"]) for r in ranks] == [0, 1]


def test_each_rank_outputs_equal_single_process_model_on_its_shard(ranks, reference):
    images, tokens = batch()
    reference.train()  # noise off and nothing dropped, so train mode routes deterministically
    for rank, got in enumerate(ranks):
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        with torch.no_grad():
            want = reference(images[mine], tokens[mine])
        torch.testing.assert_close(got["image_features"], want["image_features"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["text_features"], want["text_features"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["logit_scale"], want["logit_scale"])
        assert want["aux_terms"], "the tiny model has MoE layers"
        for name, value in want["aux_terms"].items():
            torch.testing.assert_close(got[f"aux_layer_mean/{name}"], value, atol=1e-5, rtol=1e-4, msg=name)


def test_each_rank_loss_equals_its_rows_of_the_single_process_loss(ranks, reference):
    import torch.nn.functional as F

    images, tokens = batch()
    reference.train()
    with torch.no_grad():
        out = reference(images, tokens)
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    labels = torch.arange(len(images))
    for rank, got in enumerate(ranks):
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        want = (F.cross_entropy(logits[rows], labels[rows]) + F.cross_entropy(logits.T[rows], labels[rows])) / 2
        torch.testing.assert_close(got["loss"], want, atol=1e-5, rtol=1e-5)


def test_caption_positives_on_other_ranks_count_as_in_one_process(ranks, reference):
    from limoe.losses import positives_mask

    images, tokens = batch()
    reference.train()
    with torch.no_grad():
        out = reference(images, tokens)
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    keys = shared_caption_keys()
    positives = positives_mask(keys, keys[:, 0])
    assert positives[3, 0] and positives[4, 0] and positives.sum() == PER_RANK * EP + 2
    per_image = -(positives / positives.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1)
    per_text = -(positives.T / positives.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1)
    # "text" mode: each image's target its own caption, its other captions out of its softmax.
    others = positives & ~torch.eye(len(keys), dtype=torch.bool)
    own_only = -logits.masked_fill(others, float("-inf")).log_softmax(1).diagonal()
    for rank, got in enumerate(ranks):
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        want = (per_image[rows].mean() + per_text[rows].mean()) / 2
        torch.testing.assert_close(got["positives_loss"], want, atol=1e-5, rtol=1e-5)
        want = (own_only[rows].mean() + per_text[rows].mean()) / 2
        torch.testing.assert_close(got["text_mode_loss"], want, atol=1e-5, rtol=1e-5)


def test_one_optimizer_step_equals_single_process_step_on_the_whole_batch(ranks, reference):
    from limoe.checkpoint import EXPERT_KEY, gather_experts
    from limoe.losses import LIMoELoss

    images, tokens = batch()
    reference.train()
    optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
    loss = LIMoELoss("clip")(reference(images, tokens))["loss"]
    loss.backward()
    optimizer.step()
    want = reference.state_dict()

    shards = [{k[len("param/"):]: v for k, v in r.items() if k.startswith("param/")} for r in ranks]
    got = gather_experts(shards)
    assert set(got) == set(want)
    changed = 0
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=1e-5, rtol=1e-4, msg=key)
        if not EXPERT_KEY.match(key):  # replicated weights are identical on both ranks
            torch.testing.assert_close(shards[0][key], shards[1][key], atol=0, rtol=0, msg=key)
        changed += not torch.equal(value, build_initial(key))
    assert changed > len(want) // 2, "the step moved most weights"


def build_initial(key):
    from launch.trainer import build_model

    if not hasattr(build_initial, "state"):
        build_initial.state = build_model(model_config(), 1, 0, seed=SEED).state_dict()
    return build_initial.state[key]


if __name__ == "__main__":
    import argparse

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    run_worker(parser.parse_args().out)
