"""Training configs, overrides, ds_config, launch command and trainer pieces (no processes started)."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from launch.ds_config import build_ds_config
from launch.launcher import build_command, check_hosts, check_run_dir
from launch.train_config import CONFIG_DIR, ConfigError, check_files, load_config, overrides_from_args

SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def minimal(**sections) -> dict:
    config = {"name": "t", "data": {"train": [{"shards": "unused.tar"}]}}
    config.update(sections)
    return config


@pytest.fixture
def shards(tmp_path):
    from data_pipelines.testing import write_fake_shards

    return write_fake_shards(tmp_path / "shards", num_samples=8, per_shard=4)


def test_shipped_configs_cover_cpu_demo_one_gpu_node_and_multi_node():
    names = {p.stem for p in SHIPPED}
    assert {"cpu-demo", "b16-8gpu", "l16-multinode"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_config_parses_and_gives_a_ds_config(path):
    config = load_config(path)
    ds = build_ds_config(config)
    assert ds["train_micro_batch_size_per_gpu"] == config.train.batch_size
    assert ds["zero_optimization"]["stage"] in (0, 1, 2)
    assert ds["bf16"]["enabled"] == (config.train.precision == "bf16")


def test_cpu_demo_is_limoe_nano_on_two_ranks_with_ep_size_2():
    config = load_config("cpu-demo")
    assert config.preset == "limoe-nano"
    assert (config.parallel.num_procs, config.parallel.ep_size, config.train.precision) == (2, 2, "fp32")
    assert "emoji-google" in config.data.train[0].shards


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.batchsize' \(did you mean 'train\.batch_size'\?\)"):
        load_config(minimal(train={"batchsize": 8}))


def test_unknown_top_level_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown config key 'optimiser'"):
        load_config(minimal(optimiser={"lr": 1.0}))


def test_unknown_model_override_key_is_named_down_to_the_modality():
    with pytest.raises(ConfigError, match=r"'model\.moe\.text\.global_entrpy'"):
        load_config(minimal(model={"preset": "limoe-nano", "moe": {"text": {"global_entrpy": 0.1}}}))


def test_unknown_model_preset_is_named():
    with pytest.raises(ConfigError, match=r"'model\.preset': unknown model 'limoe-nanoo'"):
        load_config(minimal(model={"preset": "limoe-nanoo"}))


def test_wrong_value_type_is_named():
    with pytest.raises(ConfigError, match=r"'optimizer\.lr' must be a number, got 'fast'"):
        load_config(minimal(optimizer={"lr": "fast"}))


@pytest.mark.parametrize("item", ["optimizer.lr=.inf", "optimizer.lr=inf", "optimizer.eps=.nan",
                                  "model.moe.capacity_factor=.inf", "data.augment.scale_min=-.inf"])
def test_non_finite_numbers_are_rejected_naming_the_key(item):
    from launch.train_config import parse_set

    key, value = parse_set(item)
    with pytest.raises(ConfigError, match=rf"'{re.escape(key)}' must be a finite number"):
        load_config(minimal(model={"preset": "limoe-nano"}), [(key, value)])


def test_yaml_exponent_without_a_dot_is_read_as_a_number():
    raw = yaml.safe_load("optimizer: {lr: 1e-3}")  # YAML 1.1 reads this as the string "1e-3"
    assert load_config(minimal(**raw)).optimizer.lr == pytest.approx(1e-3)


def test_model_overrides_reach_the_moe_config():
    text = {"global_entropy": 0.2, "global_entropy_experts": 3}
    config = load_config(minimal(model={"preset": "limoe-nano", "moe": {"capacity_factor": 1.5, "text": text}}))
    moe = config.model.moe
    assert moe.capacity_factor == 1.5 and moe.text.global_entropy == 0.2 and moe.text.global_entropy_experts == 3
    assert moe.image.global_entropy == 0.0  # untouched fields keep the preset's values


@pytest.mark.parametrize("item, path, value", [
    ("model.moe.k=2", ("moe", "k"), 2),
    ("model.moe.text.global_entropy_experts=2", ("moe", "text", "global_entropy_experts"), 2.0),
    ("model.width=64", ("width",), 64),
    ("model.kv_heads=2", ("kv_heads",), 2),
])
def test_set_reaches_any_model_field_through_the_same_parser(item, path, value):
    from launch.train_config import parse_set
    from limoe.config import LIMoEConfig

    model = load_config(minimal(), [parse_set(item)]).model
    assert isinstance(model, LIMoEConfig) and model.name == "limoe-nano"
    node = model
    for part in path:
        node = getattr(node, part)
    assert node == value and type(node) is type(value)


@pytest.mark.parametrize("item, message", [
    ("model.moe.k=two", r"'model\.moe\.k' must be an integer, got 'two'"),
    ("model.widht=64", r"unknown config key 'model\.widht' \(did you mean 'model\.width'\?\)"),
    ("model.moe.text.lod=0.1", r"unknown config key 'model\.moe\.text\.lod' \(did you mean 'model\.moe\.text\.load'\?\)"),
    ("model.moe.k=17", r"'model': moe\.k=17 must be in 1\.\.num_experts=16"),
    ("model.width=130", r"'model': width 130 is not divisible by heads 4"),
    ("model.moe=3", r"'model\.moe' must be a mapping, got 3"),
])
def test_a_bad_model_key_or_value_is_named_like_any_other(item, message):
    from launch.train_config import parse_set

    with pytest.raises(ConfigError, match=message):
        load_config(minimal(), [parse_set(item)])


def test_an_open_clip_preset_gives_the_two_tower_config_and_ignores_routing_keys():
    from limoe.config import TwoTowerConfig

    config = load_config("cpu-demo", [("model.preset", "open_clip-nano"), ("parallel.ep_size", 1),
                                      ("model.width", 64)])
    assert isinstance(config.model, TwoTowerConfig) and config.model.width == 64
    assert config.preset == "open_clip-nano"


def test_the_saved_form_is_the_preset_plus_what_differs_and_loads_back_to_the_same_config():
    config = load_config("b16-8gpu")
    saved = yaml.safe_load(config.to_yaml())
    assert saved["model"] == {"preset": "limoe-b-16", "moe": {
        "image": {"local_entropy": 0.01},
        "text": {"local_entropy": 0.01, "global_entropy": 0.05, "global_entropy_experts": 2.0}}}
    assert load_config(saved) == config
    # A preset named afterwards still decides the model: the saved form holds only the changes.
    assert load_config(saved, [("model.preset", "limoe-b-32")]).model.patch_size == 32


def test_a_run_config_saved_before_the_typed_model_still_loads():
    """config.yaml of an existing run: `model:` held the YAML's overrides as they were given."""
    old = minimal(model={"preset": "limoe-nano", "moe": {"capacity_factor": 1.0, "image": {
        "importance": 0.005, "load": 0.005, "local_entropy": 0.0, "global_entropy": 0.0}, "text": {
        "importance": 0.005, "load": 0.005, "local_entropy": 0.0, "global_entropy": 0.0}}})
    assert load_config(old).model == load_config(minimal()).model


