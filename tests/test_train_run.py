"""Training end to end: 2 CPU ranks (gloo), ep_size=2, tiny model, tiny repeated data.

Every run goes through `launch.launcher.run_training` (the function behind
`limoe train`): config checks, tokenizer training, the `deepspeed` launcher,
launch/train.py on each rank, checkpoints, the automatic export.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from launch.distributed import free_port

pytestmark = pytest.mark.slow

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 40),
           "purple": (150, 40, 180), "orange": (250, 140, 20), "black": (10, 10, 10), "white": (245, 245, 245)}
STEPS, EVERY, STOP_AT, BATCH, ACCUM = 24, 8, 12, 8, 2
HAS_WANDB = importlib.util.find_spec("wandb") is not None  # installed by [dev]; optional for the project


def colour_records(per_colour: int = 6):
    """Solid colour squares (a little noise each) captioned by their colour: learnable in a few steps."""
    import io

    import numpy as np
    from PIL import Image

    from data_pipelines.writer import Record

    rng = np.random.default_rng(0)
    records = []
    for name, rgb in COLOURS.items():
        for i in range(per_colour):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 12, (16, 16, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="PNG")
            label = list(COLOURS).index(name)
            records.append(Record(f"{name}/{i}.png", buf.getvalue(), [f"a {name} square", f"{name}"], label))
    return records


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from data_pipelines.writer import ShardSetWriter

    root = tmp_path_factory.mktemp("train")
    with ShardSetWriter(root / "shards", "colours", maxcount=16) as writer:
        for record in colour_records():
            writer.write(record)
        writer.add_file("classnames.txt", "\n".join(COLOURS) + "\n")  # the shards double as zero-shot data
    return root


def tiny_config(root: Path, name: str, **sections) -> dict:
    config = {
        "name": name, "logs": str(root / "logs"), "seed": 3,
        "model": {"preset": "limoe-nano", "width": 32, "depth": 2, "heads": 2, "mlp_dim": 64, "embed_dim": 16,
                  "image_size": 16, "patch_size": 4, "context_length": 8,
                  # limoe-nano's expert layout with its widths at this model's scale (half mlp_dim)
                  "moe": {"expert_mlp_dim": 32, "shared_expert_mlp_dim": 32},
                  "logit_scale_init": 5.0},  # exp(5) = 148 > 100: the clamp must hold it at 100
        "data": {"train": [{"shards": str(root / "shards")}], "tokenizer": str(root / "tokenizer.model"),
                 "tokenizer_vocab_size": 40, "workers": 0, "shuffle_buffer": 32},
        "train": {"batch_size": BATCH, "accum_freq": ACCUM, "steps": STEPS},
        "optimizer": {"lr": 3e-3, "wd": 0.01},
        "schedule": {"warmup": 3},
        "parallel": {"num_procs": 2, "ep_size": 2, "zero_stage": 1, "accelerator": "cpu",
                     "master_port": free_port()},
        "checkpoint": {"every": EVERY, "keep": 2},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    return config


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(workdir):
    """An uninterrupted run of STEPS steps, with zero-shot evaluation every STOP_AT steps."""
    from launch.launcher import run_training

    templates = workdir / "templates.txt"
    templates.write_text("a {} square\n{}\n")  # prompts in the captions' own words
    evaluation = {"every": STOP_AT, "data": str(workdir / "shards"), "templates": str(templates), "max_images": None}
    return run_training(tiny_config(workdir, "full", eval=evaluation))


@pytest.fixture(scope="module")
def resumed_run(workdir, full_run):
    """The same run stopped after STOP_AT steps, then continued with --resume latest; it also
    reports to an offline wandb run where wandb is installed."""
    from launch.launcher import run_training

    config = tiny_config(workdir, "resumed", logging={"report_to": "tensorboard,wandb" if HAS_WANDB else "tensorboard"})
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")  # the ranks inherit it: no account, no network
        env.setenv("WANDB_SILENT", "true")
        stopped = run_training(config, [("train.stop_after", STOP_AT)])
        first_part = metrics(stopped)
        run_dir = run_training(config, resume="latest")
    return run_dir, first_part


def test_loss_goes_down_below_chance(full_run):
    records = metrics(full_run)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    losses = [r["contrastive_loss"] for r in records]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.5, losses
    assert last < math.log(2 * BATCH), f"no better than chance ({math.log(2 * BATCH):.2f}): {losses}"
    assert records[-1]["samples_seen"] == STEPS * ACCUM * 2 * BATCH  # 2 micro-batches per step on 2 ranks


def test_the_ranks_shared_memory_buffers_are_gone_after_the_run(full_run):
    from launch.deepspeed_compat import SHM_BUFFER_PREFIX, SHM_DIR

    port = yaml.safe_load((full_run / "config.yaml").read_text())["parallel"]["master_port"]
    left = [p.name for p in Path(SHM_DIR).glob(f"{SHM_BUFFER_PREFIX}_*_{port}_*")] if Path(SHM_DIR).is_dir() else []
    assert left == []


def test_shm_buffer_cleanup_removes_only_that_jobs_buffers(tmp_path):
    from launch.deepspeed_compat import remove_shm_buffers

    uid = os.getuid()
    names = [f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_41000_0", f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_41000_1",
             f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_41001_0", f"deepspeed_allreduce_buffer_{uid + 1}_127.0.0.1_41000_0",
             "unrelated_41000_0"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert [Path(p).name for p in remove_shm_buffers(41000, rank=1, shm_dir=str(tmp_path))] == [names[1]]
    assert [Path(p).name for p in remove_shm_buffers(41000, shm_dir=str(tmp_path))] == [names[0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])


def test_periodic_zero_shot_evaluation_is_recorded_with_the_step(full_run):
    evaluated = {r["step"]: r for r in metrics(full_run) if "eval/top1" in r}
    assert sorted(evaluated) == [STOP_AT, STEPS]
    for record in evaluated.values():
        assert 0.0 <= record["eval/top1"] <= record["eval/top5"] <= 1.0
    # 8 colour classes, chance is 1/8: the model has learnt the colours by the end.
    assert evaluated[STEPS]["eval/top1"] > 2 / len(COLOURS)


def test_logit_scale_is_clamped_to_its_maximum_after_every_step(full_run):
    assert all(r["logit_scale"] <= 100.0 + 1e-3 for r in metrics(full_run))


def test_checkpoints_keep_the_newest_two_and_latest_names_the_last(full_run):
    checkpoints = full_run / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000016", "step_00000024"]
    assert (checkpoints / "latest").read_text() == "step_00000024"
    # Experts are saved per file: all 4 experts of the one MoE layer, from both ranks.
    names = {p.name for p in (checkpoints / "step_00000024").iterdir()}
    assert {f"layer_0_expert_{e}_mp_rank_00_model_states.pt" for e in range(4)} <= names


def test_resumed_run_continues_at_the_next_step_with_the_same_lr_and_losses(full_run, resumed_run):
    run_dir, first_part = resumed_run
    assert [r["step"] for r in first_part] == list(range(1, STOP_AT + 1))
    resumed = metrics(run_dir)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1)), "metrics.jsonl continues, not restarts"
    reference = {r["step"]: r for r in metrics(full_run)}
    for record in resumed[STOP_AT:]:
        want = reference[record["step"]]
        assert record["lr"] == pytest.approx(want["lr"], rel=1e-9), record["step"]
        assert record["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6), record["step"]
        assert record["contrastive_loss"] == pytest.approx(want["contrastive_loss"], rel=1e-5, abs=1e-6)
    out_log = (run_dir / "out.log").read_text()
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000012'}: step {STOP_AT}" in out_log


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (pip install wandb, or .[dev])")
def test_the_resumed_run_reports_both_parts_to_one_offline_wandb_run(resumed_run):
    from test_tracking import wandb_records

    run_dir, _ = resumed_run
    parts = sorted((run_dir / "wandb").glob("offline-run-*-resumed"))
    assert len(parts) == 2, parts
    logged = {r["step"]: r["loss"] for r in metrics(run_dir)}
    steps = []
    for part in parts:
        records = wandb_records(part / "run-resumed.wandb")
        assert [r.run.run_id for r in records if r.WhichOneof("record_type") == "run"] == ["resumed"]
        history = [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
                   for r in records if r.WhichOneof("record_type") == "history"]
        assert all(h["loss"] == pytest.approx(logged[h["_step"]]) for h in history)
        steps.append([h["_step"] for h in history])
    assert steps == [list(range(1, STOP_AT + 1)), list(range(STOP_AT + 1, STEPS + 1))]


def test_export_embeds_like_the_training_model(full_run):
    """The trainer saved what its ep_size=2 DeepSpeed model computed on a probe batch
    (each rank its half); the export, opened by limoe.load in this one process, agrees."""
    from safetensors.torch import load_file

    import limoe

    probe = load_file(str(full_run / "export_probe.safetensors"))
    model, _, tokenizer = limoe.load(full_run / "export")
    # limoe-nano's expert layout (16 experts and a shared one in the last 2 blocks: both of 2 here)
    assert model.ep_size == 1 and model.config.moe.num_experts == 16 and model.moe_layers()
    assert [b.shared_mlp is not None for b in model.blocks] == [True, True]
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(probe["images"], normalize=True), probe["image_features"],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode_text(probe["tokens"], normalize=True), probe["text_features"],
                                   atol=1e-5, rtol=1e-5)
    assert model.logit_scale.item() <= math.log(100.0) + 1e-6


def test_export_command_writes_the_same_weights(full_run, tmp_path):
    from safetensors.torch import load_file

    from launch.cli import main

    assert main(["export", "--checkpoint", str(full_run), "--out", str(tmp_path / "again")]) == 0
    a, b = load_file(str(full_run / "export" / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_of_a_checkpoint_missing_an_expert_names_it(full_run, tmp_path):
    from launch.export import export_run
    from limoe.checkpoint import ExportError

    broken = tmp_path / "step_00000024"
    shutil.copytree(full_run / "checkpoints" / "step_00000024", broken)
    (broken / "layer_0_expert_3_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(ExportError, match=r"expert weights missing.*deepspeed_experts\.3"):
        export_run(broken, tmp_path / "out")


def kill_tree(proc: subprocess.Popen) -> None:
    """Clean up after a failed test: the launcher and every process under it."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for p in [*children, psutil.Process(proc.pid)] if proc.poll() is None else children:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def wait_for_steps(proc: subprocess.Popen, run_dir: Path, steps: int, timeout: float = 180) -> None:
    """Until the running job has logged `steps` steps; it must still be running then."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").is_file() and len(metrics(run_dir)) >= steps:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read()


def test_sigterm_writes_a_checkpoint_at_the_step_reached_and_exits(workdir):
    # One DataLoader worker per rank: the workers must not die of the signal meant for the ranks.
    # (ZeRO stage 2 here, so its checkpoint path runs too.)
    config = tiny_config(workdir, "interrupted", train={"batch_size": BATCH, "steps": 2000},
                         data={"workers": 1}, parallel={"zero_stage": 2})
    config_path = workdir / "interrupted.yaml"
    config_path.write_text(yaml.safe_dump(config))
    limoe_cli = Path(sys.executable).with_name("limoe")
    proc = subprocess.Popen([str(limoe_cli), "train", "--config", str(config_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    run_dir = workdir / "logs" / "interrupted"
    try:
        wait_for_steps(proc, run_dir, 3)
        from launch.launcher import run_training
        from launch.train_config import ConfigError

        # A second job on the folder while the ranks run is refused, naming the first (see test_run_lock.py).
        with pytest.raises(ConfigError, match=rf"run directory {run_dir} is in use by pid {proc.pid} on "):
            run_training(config, resume="latest")
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        kill_tree(proc)
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    last_step = metrics(run_dir)[-1]["step"]
    assert 3 <= last_step < 2000
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{last_step:08d}"
    assert f"stopped by SIGTERM at step {last_step}" in (run_dir / "out.log").read_text()
    assert "--resume latest" in output


def test_ctrl_c_on_the_printed_deepspeed_command_writes_a_checkpoint(workdir):
    """Ctrl-C in a terminal sends SIGINT to the whole foreground process group: the
    deepspeed launcher, the ranks and their DataLoader workers. The ranks must still
    agree to checkpoint (the workers must not die first and abort them)."""
    from launch.launcher import build_command, command_master_port, launch_env, prepare_run
    from launch.train_config import load_config

    config = load_config(tiny_config(workdir, "ctrl-c", train={"batch_size": BATCH, "steps": 2000},
                                     data={"workers": 1}))
    prepare_run(config)
    cmd = build_command(config, config.run_dir / "config.yaml")
    proc = subprocess.Popen(cmd, env=launch_env(config), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # its own group, like a terminal job
    run_dir = config.run_dir
    try:
        wait_for_steps(proc, run_dir, 3)
        os.killpg(proc.pid, signal.SIGINT)
        proc.communicate(timeout=120)
    finally:
        kill_tree(proc)
    last_step = metrics(run_dir)[-1]["step"]
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{last_step:08d}"
    assert f"stopped by SIGINT at step {last_step}" in (run_dir / "out.log").read_text()
    port = command_master_port(cmd)
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))  # the ranks removed theirs


def test_too_many_non_finite_losses_stop_the_run_with_a_checkpoint(workdir):
    """An absurd learning rate sends the weights to +-1e30 in the first step (finite, so they are
    checkpointed; test_train_config checks that non-finite ones never are); every loss after that
    is non-finite, is skipped and counted, and the run stops."""
    from launch.launcher import TrainingFailed, run_training

    config = tiny_config(workdir, "diverged", optimizer={"lr": 1e30, "wd": 0.0},
                         schedule={"warmup": 0}, train={"batch_size": BATCH, "steps": 50, "max_bad_steps": 3})
    with pytest.raises(TrainingFailed) as failure:
        run_training(config)
    assert failure.value.returncode == 3
    run_dir = workdir / "logs" / "diverged"
    out_log = (run_dir / "out.log").read_text()
    assert "non-finite loss" in out_log and "3 non-finite losses in a row" in out_log
    last_step = metrics(run_dir)[-1]["step"]
    assert f"the weights of step {last_step} (all finite) are in checkpoint step_{last_step:08d}" in out_log
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{last_step:08d}"


def test_the_open_clip_peer_trains_through_the_same_loop_with_its_bpe_tokenizer(workdir):
    """The dense two-tower peer (limoe/two_tower.py) goes through the same launcher, data,
    schedule and export as LIMoE; its tokenizer file is open_clip's BPE, written when missing."""
    import limoe
    from launch.launcher import run_training
    from limoe.two_tower import TwoTowerCLIP

    config = tiny_config(workdir, "peer", parallel={"num_procs": 2, "ep_size": 1},
                         data={"tokenizer": str(workdir / "peer" / "tokenizer.bpe.json")})
    config["model"] = {"preset": "open_clip-nano", "width": 32, "depth": 2, "heads": 2, "mlp_dim": 64,
                       "embed_dim": 16, "image_size": 16, "patch_size": 4, "context_length": 8}
    run_dir = run_training(config)
    losses = [r["contrastive_loss"] for r in metrics(run_dir)]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5, losses
    assert "aux_loss" in metrics(run_dir)[0] and metrics(run_dir)[0]["aux_loss"] == 0.0
    model, _, tokenizer = limoe.load(run_dir / "export")
    assert isinstance(model, TwoTowerCLIP) and isinstance(tokenizer, limoe.BPETokenizer)
    assert "export check: max |training model - export|" in (run_dir / "out.log").read_text()
    assert "ERROR" not in (run_dir / "out.log").read_text()


