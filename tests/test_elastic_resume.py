"""Resuming a checkpoint on another number of ranks, ep_size or ZeRO stage (launch/resume.py).

One source run (conftest's two_rank_run): 2 CPU ranks, ep_size 2, ZeRO 1, fp32, STEPS steps,
a checkpoint at step HALF.
Copies of its run directory are resumed from that checkpoint with `--resume latest` on
other layouts: 1 rank (ep_size 1), 4 ranks with ep_size 2 and 4 (limoe-nano has 4
experts), and 2 ranks with ep_size 1 and ZeRO 2. With 2 ranks each rank draws the same
batches as in the source run, so the resumed losses must be the source run's: a
restarted optimizer or a wrong learning rate would show there at once.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from launch.distributed import free_port
from test_train_run import metrics

STEPS, HALF, BATCH = 8, 4, 8
LAYOUTS = {  # name: (ranks, ep_size, ZeRO stage)
    "2-ranks-ep1-zero2": (2, 1, 2),
    "1-rank": (1, 1, 1),
    "4-ranks-ep2": (4, 2, 1),
    "4-ranks-ep4": (4, 4, 1),
}


@pytest.fixture(scope="module")
def source(two_rank_run):
    assert [r["step"] for r in metrics(two_rank_run)] == list(range(1, STEPS + 1))
    return two_rank_run


def resume_on(source: Path, name: str, ranks: int, ep_size: int, zero_stage: int) -> Path:
    """A copy of the source run, stopped at step HALF, resumed with `ranks` ranks."""
    from launch.launcher import run_training

    run_dir = source.parent / name
    keep = f"step_{HALF:08d}"
    shutil.copytree(source, run_dir, ignore=lambda folder, names: [
        n for n in names if n.startswith("export") or (n.startswith("step_") and n != keep)])
    (run_dir / "checkpoints" / "latest").write_text(keep)
    config = yaml.safe_load((source / "config.yaml").read_text())
    config["name"] = name
    config["parallel"].update(num_procs=ranks, ep_size=ep_size, zero_stage=zero_stage, master_port=free_port())
    return run_training(config, resume="latest")


@pytest.fixture(scope="module")
def resumed_on(source):
    """resumed_on(layout name) -> run directory; each layout runs once per module."""
    done = {}

    def run(name: str) -> Path:
        if name not in done:
            done[name] = resume_on(source, name, *LAYOUTS[name])
        return done[name]
    return run


@pytest.fixture(params=list(LAYOUTS))
def resumed(request, resumed_on):
    return request.param, resumed_on(request.param)


def by_step(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in metrics(run_dir)}


@pytest.mark.slow
def test_resharded_resume_continues_at_the_next_step_with_the_schedule_and_samples_seen(source, resumed):
    name, run_dir = resumed
    ranks = LAYOUTS[name][0]
    reference, records = by_step(source), by_step(run_dir)
    assert sorted(records) == list(range(1, STEPS + 1))
    for step in range(HALF + 1, STEPS + 1):
        assert records[step]["lr"] == pytest.approx(reference[step]["lr"], rel=1e-12)
        assert records[step]["samples_seen"] == reference[HALF]["samples_seen"] + (step - HALF) * BATCH * ranks
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{HALF:08d}'}: step {HALF}, data epoch 1 (+0 batches)" \
        in (run_dir / "out.log").read_text()


@pytest.mark.slow
def test_resharded_resume_carries_the_optimizer_state_over_and_says_so(resumed):
    name, run_dir = resumed
    ranks, ep_size, zero_stage = LAYOUTS[name]
    out_log = (run_dir / "out.log").read_text()
    layout = f"{ranks} rank(s), ep_size {ep_size}, ZeRO {zero_stage}"
    assert f"was written by 2 rank(s), ep_size 2, ZeRO 1; this run has {layout}: resharding" in out_log
    assert re.search(rf"resharded checkpoint .* onto {re.escape(layout)}: fp32 master weights, AdamW moments "
                     rf"and step \({HALF}\) of \d+ parameter\(s\) restored; module weights equal the master weights",
                     out_log)
    assert "STARTS AGAIN" not in out_log


@pytest.mark.slow
def test_export_after_a_resharded_resume_embeds_like_the_training_model(resumed):
    from launch.trainer import read_export_check

    _, run_dir = resumed
    difference, tolerance = read_export_check((run_dir / "out.log").read_text())
    assert difference <= tolerance


@pytest.mark.slow
def test_two_ranks_resumed_with_another_ep_size_and_zero_stage_repeat_the_uninterrupted_losses(source, resumed_on):
    reference, records = by_step(source), by_step(resumed_on("2-ranks-ep1-zero2"))
    for step in range(HALF + 1, STEPS + 1):
        assert records[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-4), step


@pytest.mark.slow
def test_the_weight_average_resumes_on_another_layout_as_if_never_stopped(source, resumed_on, tmp_path):
    """The source keeps a moving average of its weights (train.ema_decay), saved in its checkpoints
    under global expert ids. Resumed on 2 ranks with ep_size 1 and ZeRO 2, which repeat its
    losses, the run exports the same average as the uninterrupted one; and the average is not
    the raw weights, which `limoe export --weights raw` still gives."""
    from safetensors.torch import load_file

    from launch.cli import main

    run_dir = resumed_on("2-ranks-ep1-zero2")
    assert "no weight average" not in (run_dir / "out.log").read_text()
    want, got = (load_file(str(d / "export" / "model.safetensors")) for d in (source, run_dir))
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=key)
    assert json.loads((run_dir / "export" / "config.json").read_text())["metadata"]["weights"] == "ema"
    assert main(["export", "--checkpoint", str(run_dir), "--weights", "raw", "--out", str(tmp_path / "raw")]) == 0
    raw = load_file(str(tmp_path / "raw" / "model.safetensors"))
    moved = [k for k in want if not torch.allclose(raw[k], got[k], rtol=1e-3, atol=1e-5)]
    assert len(moved) > len(want) // 2, moved


@pytest.mark.slow
def test_four_ranks_compute_the_same_after_resharding_whatever_the_ep_size(resumed_on):
    """The same 4 ranks draw the same batches with ep_size 2 and 4: the losses agree."""
    a, b = by_step(resumed_on("4-ranks-ep2")), by_step(resumed_on("4-ranks-ep4"))
    for step in range(HALF + 1, STEPS + 1):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-4), step


@pytest.mark.slow
def test_old_optimizer_files_reassemble_to_the_checkpoint_weights(source):
    """The fp32 master weights put together from the ranks' ZeRO fragments (the resharding's
    source) are, in an fp32 run, exactly the module weights the export gathers."""
    from launch.export import read_checkpoint
    from launch.resume import OldOptimizerState, sorted_zero_files

    folder = source / "checkpoints" / f"step_{HALF:08d}"
    config, weights, _ = read_checkpoint(folder)
    old = OldOptimizerState(sorted_zero_files(folder), ep_size=2, num_experts=config.moe.num_experts)
    assert old.step == HALF
    assert set(old.fragments) == set(weights)
    for name, tensor in weights.items():
        torch.testing.assert_close(old.read(name, "fp32", 0, tensor.numel()).view_as(tensor), tensor, rtol=0, atol=0)
        assert torch.isfinite(old.read(name, "exp_avg_sq", 0, tensor.numel())).all()


def test_expert_names_are_renumbered_to_global_ids():
    from launch.resume import global_name

    name = "blocks.1.mlp.deepspeed_moe.experts.deepspeed_experts.1.fc1.weight"
    assert global_name(name, ep_rank=1, ep_size=2, num_experts=4) == name.replace("experts.1.", "experts.3.")
    assert global_name(name, ep_rank=0, ep_size=1, num_experts=4) == name
    assert global_name("blocks.1.mlp.deepspeed_moe.gate.wg.weight", 1, 2, 4) == "blocks.1.mlp.deepspeed_moe.gate.wg.weight"


class EngineWithoutZeroFiles:
    """Just enough of a DeepSpeed engine for load_checkpoint's decisions."""

    def __init__(self):
        self.calls = []
        group = {"lr": 1.0}
        self.lr_scheduler = type("Scheduler", (), {"optimizer": type("Opt", (), {"param_groups": [group]})(),
                                                   "get_last_lr": lambda self: [0.25]})()
        self.group = group

    def load_checkpoint(self, load_dir, tag, **kwargs):
        self.calls.append(kwargs)
        return str(Path(load_dir) / tag), {}