def test_the_tokenizer_decides_vocab_and_context_unless_the_config_set_other_values():
    config = load_config(minimal())
    assert config.model.vocab_size == 4000  # the preset's placeholder
    model = config.fit_tokenizer(1000, 12)
    assert (model.vocab_size, model.context_length) == (1000, 12) and config.model is model
    assert yaml.safe_load(config.to_yaml())["model"] == {"preset": "limoe-nano", "vocab_size": 1000,
                                                         "context_length": 12}
    assert load_config(config.to_dict()).fit_tokenizer(1000, 12) == model  # a resumed run: the same tokenizer
    with pytest.raises(ConfigError, match=r"'model\.vocab_size' is 1000 but the tokenizer has vocab_size=999"):
        load_config(config.to_dict()).fit_tokenizer(999)
    with pytest.raises(ConfigError, match=r"'model\.context_length' is 32 but the tokenizer has context_length=16"):
        load_config(minimal(), [("model.context_length", 32)]).fit_tokenizer(1000, 16)


def test_preset_is_a_key_under_model_only():
    with pytest.raises(ConfigError, match=r"unknown config key 'preset'"):
        load_config(minimal(preset="limoe-b-16"))


def test_ep_size_that_does_not_divide_the_experts_is_rejected():
    with pytest.raises(ConfigError, match=r"'parallel\.ep_size': 3 does not divide the number of experts \(16"):
        load_config(minimal(parallel={"ep_size": 3, "num_procs": 3}))


def test_ep_size_that_does_not_divide_the_world_size_is_rejected():
    with pytest.raises(ConfigError, match=r"'parallel\.ep_size': 4 does not divide the world size 2"):
        load_config(minimal(parallel={"ep_size": 4, "num_procs": 2}))


def test_caption_positives_with_the_sigmoid_loss_is_rejected():
    data = {"train": [{"shards": "unused.tar"}], "caption_positives": True}
    load_config(minimal(data=data))  # the softmax loss: fine
    with pytest.raises(ConfigError, match=r"'data\.caption_positives': needs the softmax loss"):
        load_config(minimal(data=data, model={"preset": "limoe-nano", "loss": "siglip"}))
    assert load_config(minimal(data={**data, "caption_positives": "text"})).data.caption_positives == "text"
    with pytest.raises(ConfigError, match=r"'data\.caption_positives': must be false, true, both or text, got 'images'"):
        load_config(minimal(data={**data, "caption_positives": "images"}))