def test_caption_positives_change_the_loss_and_train_through_the_same_loop(workdir, full_run):
    """data.caption_positives on 2 ranks: the keys travel with the batches to the loss. Every
    colour caption is shared by 6 images, so the first step's loss (same seed, data and weights
    as the full run) differs from plain InfoNCE's, and training still learns."""
    from launch.launcher import run_training

    run_dir = run_training(tiny_config(workdir, "positives", data={"caption_positives": True}))
    plain, positives = metrics(full_run), metrics(run_dir)
    assert positives[0]["step"] == plain[0]["step"] == 1
    assert abs(positives[0]["contrastive_loss"] - plain[0]["contrastive_loss"]) > 1e-3
    losses = [r["contrastive_loss"] for r in positives]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5, losses
    assert "ERROR" not in (run_dir / "out.log").read_text()


def test_read_export_check_finds_the_last_logged_check():
    """The reader is built from the log format itself, so changing one cannot silently break the other."""
    from launch.trainer import EXPORT_CHECK_LOG, read_export_check

    log = "\n".join(["step 1", EXPORT_CHECK_LOG % (1.5e-6, 1e-4), "resumed", EXPORT_CHECK_LOG % (2.25e-3, 1e-4)])
    assert read_export_check(log) == (2.25e-3, 1e-4)
    assert read_export_check("step 1\nstep 2") is None


