"""Shared fixtures: a tiny tokenizer and tiny LIMoE models that build in milliseconds.

The README's test command runs the tests in two pytest-xdist workers (`-n 2` in pyproject's
addopts; `-n 0` runs them in one process). Each test file stays on one worker, so a file's
module-scoped training runs start once (`pytest_xdist_make_scheduler` below).
"""
import collections
import os
import random

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads must not spin on the
#                                                      cores another worker's training ranks are using
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
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:  # the workers share the cores: one worker's torch threads must not crowd out the other's
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))


# Test files that share the session's `two_rank_run` (a 2-rank training run): one worker runs them
# all, so it trains once. pytest_collection_modifyitems checks that no other file uses it.
SHARE_TWO_RANK_RUN = ("test_elastic_resume.py", "test_multinode_localhost.py")


def work_unit(nodeid: str) -> str:
    """The unit of work of a pytest-xdist worker: a whole test file (so a file's module-scoped
    fixtures, its training runs, start once), with the files that share `two_rank_run` as one."""
    name = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    return "two_rank_run" if name in SHARE_TWO_RANK_RUN else name


def pytest_xdist_make_scheduler(config, log):
    """Send each work unit (above) to one worker, in collection order (`--no-loadscope-reorder`
    in pyproject's addopts). pytest-xdist's `--dist loadgroup` would do this with marks, but it
    renames items in a way pytest 9.2 no longer reads, so this subclasses its file scheduler."""
    from xdist.scheduler import LoadScopeScheduling

    class WorkUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return WorkUnits(config, log)


def pytest_collection_modifyitems(config, items):
    """The work units with the most slow tests go first: they are what the two workers should
    share from the start, while the quick files fill in around them."""
    for item in items:
        if "two_rank_run" in item.fixturenames and item.path.name not in SHARE_TWO_RANK_RUN:
            raise pytest.UsageError(f"{item.path.name} uses two_rank_run: add it to SHARE_TWO_RANK_RUN in conftest.py")
    slow = collections.Counter(work_unit(item.nodeid) for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[work_unit(item.nodeid)])  # stable: the order inside a file is kept


TINY = dict(width=32, depth=2, heads=2, mlp_dim=64, embed_dim=16, image_size=16, patch_size=4)
# The tiny sparse models' expert layout: block 0 dense, block 1 MoE with full-width experts and no
# shared expert (limoe-nano's own layout, the last 2 blocks with 256-wide experts, would make both
# of the 2 blocks MoE and the experts wider than the model).
TINY_MOE = dict(num_experts=4, placement="every 2", expert_mlp_dim=0, shared_expert_mlp_dim=0)


def make_tiny_model(tokenizer, seed=0, name="limoe-nano", **overrides):
    """A tiny model of the preset `name`; a sparse one has TINY_MOE's experts unless `moe` says otherwise."""
    torch.manual_seed(seed)
    kw = dict(TINY, vocab_size=tokenizer.vocab_size, context_length=tokenizer.context_length)
    if not name.endswith("-dense"):
        overrides = {**overrides, "moe": {**TINY_MOE, **overrides.get("moe", {})}}
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
    every 4 (both kept), a moving average of the weights (exported in their place). The reference
    of the elastic-resume and multi-node tests, which train the same config
    (test_train_run.tiny_config) in other layouts next to it."""
    from data_pipelines.writer import ShardSetWriter
    from launch.launcher import run_training
    from test_train_run import colour_records, tiny_config

    root = tmp_path_factory.mktemp("two-rank-run")
    with ShardSetWriter(root / "shards", "colours", maxcount=16) as writer:
        for record in colour_records():
            writer.write(record)
    return run_training(tiny_config(root, "reference", train={"batch_size": 8, "accum_freq": 1, "steps": 8,
                                                                  "ema_decay": 0.9},
                                    checkpoint={"every": 4, "keep": 3}))