def test_zero_stage_3_is_rejected_with_the_reason():
    with pytest.raises(ConfigError, match=r"'parallel\.zero_stage': ZeRO stage 3 is not supported with DeepSpeed's native MoE"):
        load_config(minimal(parallel={"zero_stage": 3}))


def test_missing_shards_are_named():
    config = load_config(minimal(data={"train": [{"shards": "/nonexistent/a-{000000..000001}.tar"}]}))
    with pytest.raises(ConfigError, match=r"'data\.train\[0\]\.shards': 2 of 2 shard\(s\) not found: /nonexistent/a-000000\.tar"):
        check_files(config, need_tokenizer=False)


def parse_train_args(argv):
    from launch.cli import build_parser

    return build_parser().parse_args(["train", *argv])


def test_open_clip_style_flags_override_config_keys():
    args = parse_train_args(["--config", "cpu-demo", "--lr", "1e-4", "--wd", "0.05", "--batch-size", "16",
                             "--warmup", "7", "--precision", "bf16", "--seed", "9", "--name", "x", "--logs", "runs",
                             "--train-data", "a.tar::b.tar", "--train-data-upsampling-factors", "1::3",
                             "--grad-checkpointing", "--set", "model.moe.capacity_factor=2",
                             "--set", "parallel.ep_size=4", "--num-gpus", "4", "--resume", "latest"])
    config = load_config(args.config, overrides_from_args(args))
    assert (config.optimizer.lr, config.optimizer.wd, config.train.batch_size) == (1e-4, 0.05, 16)
    assert (config.schedule.warmup, config.train.precision, config.seed, config.name) == (7, "bf16", 9, "x")
    assert config.run_dir == Path("runs/x")
    assert [(s.shards, s.weight) for s in config.data.train] == [("a.tar", 1.0), ("b.tar", 3.0)]
    assert config.train.grad_checkpointing is True
    assert config.model.moe.capacity_factor == 2.0
    assert (config.parallel.ep_size, config.parallel.num_procs) == (4, 4)
    assert args.resume == "latest"


def test_set_of_an_unknown_key_is_named():
    args = parse_train_args(["--config", "cpu-demo", "--set", "train.stpes=5"])
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.stpes'"):
        load_config(args.config, overrides_from_args(args))


def test_bad_config_fails_before_launch_naming_the_key(tmp_path, monkeypatch, capsys):
    from launch.cli import main

    def no_launch(*args, **kwargs):
        raise AssertionError("a process was started")

    monkeypatch.setattr(subprocess, "Popen", no_launch)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(minimal(logs=str(tmp_path / "logs"), parallel={"ep_size": 3, "num_procs": 2})))
    assert main(["train", "--config", str(bad)]) == 2
    assert "'parallel.ep_size'" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()


def test_missing_shards_fail_before_launch(tmp_path, monkeypatch, capsys):
    from launch.cli import main

    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a process was started"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(minimal(logs=str(tmp_path / "logs"),
                                          data={"train": [{"shards": str(tmp_path / "none.tar")}]})))
    assert main(["train", "--config", str(bad)]) == 2
    assert "'data.train[0].shards'" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["--dry-run", "--prepare-only"])
@pytest.mark.parametrize("damage", ["not a model", "bad sidecar"])
def test_a_damaged_tokenizer_file_fails_the_checks_before_launch(tmp_path, shards, monkeypatch, capsys, mode, damage,
                                                                tiny_tokenizer):
    from launch.cli import main

    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a process was started"))
    tokenizer = tmp_path / "tokenizer.model"
    tiny_tokenizer.save(tokenizer)
    if damage == "not a model":
        tokenizer.write_bytes(b"garbage\n" * 10)
    else:
        Path(f"{tokenizer}.json").write_text("{")
    args = ["train", "--config", "cpu-demo", "--train-data", str(Path(shards[0]).parent), "--logs",
            str(tmp_path / "logs"), "--name", "demo", "--tokenizer", str(tokenizer), mode]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 'data.tokenizer': ") and str(tokenizer) in err and len(err.splitlines()) == 1
    assert ("not a SentencePiece model" if damage == "not a model" else "not a tokenizer sidecar") in err


