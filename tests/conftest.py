"""Shared fixtures: a tiny tokenizer and tiny LIMoE models that build in milliseconds."""
import random

import pytest
import torch

import launch  # noqa: F401  (sets DS_ACCELERATOR before any test imports deepspeed: launch/deepspeed_compat.py)
import limoe

WORDS = ("red green blue yellow purple orange black white grinning smiling face cat dog heart star "
         "moon sun tree flower car house fish bird hand thumbs up down arrow left right circle square "
         "emoji from smileys and emotion animals nature objects symbols travel places food drink").split()


def tiny_texts(n=400, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))) for _ in range(n)]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return limoe.Tokenizer.train(tiny_texts(), vocab_size=120, context_length=8)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one; benchmarks/run_gpu.sh runs them)")


TINY = dict(width=32, depth=2, heads=2, mlp_dim=64, embed_dim=16, image_size=16, patch_size=4)


def make_tiny_model(tokenizer, seed=0, name="limoe-nano", **overrides):
    """A tiny model of the preset `name`; a sparse one has 4 experts unless `moe` says otherwise."""
    torch.manual_seed(seed)
    kw = dict(TINY, vocab_size=tokenizer.vocab_size, context_length=tokenizer.context_length)
    if not name.endswith("-dense"):
        overrides = {**overrides, "moe": {"num_experts": 4, **overrides.get("moe", {})}}
    kw.update(overrides)
    return limoe.create_model(name, **kw)


@pytest.fixture
def tiny_model(tiny_tokenizer):
    return make_tiny_model(tiny_tokenizer)


@pytest.fixture
def tiny_export(tmp_path, tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer)
    return limoe.save(model, tiny_tokenizer, tmp_path / "export")


@pytest.fixture(scope="session")
def shared_tiny_export(tmp_path_factory, tiny_tokenizer):
    """One tiny export for a whole session (the embedder and serving tests); treat it as read-only."""
    model = make_tiny_model(tiny_tokenizer)
    return limoe.save(model, tiny_tokenizer, tmp_path_factory.mktemp("shared") / "export")


# ---- data pipelines -----------------------------------------------------------


@pytest.fixture(scope="session")
def fake_emoji_tarballs(tmp_path_factory):
    """Offline stand-ins for `npm pack emoji-datasource-{google,twitter}`: {style: path to .tgz}.

    Same 31 entries in both (30 with images, 3 categories, 6 subcategories;
    see data_pipelines/testing.py); point $LIMOE_NPM_TARBALL_DIR at the folder
    of either path to make `limoe data emoji` use them.
    """
    from data_pipelines.testing import make_fake_emoji_tarball

    folder = tmp_path_factory.mktemp("npm")
    return {style: make_fake_emoji_tarball(folder, style) for style in ("google", "twitter")}


# ---- training ------------------------------------------------------------------


@pytest.fixture(scope="session")
def two_rank_run(tmp_path_factory):
    """One tiny training run on 2 CPU ranks (ep_size 2, ZeRO 1, fp32): 8 steps, a checkpoint
    every 4 (both kept). The reference of the elastic-resume and multi-node tests, which
    train the same config (test_train_run.tiny_config) in other layouts next to it."""
    from data_pipelines.writer import ShardSetWriter
    from launch.launcher import run_training
    from test_train_run import colour_records, tiny_config

    root = tmp_path_factory.mktemp("two-rank-run")
    with ShardSetWriter(root / "shards", "colours", maxcount=16) as writer:
        for record in colour_records():
            writer.write(record)
    return run_training(tiny_config(root, "reference", train={"batch_size": 8, "accum_freq": 1, "steps": 8},
                                    checkpoint={"every": 4, "keep": 3}))
