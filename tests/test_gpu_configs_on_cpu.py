"""The shipped GPU configs, trained on 2 CPU ranks with every setting a CPU allows kept.

launch/configs/b16-8gpu.yaml (bf16, ZeRO 1) and l16-multinode.yaml (bf16, ZeRO 2 with
overlap_comm and contiguous gradients, gradient checkpointing, accumulation 2, two
sources mixed 1:3) are changed only where a 2-core CPU box forces it (`on_cpu` says
which keys and why). The experts run the batched-matmul path CUDA takes
(`train.batched_experts: true`), ep_size equals the number of ranks, the periodic
zero-shot evaluation reads ImageNet-layout shards with the 1000 ImageNet class names, and
each run is stopped with a checkpoint, continued with `--resume latest`, and exported.

bf16 on CPU: DeepSpeed's CPU accelerator supports it, and every piece here runs in it
(the model, ZeRO 1 and 2 with bf16 parameters and fp32 master weights, the checkpoints);
the zero-shot evaluation builds an fp32 copy of the model, as it does on GPU.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from launch.distributed import free_port
from test_train_run import COLOURS, colour_records, metrics

SHIPPED = ("b16-8gpu", "l16-multinode")
STEPS, STOP_AT, EVERY, BATCH = 8, 4, 4, 8
TINY_MODEL = dict(width=32, depth=2, heads=2, mlp_dim=64, embed_dim=16, image_size=16, patch_size=4,
                  context_length=8)
# Every key on_cpu changes (dotted; a section name covers its sub-keys).
CPU_CHANGES = {
    "name", "logs",  # the run directory goes to the test's temporary folder
    *(f"model.{k}" for k in TINY_MODEL),  # a 2-core box trains a 30k-parameter model in seconds, not L/16
    "data.train", "data.tokenizer", "data.tokenizer_vocab_size",  # the test's shards; 40 pieces fit its captions
    "data.workers", "data.shuffle_buffer",  # no spare cores for loader workers; 16-sample shards
    "train.batch_size", "train.steps", "train.log_every",  # a few small steps, each logged
    "train.batched_experts",  # forced on: the path CUDA takes by itself
    "schedule.warmup",  # warmup within the 8 steps
    "parallel.num_procs", "parallel.num_nodes", "parallel.ep_size",  # 2 CPU ranks on one node, ep_size = ranks
    "parallel.accelerator", "parallel.hostfile", "parallel.master_port",  # CPU (gloo), localhost, a free port
    "evals.imagenet.every", "evals.imagenet.data",  # every 4 steps on 16 images
    "evals.imagenet.batch_size", "evals.imagenet.max_images",
    # 7 prompts a class, not 80: 80,000 text forwards per evaluation take 8 s on this CPU
    "evals.imagenet.templates",
    "checkpoint.every",  # a checkpoint within the 8 steps
}


def on_cpu(name: str, root: Path) -> dict:
    """The shipped config `name`, changed only in CPU_CHANGES."""
    from launch.train_config import find_config

    config = yaml.safe_load(find_config(name).read_text())
    config.update(name=name, logs=str(root / "logs"))
    config["model"].update(TINY_MODEL)
    config["data"]["train"] = [{"shards": str(root / "shards"), "weight": src["weight"]}
                               for src in config["data"]["train"]]
    config["data"].update(tokenizer=str(root / "tokenizer.model"), tokenizer_vocab_size=40, workers=0,
                          shuffle_buffer=32)
    config["train"].update(batch_size=BATCH, steps=STEPS, log_every=1, batched_experts=True)
    config["schedule"]["warmup"] = 2
    config["parallel"].update(num_procs=2, num_nodes=1, ep_size=2, accelerator="cpu", hostfile=None,
                              master_port=free_port())
    config["evals"]["imagenet"].update(every=EVERY, data=str(root / "imagenet" / "shards"), templates="simple",
                                       batch_size=16, max_images=None)
    config["checkpoint"]["every"] = EVERY
    return config


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key not in ("moe",):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("name", SHIPPED)
def test_the_cpu_variant_changes_only_what_a_cpu_forces(name, tmp_path):
    from launch.train_config import find_config, load_config

    shipped = flatten(yaml.safe_load(find_config(name).read_text()))
    changed = flatten(on_cpu(name, tmp_path))
    differ = {k for k in shipped.keys() | changed.keys() if shipped.get(k) != changed.get(k)}
    assert differ <= CPU_CHANGES, sorted(differ - CPU_CHANGES)
    for key in ("train.precision", "parallel.zero_stage", "train.grad_checkpointing", "train.accum_freq",
                "train.grad_clip", "model.moe", "evals.imagenet.classnames", "parallel.ds_config"):
        assert changed.get(key) == shipped.get(key), key
    assert changed["parallel.ep_size"] == changed["parallel.num_procs"]
    load_config(on_cpu(name, tmp_path))  # and it passes every pre-launch check


@pytest.mark.parametrize("value", ["auto", True, False])
def test_batched_experts_is_auto_true_or_false(value, tmp_path):
    from launch.train_config import load_config

    config = on_cpu("b16-8gpu", tmp_path)
    config["train"]["batched_experts"] = value
    assert load_config(config).train.batched_experts == value


def test_batched_experts_rejects_other_values_naming_the_key(tmp_path):
    from launch.train_config import ConfigError, load_config

    config = on_cpu("b16-8gpu", tmp_path)
    config["train"]["batched_experts"] = "sometimes"
    with pytest.raises(ConfigError, match=r"'train.batched_experts': must be auto, true or false, got 'sometimes'"):
        load_config(config)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Colour shards for training; ImageNet-layout shards (the first 8 wnids, i.e. tench,
    goldfish, ...) built by `limoe data imagenet`'s builder for the evaluation."""
    from PIL import Image

    from data_pipelines.imagenet import build_imagenet_shards, standard_wnids
    from data_pipelines.writer import ShardSetWriter

    root = tmp_path_factory.mktemp("gpu-configs")
    with ShardSetWriter(root / "shards", "colours", maxcount=16) as writer:
        for record in colour_records():
            writer.write(record)
    val = root / "imagenet-val" / "val"
    for index, (wnid, rgb) in enumerate(zip(standard_wnids(), COLOURS.values())):
        (val / wnid).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), rgb).save(val / wnid / f"ILSVRC2012_val_{2 * index + i:08d}.JPEG")
    build_imagenet_shards(val, root / "imagenet")
    return root