def test_dry_run_prints_the_deepspeed_command_and_writes_nothing(tmp_path, shards, capsys):
    from launch.cli import main

    args = ["train", "--config", "cpu-demo", "--train-data", str(Path(shards[0]).parent), "--logs",
            str(tmp_path / "logs"), "--name", "demo", "--dry-run"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"deepspeed --num_gpus 2 --master_port \d+ ", out)
    assert f"launch/train.py --config {tmp_path / 'logs' / 'demo' / 'config.yaml'}" in out
    assert "DS_ACCELERATOR=cpu" in out and "OMP_NUM_THREADS=" in out and "OMP_WAIT_POLICY=PASSIVE" in out
    assert not (tmp_path / "logs").exists()


def test_ranks_get_a_share_of_the_cores_and_passive_openmp_waiting_unless_the_user_chose(monkeypatch):
    import os

    from launch.launcher import launch_env

    config = load_config(minimal(parallel={"num_procs": 2, "accelerator": "cpu"}))
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = launch_env(config)
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert env["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert (launch_env(config)["OMP_WAIT_POLICY"], launch_env(config)["OMP_NUM_THREADS"]) == ("ACTIVE", "3")


def test_multi_node_command_names_hostfile_nodes_and_master(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=8\nnode-b slots=8  # second node\n")
    config = load_config(minimal(parallel={"num_nodes": 2, "num_procs": 8, "ep_size": 8, "hostfile": str(hostfile),
                                           "master_addr": "node-a", "master_port": 6000},
                                 model={"preset": "limoe-b-16"}))
    check_hosts(config)
    cmd = build_command(config, Path("logs/t/config.yaml"), resume="latest")
    joined = " ".join(cmd)
    assert f"--hostfile {hostfile} --num_nodes 2 --num_gpus 8 --master_port 6000 --master_addr node-a" in joined
    assert joined.endswith("launch/train.py --config logs/t/config.yaml --resume latest")
    slurm = build_command(config, Path("logs/t/config.yaml"), node_rank=1)
    assert "--no_ssh --node_rank 1" in " ".join(slurm)


def test_hostfile_with_too_few_nodes_or_slots_is_named(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=4\n")
    too_many_nodes = load_config(minimal(parallel={"num_nodes": 2, "num_procs": 2, "hostfile": str(hostfile)}))
    with pytest.raises(ConfigError, match=r"'parallel\.num_nodes': 2 nodes but .* lists 1"):
        check_hosts(too_many_nodes)
    too_many_procs = load_config(minimal(parallel={"num_procs": 8, "hostfile": str(hostfile)}))
    with pytest.raises(ConfigError, match=r"'parallel\.num_procs': 8 processes per node but node-a has slots=4"):
        check_hosts(too_many_procs)


def test_several_nodes_without_a_hostfile_is_an_error():
    with pytest.raises(ConfigError, match=r"'parallel\.hostfile'"):
        check_hosts(load_config(minimal(parallel={"num_nodes": 2, "num_procs": 2})))


def test_ds_config_takes_batch_accumulation_clip_precision_and_stage_from_the_config():
    config = load_config(minimal(train={"batch_size": 12, "accum_freq": 3, "grad_clip": 0.5, "precision": "bf16"},
                                 parallel={"zero_stage": 2}))
    ds = build_ds_config(config)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (12, 3, 0.5)
    assert ds["bf16"]["enabled"] is True and ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["overlap_comm"] is True  # stage_keys of bf16 at stage 2


def test_ds_config_template_that_disagrees_with_the_config_names_both_keys(tmp_path):
    template = tmp_path / "ds.json"
    template.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": "auto"}}))
    config = load_config(minimal(train={"batch_size": 8}, parallel={"ds_config": str(template)}))
    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu=4 but 'train\.batch_size' gives 8"):
        build_ds_config(config)


def test_ds_config_template_with_its_own_optimizer_is_rejected(tmp_path):
    template = tmp_path / "ds.json"
    template.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match=r"sets 'optimizer'"):
        build_ds_config(load_config(minimal(parallel={"ds_config": str(template)})))


# What the four former templates (launch/ds_configs/{cpu-fp32,gpu-bf16}-zero{1,2}.json, stage 0 using
# zero1) gave, computed with that code before it was replaced by one template and stage_keys.
DS_COMMON = {"steps_per_print": 1000000000, "wall_clock_breakdown": False}
BF16_BUCKETS = {"reduce_bucket_size": 500000000, "allgather_bucket_size": 500000000}
ZERO2 = {"contiguous_gradients": True, "reduce_scatter": True}
FORMER_TEMPLATES = {
    "fp32-zero0": {"gradient_clipping": 0.0, "bf16": {"enabled": False}, "zero_optimization": {"stage": 0}},
    "fp32-zero1": {"gradient_clipping": 1.0, "bf16": {"enabled": False}, "zero_optimization": {"stage": 1}},
    "fp32-zero2": {"gradient_clipping": 1.0, "bf16": {"enabled": False},
                   "zero_optimization": {"stage": 2, **ZERO2, "overlap_comm": False}},
    "bf16-zero0": {"gradient_clipping": 0.0, "bf16": {"enabled": True}, "communication_data_type": "fp32",
                   "zero_optimization": {"stage": 0, **BF16_BUCKETS}},
    "bf16-zero1": {"gradient_clipping": 1.0, "bf16": {"enabled": True}, "communication_data_type": "fp32",
                   "zero_optimization": {"stage": 1, **BF16_BUCKETS}},
    "bf16-zero2": {"gradient_clipping": 1.0, "bf16": {"enabled": True}, "communication_data_type": "fp32",
                   "zero_optimization": {"stage": 2, **ZERO2, "overlap_comm": True, **BF16_BUCKETS}},
}
FORMER_SHIPPED = {
    "cpu-demo": {"train_micro_batch_size_per_gpu": 64, "gradient_accumulation_steps": 1,
                 **FORMER_TEMPLATES["fp32-zero1"]},
    "b16-8gpu": {"train_micro_batch_size_per_gpu": 256, "gradient_accumulation_steps": 1,
                 **FORMER_TEMPLATES["bf16-zero1"]},
    "l16-multinode": {"train_micro_batch_size_per_gpu": 128, "gradient_accumulation_steps": 2,
                      **FORMER_TEMPLATES["bf16-zero2"]},
}


@pytest.mark.parametrize("case", FORMER_TEMPLATES)
def test_default_ds_config_of_each_precision_and_stage_is_what_the_former_templates_gave(case):
    precision, stage = case.split("-zero")
    config = load_config(minimal(train={"precision": precision, "grad_clip": 1.0 if int(stage) else 0.0},
                                 parallel={"zero_stage": int(stage)}))
    expected = {"train_micro_batch_size_per_gpu": 32, "gradient_accumulation_steps": 1, **FORMER_TEMPLATES[case]}
    assert build_ds_config(config) == {**expected, **DS_COMMON}


@pytest.mark.parametrize("name", FORMER_SHIPPED)
def test_ds_config_of_each_shipped_config_is_what_the_former_templates_gave(name):
    assert build_ds_config(load_config(name)) == {**FORMER_SHIPPED[name], **DS_COMMON}


def test_run_directory_with_checkpoints_needs_resume(tmp_path):
    config = load_config(minimal(logs=str(tmp_path)))
    (config.run_dir / "checkpoints" / "step_00000010").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"already has checkpoints or metrics; continue it with --resume latest"):
        check_run_dir(config, resume=None)
    check_run_dir(config, resume="latest")


# -- trainer pieces ---------------------------------------------------------------------


def tiny_model_config(**model):
    return load_config(minimal(model={"preset": "limoe-nano", "width": 32, "depth": 2, "heads": 2, "mlp_dim": 64,
                                      "embed_dim": 16, "image_size": 16, "patch_size": 4, "vocab_size": 50,
                                      "context_length": 8, **model})).model


@pytest.mark.parametrize("image_pool, pool_param", [("map", "image_pool.probe"), ("cls", "image_cls")])
def test_no_weight_decay_on_norms_biases_embeddings_and_logit_scale(image_pool, pool_param):
    from launch.trainer import build_model, optimizer_param_groups

    model = build_model(tiny_model_config(image_pool=image_pool), 1, 0, seed=0)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = optimizer_param_groups(model, weight_decay=0.1)
    assert all("name" in g for g in groups)
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.1 for p in g["params"]}
    assert {"logit_scale", "token_embed.weight", "image_pos", "text_pos", pool_param,
            "blocks.0.norm1.weight", "blocks.0.attn.q.bias",
            "blocks.1.mlp.deepspeed_moe.experts.deepspeed_experts.0.fc1.bias"} <= no_decay
    assert {"blocks.0.attn.q.weight", "patch_embed.weight", "image_proj.weight", "blocks.1.mlp.deepspeed_moe.gate.wg.weight",
            "blocks.1.mlp.deepspeed_moe.experts.deepspeed_experts.0.fc1.weight"} <= decay
    assert len(no_decay) + len(decay) == len(names)
    # Expert parameters sit in groups of their own, as DeepSpeed's MoE optimizer wrapping requires.
    moe_groups = [g for g in groups if g.get("moe")]
    assert moe_groups and all(g["name"] == "ep_size_1" for g in moe_groups)
    assert all("deepspeed_experts" in names[id(p)] for g in moe_groups for p in g["params"])


