"""Experiment tracking: logging.report_to (open_clip's --report-to), TensorBoard and Weights & Biases."""
from __future__ import annotations

import argparse
import json
import struct
import sys
import types

import pytest

from launch.train_config import (ConfigError, add_override_flags, check_files, load_config, overrides_from_args,
                                 report_targets)
from launch.run_log import RunLog

RECORDS = [(1, {"loss": 2.0, "lr": 1e-4, "time": 123.0}), (2, {"loss": 1.5, "lr": 2e-4, "time": 124.0}),
           (3, {"loss": 1.25, "lr": 3e-4, "time": 125.0})]


def config_with(tmp_path, report_to: str, name: str = "run-1"):
    from data_pipelines.testing import write_fake_shards

    write_fake_shards(tmp_path / "shards", num_samples=4, per_shard=4)
    return load_config({"name": name, "logs": str(tmp_path / "logs"), "data": {"train": [{"shards": str(
        tmp_path / "shards")}]}, "logging": {"report_to": report_to}})


def log_records(config, run_dir):
    run_dir.mkdir(parents=True, exist_ok=True)  # the trainer makes it before the RunLog
    run_log = RunLog(run_dir, start_step=0, total_steps=3, enabled=True, config=config)
    for step, metrics in RECORDS:
        run_log.record(step, metrics)
    run_log.close()


@pytest.mark.parametrize("value, targets", [("tensorboard", ["tensorboard"]), ("tensorboard,wandb", ["tensorboard", "wandb"]),
                                            ("wandb", ["wandb"]), ("all", ["tensorboard", "wandb"]), ("none", []),
                                            ("", [])])
def test_report_to_takes_open_clips_forms(value, targets):
    assert report_targets(value) == targets


def test_an_unknown_report_target_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"'logging.report_to': unknown target 'mlflow'"):
        load_config({"name": "t", "data": {"train": [{"shards": "x.tar"}]}, "logging": {"report_to": "mlflow"}})


def test_report_to_and_wandb_project_flags_set_the_logging_keys():
    parser = argparse.ArgumentParser()
    add_override_flags(parser)
    args = parser.parse_args(["--report-to", "tensorboard,wandb", "--wandb-project-name", "emoji"])
    config = load_config({"name": "t", "data": {"train": [{"shards": "x.tar"}]}}, overrides_from_args(args))
    assert (config.logging.report_to, config.logging.wandb_project) == ("tensorboard,wandb", "emoji")


def test_wandb_asked_for_but_not_installed_is_an_error_before_launch(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now fails, as without the package
    config = config_with(tmp_path, "tensorboard,wandb")
    with pytest.raises(ConfigError, match=r"'logging.report_to': wandb is asked for but not installed: pip install"):
        check_files(config, need_tokenizer=False)
    check_files(config_with(tmp_path, "tensorboard"), need_tokenizer=False)  # fine without it


def test_tensorboard_only_starts_no_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    log_records(config_with(tmp_path, "tensorboard"), tmp_path / "run")
    assert list((tmp_path / "run" / "tensorboard").iterdir())
    assert not (tmp_path / "run" / "wandb").exists()


def test_run_log_sends_each_record_to_wandb_with_its_step_and_the_config(tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        def log(self, data, step):
            calls.append(("log", step, data))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return FakeRun()

    teardown = lambda: calls.append(("teardown",))  # noqa: E731
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init, teardown=teardown))
    config = config_with(tmp_path, "wandb")
    log_records(config, tmp_path / "run")
    init_kwargs = calls[0][1]
    assert (init_kwargs["project"], init_kwargs["name"], init_kwargs["id"]) == ("limoe", "run-1", "run-1")
    assert init_kwargs["dir"] == str(tmp_path / "run") and init_kwargs["resume"] == "allow"
    assert init_kwargs["config"]["logging"]["report_to"] == "wandb"
    assert calls[1:] == [("log", step, {k: v for k, v in m.items() if k != "time"}) for step, m in RECORDS] + [
        ("finish",), ("teardown",)]
    assert not (tmp_path / "run" / "tensorboard").exists()
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 3  # always written


# ---- a real offline wandb run ----------------------------------------------------------------------


def wandb_records(path):
    """The protobuf records of a .wandb file (wandb's LevelDB-style log: 7-byte file header, then
    32 KiB blocks of chunks, each with a 7-byte header: crc32, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending, records = path.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_offline_wandb_run_is_written_in_the_run_directory_without_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = config_with(tmp_path, "tensorboard,wandb")
    log_records(config, tmp_path / "run")
    (offline,) = (tmp_path / "run" / "wandb").glob("offline-run-*-run-1")
    records = wandb_records(offline / "run-run-1.wandb")
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.run_id, run.project) == ("run-1", "limoe")
    assert {item.key: json.loads(item.value_json) for item in run.config.update}["name"] == "run-1"
    history = [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [(h["_step"], h["loss"], h["lr"]) for h in history] == [(s, m["loss"], m["lr"]) for s, m in RECORDS]
    assert list((tmp_path / "run" / "tensorboard").iterdir())  # both targets