@pytest.fixture(scope="module", params=SHIPPED)
def shipped_run(request, workdir):
    """(config name, run directory, metrics of the first part): stopped at STOP_AT with a
    checkpoint, then continued with --resume latest to the end (checkpoint, export)."""
    from launch.launcher import run_training

    config = on_cpu(request.param, workdir)
    run_dir = run_training(config, [("train.stop_after", STOP_AT)])
    first_part = metrics(run_dir)
    config["parallel"]["master_port"] = free_port()
    run_training(config, resume="latest")
    return request.param, run_dir, first_part


@pytest.mark.slow
def test_loss_falls_below_chance(shipped_run):
    _, run_dir, _ = shipped_run
    losses = [r["contrastive_loss"] for r in metrics(run_dir)]
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < first - 1.0, losses
    assert last < math.log(2 * BATCH), losses  # chance for a global batch of 16 pairs


@pytest.mark.slow
def test_the_run_took_the_gpu_code_paths(shipped_run):
    """bf16, the template's ZeRO options, batched experts, gradient checkpointing where the
    config has it, ep_size = ranks: what DeepSpeed was given and what the ranks logged."""
    from launch.ds_config import stage_keys
    from launch.train_config import load_config

    name, run_dir, _ = shipped_run
    config = load_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
    template = stage_keys("bf16", config.parallel.zero_stage)  # the GPU keys of the default template
    used = yaml.safe_load((run_dir / "ds_config.json").read_text())
    assert config.parallel.ds_config is None and used["communication_data_type"] == "fp32"
    assert used["bf16"] == {"enabled": True}
    assert used["zero_optimization"] == {**template["zero_optimization"], "stage": config.parallel.zero_stage}
    if name == "l16-multinode":
        assert used["zero_optimization"]["overlap_comm"] and used["zero_optimization"]["contiguous_gradients"]
    out_log = (run_dir / "out.log").read_text()
    assert f"2 ranks (ep_size 2, ZeRO {config.parallel.zero_stage}, bf16)" in out_log
    checkpointing = "on" if config.train.grad_checkpointing else "off"
    assert f"experts: batched matmuls; gradient checkpointing {checkpointing}" in out_log
    assert f"x {config.train.accum_freq} accum" in out_log