def test_learning_rate_warms_up_linearly_then_decays_by_cosine():
    from launch.trainer import warmup_cosine

    lrs = [warmup_cosine(step, warmup=4, total=20, lr=1.0, min_lr=0.1) for step in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[4] == pytest.approx(1.0) and warmup_cosine(20, 4, 20, 1.0, 0.1) == pytest.approx(0.1)


def test_initial_weights_do_not_depend_on_ep_size():
    from launch.trainer import build_model
    from limoe.checkpoint import gather_experts

    config = tiny_model_config()
    full = build_model(config, 1, 0, seed=5).state_dict()
    shards = [build_model(config, 2, ep_rank, seed=5).state_dict() for ep_rank in range(2)]
    gathered = gather_experts(shards)
    assert gathered.keys() == full.keys()
    assert all(torch.equal(gathered[k], full[k]) for k in full)


def test_checkpoint_pruning_keeps_the_newest(tmp_path):
    from launch.checkpoints import Checkpoints
    from launch.resume import Layout

    checkpoints = Checkpoints(tmp_path, keep=2, rank=0, layout=Layout(1, 1, 0))
    for step in (5, 10, 15, 20):
        (checkpoints.dir / Checkpoints.tag(step)).mkdir(parents=True)
    checkpoints.prune(current=Checkpoints.tag(20))
    assert sorted(p.name for p in checkpoints.dir.iterdir()) == ["step_00000015", "step_00000020"]


def test_resumed_metrics_drop_records_past_the_checkpoint_into_a_side_file(tmp_path):
    from launch.run_log import RunLog

    lines = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 8)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines) + '{"step": 8, "lo')  # torn last line
    RunLog(tmp_path, start_step=5, total_steps=10, enabled=False)._drop_records_after(5)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    discarded = (tmp_path / "metrics.discarded.jsonl").read_text()
    assert '"step": 6' in discarded and '"step": 7' in discarded and '{"step": 8, "lo' in discarded