def test_a_checkpoint_whose_optimizer_state_cannot_move_resumes_its_weights_with_a_warning(tmp_path, caplog):
    """ZeRO stage 0 writes no ZeRO partition files: the weights and schedule are loaded, the
    optimizer starts again, and the log says so (never silently)."""
    from launch.export import CLIENT_KEY, MODEL_STATES
    from launch.resume import Layout, load_checkpoint

    folder = tmp_path / "checkpoints" / "step_00000004"
    folder.mkdir(parents=True)
    torch.save({"module": {}, CLIENT_KEY: {"world_size": 2, "ep_size": 2, "zero_stage": 0, "step": 4}},
               folder / MODEL_STATES)
    engine = EngineWithoutZeroFiles()
    with caplog.at_level(logging.WARNING, logger="limoe.train"):
        client = load_checkpoint(engine, tmp_path / "checkpoints", "step_00000004", Layout(1, 1, 0), num_experts=4)
    assert client["step"] == 4
    assert engine.calls == [{"load_optimizer_states": False, "load_lr_scheduler_states": True}]
    assert engine.group["lr"] == 0.25  # the scheduler's rate, not the one of step 0
    assert "cannot be resharded" in caplog.text and "STARTS AGAIN" in caplog.text


@pytest.mark.slow
def test_export_of_a_checkpoint_with_a_truncated_average_names_the_file(source, tmp_path, capsys):
    from launch.cli import main
    from launch.ema import EMA_SHARED_FILE

    folder = tmp_path / f"step_{STEPS:08d}"
    shutil.copytree(source / "checkpoints" / folder.name, folder)
    damaged = folder / EMA_SHARED_FILE
    damaged.write_bytes(damaged.read_bytes()[:100])
    assert main(["export", "--checkpoint", str(folder), "--out", str(tmp_path / "out")]) == 1
    assert f"error: {damaged}: unreadable weight-average file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