@pytest.mark.parametrize("workers, ranks", [(0, 1), (1, 2)])
def test_unreadable_training_data_ends_the_whole_job_with_its_error(workdir, workers, ranks):
    """A folder holding one 0-byte shard: every rank's loader gives up. With a DataLoader worker
    (the default) the ranks used to hang for ever in their exit, deaf to SIGINT/SIGTERM."""
    empty = workdir / f"empty-{workers}"
    empty.mkdir()
    (empty / "broken-000000.tar").write_bytes(b"")
    tokenizer = workdir / "colours-tokenizer.model"  # from the good shards: the broken ones have no captions
    if not tokenizer.is_file():
        from data_pipelines.loader import train_tokenizer

        train_tokenizer(str(workdir / "shards"), vocab_size=40, context_length=8).save(tokenizer)
    config = tiny_config(workdir, f"unreadable-{workers}",
                         data={"train": [{"shards": str(empty)}], "workers": workers, "tokenizer": str(tokenizer)},
                         parallel={"num_procs": ranks, "ep_size": ranks})
    config_path = workdir / f"unreadable-{workers}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    limoe_cli = Path(sys.executable).with_name("limoe")
    proc = subprocess.Popen([str(limoe_cli), "train", "--config", str(config_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=600)  # a hang guard only: the job ends seconds after the error
    finally:
        kill_tree(proc)
    assert proc.returncode == 1, output[-3000:]
    where = "in a DataLoader worker: " if workers else ""
    for rank in range(ranks):
        assert f"error: rank {rank}: {where}RuntimeError: no readable samples in 20 shard reads in a row" in output
    last_line = output.rstrip().splitlines()[-1]
    assert last_line.startswith("error: training exited with code 1 (the ranks' errors are above)")
    run_dir = workdir / "logs" / f"unreadable-{workers}"
    assert "fatal error, ending the job: " in (run_dir / "out.log").read_text()
    from launch.run_lock import RunLock

    RunLock(run_dir).check()  # the job is over: its lock is free