def test_ranks_started_by_hand_need_a_run_name():
    """Every rank resolves the config itself, so a timestamp name could differ between them."""
    with pytest.raises(ConfigError, match=r"'name': required when train.py is started directly"):
        load_config(minimal(name=None), fill_name=False)
    assert load_config(minimal(name=None)).name.endswith("-limoe-nano")


def test_augmentation_is_off_on_or_given_field_by_field():
    from launch.train_config import augment_config

    assert (augment_config(False).scale_min, augment_config(False).scale_max) == (1.0, 1.0)
    assert augment_config(True).scale_min < 1.0
    assert load_config(minimal(data={"train": [{"shards": "a.tar"}], "augment": {"hflip": True}})).data.augment == {"hflip": True}
    with pytest.raises(ConfigError, match=r"unknown config key 'data\.augment\.flip'"):
        load_config(minimal(data={"train": [{"shards": "a.tar"}], "augment": {"flip": True}}))


def test_zero_stage_0_needs_gradient_clipping_off():
    with pytest.raises(ConfigError, match=r"'parallel\.zero_stage': stage 0 with train\.grad_clip > 0"):
        load_config(minimal(parallel={"zero_stage": 0}))
    assert load_config(minimal(parallel={"zero_stage": 0}, train={"grad_clip": 0.0})).parallel.zero_stage == 0


def test_single_node_runs_get_a_free_master_port_unless_one_is_set(tmp_path, shards):
    from launch.launcher import master_port
    from launch.train_config import load_config

    config = load_config("cpu-demo", [("data.train", [{"shards": str(Path(shards[0]).parent)}])])
    assert config.parallel.master_port is None and master_port(config) != 29500
    config = load_config("cpu-demo", [("parallel.master_port", 6001)])
    assert master_port(config) == 6001


def test_the_stop_message_names_a_checkpoint_only_when_it_was_written():
    from launch.trainer import stop_after_bad_steps_message

    assert "the weights of step 7 (all finite) are in checkpoint step_00000007" in \
        stop_after_bad_steps_message(5, 7, "step_00000007", "step_00000007")
    assert "are not finite and were not saved; the last checkpoint, whose weights were finite, is step_00000004" in \
        stop_after_bad_steps_message(5, 7, None, "step_00000004")


def test_nonfinite_tensors_counts_parameters_holding_nan_or_inf():
    from launch.checkpoints import nonfinite_tensors

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    assert nonfinite_tensors(model) == 0
    with torch.no_grad():
        model[0].weight[1, 2] = float("nan")
        model[1].bias[0] = float("-inf")
    assert nonfinite_tensors(model) == 2