@pytest.mark.slow
def test_zero_shot_evaluation_ran_on_the_imagenet_shards_every_eval_steps(shipped_run, workdir):
    _, run_dir, _ = shipped_run
    evaluated = {r["step"]: r for r in metrics(run_dir) if "eval/imagenet/top1" in r}
    assert sorted(evaluated) == list(range(EVERY, STEPS + 1, EVERY))
    assert all(0.0 <= r["eval/imagenet/top1"] <= r["eval/imagenet/top5"] <= 1.0 for r in evaluated.values())
    out_log = (run_dir / "out.log").read_text()
    assert out_log.count(f"zero-shot on {workdir / 'imagenet' / 'shards'}") == len(evaluated)


@pytest.mark.slow
def test_resume_latest_continues_at_the_next_step_on_the_schedule(shipped_run):
    from launch.train_config import load_config
    from launch.trainer import warmup_cosine

    _, run_dir, first_part = shipped_run
    assert [r["step"] for r in first_part] == list(range(1, STOP_AT + 1))
    records = metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    config = load_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
    o, s = config.optimizer, config.schedule
    for record in records:  # the rate each step used: the schedule after step - 1 steps
        assert record["lr"] == pytest.approx(warmup_cosine(record["step"] - 1, s.warmup, STEPS, o.lr, s.min_lr))
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{STOP_AT:08d}'}: step {STOP_AT}" \
        in (run_dir / "out.log").read_text()


@pytest.mark.slow
def test_export_embeds_like_the_bf16_training_model(shipped_run):
    """The trainer's own export check passed, and it holds again here: the export (fp32,
    one process) embeds the probe batch as the bf16 expert-parallel model did."""
    from safetensors.torch import load_file

    import limoe
    from launch.trainer import read_export_check

    _, run_dir, _ = shipped_run
    difference, tolerance = read_export_check((run_dir / "out.log").read_text())
    assert difference <= tolerance == 5e-2  # the trainer's tolerance for bf16
    probe = load_file(str(run_dir / "export_probe.safetensors"))
    model, _, _ = limoe.load(run_dir / "export")
    with torch.no_grad():
        image, text = model.encode_image(probe["images"], normalize=True), model.encode_text(probe["tokens"], normalize=True)
    assert (image - probe["image_features"]).abs().max() <= 5e-2
    assert (text - probe["text_features"]).abs().max() <= 5e-2


@pytest.mark.slow
def test_bf16_zero_optimizer_files_reassemble_to_the_module_weights(shipped_run):
    """What elastic resume reads (launch/resume.py): the fp32 master weights put together
    from both ranks' ZeRO fragments, rounded to bf16, are the checkpoint's module weights."""
    from launch.export import read_checkpoint
    from launch.resume import OldOptimizerState, sorted_zero_files

    _, run_dir, _ = shipped_run
    folder = run_dir / "checkpoints" / f"step_{STOP_AT:08d}"
    config, weights, _ = read_checkpoint(folder)
    old = OldOptimizerState(sorted_zero_files(folder), ep_size=2, num_experts=config.moe.num_experts)
    assert old.step == STOP_AT and set(old.fragments) == set(weights)
    for name, tensor in weights.items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(old.read(name, "fp32", 0, tensor.numel()).view_as(tensor).to(torch.bfloat16), tensor), name
