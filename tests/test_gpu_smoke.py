"""benchmarks/run_gpu.sh, the GPU smoke run: its dry run checks everything but the device."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_dry_run_resolves_the_config_builds_the_commands_and_imports_the_scripts(tmp_path):
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "run_gpu.sh"), "--dry-run", "--out", str(tmp_path),
                           "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    smoke = json.loads((tmp_path / "smoke_dry_run.json").read_text())
    assert smoke["dry_run"] and smoke["failed_phases"] == []
    assert list(smoke["phases"]) == ["tests", "train", "moe_layer", "train_step"]
    assert all(phase["status"] == "ok" for phase in smoke["phases"].values())
    assert sum(smoke["limits_s"].values()) <= 8 * 60
    assert smoke["tests"]["collected"] >= 3  # tests/test_cuda.py
    plan = smoke["train_plan"]
    assert (plan["model"], plan["precision"], plan["ranks"], plan["ep_size"], plan["batch_per_gpu"], plan["steps"]) \
        == ("limoe-b-16", "bf16", 1, 1, 256, 50)
    assert plan["ds_config_bf16"] is True and plan["train_tflop_per_step"] > 10
    assert "deepspeed --num_gpus 1" in (tmp_path / "train.log").read_text()
    assert (tmp_path / "train_config.yaml").is_file()  # the prepared run's config, next to the JSON
    assert "--device cuda --dtype bf16 --d-model 768" in smoke["phases"]["moe_layer"]["command"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_without_a_gpu_the_real_run_says_so_and_exits_0(tmp_path):
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "run_gpu.sh"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0
    assert "torch sees no CUDA device" in done.stdout
    assert not (tmp_path / "smoke.json").exists()