class FakeEngine:
    """What Checkpoints.save uses of a DeepSpeed engine: the module, its device, save_checkpoint."""

    def __init__(self, module):
        self.module, self.device, self.saved = module, torch.device("cpu"), []

    def save_checkpoint(self, folder, tag, client_state, save_latest):
        self.saved.append(tag)
        (Path(folder) / tag).mkdir(parents=True)


def test_a_checkpoint_is_never_written_of_weights_that_are_not_finite(tmp_path, monkeypatch):
    import deepspeed.comm

    from launch import checkpoints as ckpt

    monkeypatch.setattr(ckpt, "all_reduce_sum", lambda values, device: torch.stack(values))  # one rank
    monkeypatch.setattr(deepspeed.comm, "barrier", lambda: None)
    config = tiny_model_config()
    model = torch.nn.Linear(4, 4)
    engine = FakeEngine(model)
    checkpoints = ckpt.Checkpoints(tmp_path, keep=2, rank=0, layout=ckpt.Layout(1, 1, 0))
    assert checkpoints.save(engine, ckpt.TrainState(step=3), config, seed=0) == "step_00000003"
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    assert checkpoints.save(engine, ckpt.TrainState(step=4), config, seed=0) is None
    assert engine.saved == ["step_00000003"] and checkpoints.latest_tag() == "step_00000003"


def test_a_second_signal_to_limoe_train_kills_the_job_at_once(tmp_path, capsys):
    """The first SIGTERM is passed to the ranks, which checkpoint; a job that does not stop (here a
    child that ignores SIGTERM, as a stuck rank would) is killed, whole, by the second."""
    import os
    import signal
    import sys
    import threading
    import time

    from launch.launcher import run_command

    started = tmp_path / "started"
    child = ("import pathlib, signal, sys, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
             "pathlib.Path(sys.argv[1]).touch()\ntime.sleep(120)")  # a regression fails after 2 min

    def signal_twice():
        deadline = time.monotonic() + 60  # a hang guard only
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=signal_twice, daemon=True).start()
    returncode, signum = run_command([sys.executable, "-c", child, str(started)], dict(os.environ))
    assert (returncode, signum) == (-signal.SIGKILL, signal.SIGTERM)
    assert "SIGTERM again: killing the ranks without a checkpoint" in capsys.readouterr().err


# ---- evaluators (`evals:`) ---------------------------------------------------------------


def test_evals_are_typed_plug_ins_each_key_parsed_like_any_other():
    from eval.evaluators import Retrieval, Routing, ZeroShot

    config = load_config(minimal(evals={
        "imagenet": {"type": "zeroshot", "every": 100, "data": "in", "classnames": "imagenet", "max_images": 500},
        "coco": {"type": "retrieval", "every": 50, "data": "coco.tar", "batch_size": 16},
        "routing": {"type": "routing", "every": 10, "data": "pairs", "max_pairs": 64, "capacity_factor": 1}}))
    assert config.evals == {
        "imagenet": ZeroShot(every=100, data="in", classnames="imagenet", max_images=500),
        "coco": Retrieval(every=50, data="coco.tar", batch_size=16),
        "routing": Routing(every=10, data="pairs", max_pairs=64, capacity_factor=1.0)}
    assert config.eval.every == 0  # the old section is off unless a config gives it
    saved = yaml.safe_load(config.to_yaml())
    assert saved["evals"]["coco"]["type"] == "retrieval" and "eval" not in saved
    assert load_config(saved) == config


@pytest.mark.parametrize("evals, message", [
    ({"a": {"every": 5, "data": "x"}}, r"'evals\.a\.type' is required: one of zeroshot, retrieval, routing"),
    ({"a": {"type": "zeroshoot"}}, r"'evals\.a\.type': unknown evaluator 'zeroshoot' \(did you mean 'zeroshot'\?\)"),
    ({"a": {"type": "retrieval", "evry": 5}}, r"unknown config key 'evals\.a\.evry' \(did you mean 'evals\.a\.every'\?\)"),
    ({"a": {"type": "routing", "classnames": "x"}}, r"unknown config key 'evals\.a\.classnames'"),
    ({"a": {"type": "zeroshot", "every": "often"}}, r"'evals\.a\.every' must be an integer, got 'often'"),
    ({"a": {"type": "zeroshot", "every": 5}}, r"'evals\.a\.data': every > 0 needs data"),
    ({"a": {"type": "zeroshot", "every": -1}}, r"'evals\.a\.every': must be >= 0, got -1"),
    ({"a": {"type": "retrieval", "max_images": 0}}, r"'evals\.a\.max_images': must be >= 1 or null"),
    ({"a": {"type": "routing", "capacity_factor": 0}}, r"'evals\.a\.capacity_factor': must be > 0"),
    ({"a/b": {"type": "zeroshot"}}, r"'evals\.a/b': an evaluator's name must be"),
    ({"a": "zeroshot"}, r"'evals\.a' must be a mapping with a 'type' key"),
    (["zeroshot"], r"'evals' must be a mapping"),
])
def test_a_bad_evaluator_is_named_by_its_dotted_key(evals, message):
    with pytest.raises(ConfigError, match=message):
        load_config(minimal(evals=evals))


def test_subword_sampling_is_a_fraction_and_needs_a_sentencepiece_tokenizer(tmp_path):
    from launch.launcher import check_tokenizer
    from limoe.tokenizer import BPETokenizer

    with pytest.raises(ConfigError, match=r"'data\.subword_sampling': must be in \[0, 1\], got 1\.5"):
        load_config(minimal(data={"train": [{"shards": "unused.tar"}], "subword_sampling": 1.5}))
    config = load_config(minimal(data={"train": [{"shards": "unused.tar"}], "subword_sampling": 0.1}))
    path = BPETokenizer().save(tmp_path / "tokenizer.bpe.json")
    with pytest.raises(ConfigError, match=r"'data\.subword_sampling' needs a SentencePiece tokenizer"):
        check_tokenizer(config, path)


def test_routing_evaluation_needs_a_model_with_experts():
    evals = {"r": {"type": "routing", "every": 5, "data": "pairs"}}
    with pytest.raises(ConfigError, match=r"'evals\.r\.type': routing needs a model with experts"):
        load_config(minimal(model={"preset": "limoe-nano-dense"}, evals=evals))


def test_missing_eval_data_is_named_before_launch(tmp_path, shards):
    config = load_config(minimal(data={"train": [{"shards": str(tmp_path / "shards")}]},
                                 evals={"coco": {"type": "retrieval", "every": 5, "data": str(tmp_path / "no")}}))
    with pytest.raises(ConfigError, match=r"'evals\.coco\.data': .*no not found"):
        check_files(config, need_tokenizer=False)


def test_eval_every_flag_sets_every_evaluator_and_set_reaches_one():
    evals = {"a": {"type": "zeroshot", "every": 5, "data": "x"}, "b": {"type": "routing", "data": "y"}}
    args = parse_train_args(["--config", "cpu-demo", "--eval-every", "20", "--set", "evals.b.max_pairs=8"])
    config = load_config(minimal(evals=evals), overrides_from_args(args))
    assert (config.evals["a"].every, config.evals["b"].every, config.evals["b"].max_pairs) == (20, 20, 8)
    every = overrides_from_args(parse_train_args(["--config", "cpu-demo", "--eval-every", "20"]))
    assert load_config("cpu-demo", every).evals["twemoji"].every == 20
    with pytest.raises(ConfigError, match=r"cannot set 'evals\.\*\.every': the config has no 'evals' entries"):
        load_config(minimal(), every)


def test_shipped_configs_evaluate_through_evals():
    assert {name: load_config(name).evals["imagenet"].every for name in ("b16-8gpu", "l16-multinode")} == {
        "b16-8gpu": 5000, "l16-multinode": 5000}
    assert load_config("cpu-demo").evals["twemoji"].every == 0  # off on CPU


def test_the_old_eval_section_still_works_with_its_defaults_and_saved_form(tmp_path, shards):
    """Configs and run directories (config.yaml) from before `evals:`: one zero-shot evaluator,
    templates openai and 1000 images unless set, written back as it was given."""
    config = load_config(minimal(eval={"every": 4, "data": "shards", "batch_size": 8}))
    assert (config.eval.every, config.eval.data, config.eval.batch_size) == (4, "shards", 8)
    assert (config.eval.templates, config.eval.max_images, config.evals) == ("openai", 1000, {})
    saved = yaml.safe_load(config.to_yaml())
    assert "type" not in saved["eval"] and saved["evals"] == {}
    assert load_config(saved) == config
    args = parse_train_args(["--config", "cpu-demo", "--eval-every", "6"])
    assert load_config(minimal(eval={"every": 4, "data": "x"}), overrides_from_args(args)).eval.every == 6
    with pytest.raises(ConfigError, match=r"'eval\.data': every > 0 needs data"):
        load_config(minimal(eval={"every": 4}))
    config.data.train[0].shards = str(tmp_path / "shards")
    with pytest.raises(ConfigError, match=r"'eval\.data': shards not found"):
        check_files(config, need_tokenizer=False)
