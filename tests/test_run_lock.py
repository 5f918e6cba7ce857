"""One job per run directory: the flock in <run>/train.lock (launch/run_lock.py)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from launch.run_lock import HELD_ENV, LOCK_FILE, RunDirectoryBusy, RunLock

REPO = Path(__file__).resolve().parents[1]
HOLDER = ("import sys, time; from launch.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); "
          "print('held', flush=True); time.sleep(120)")


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of tmp_path/run, like a running job."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "held"
        yield run_dir, proc
    finally:
        proc.kill()
        proc.wait()


def test_a_second_job_is_refused_with_the_holders_pid_host_and_start_time(holder):
    run_dir, proc = holder
    with pytest.raises(RunDirectoryBusy) as refused:
        RunLock(run_dir).acquire()
    message = str(refused.value)
    assert f"run directory {run_dir} is in use by pid {proc.pid} on {socket.gethostname()}, started 20" in message
    assert str(run_dir / LOCK_FILE) in message
    with pytest.raises(RunDirectoryBusy):
        RunLock(run_dir).check()


def test_limoe_train_on_a_run_directory_in_use_fails_before_launch(holder, tmp_path, monkeypatch, capsys):
    from data_pipelines.testing import write_fake_shards
    from launch.cli import main

    run_dir, proc = holder
    shards = write_fake_shards(tmp_path / "shards", num_samples=8, per_shard=4)
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a process was started"))
    for mode in (["--dry-run"], ["--prepare-only"], []):
        args = ["train", "--config", "cpu-demo", "--train-data", str(Path(shards[0]).parent), "--logs",
                str(run_dir.parent), "--name", run_dir.name, "--resume", "latest", *mode]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: 'name': run directory {run_dir} is in use by pid {proc.pid} on "), err
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]  # nothing was written


def test_a_lock_left_by_a_killed_job_does_not_block_the_next(holder):
    run_dir, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lock = RunLock(run_dir).acquire()  # the kernel released the flock with the process
    try:
        assert f'"pid": {os.getpid()}' in (run_dir / LOCK_FILE).read_text()
    finally:
        lock.release()
    RunLock(run_dir).check()


def test_the_lock_stays_held_by_the_launcher_process_after_limoe_train_lets_go(tmp_path):
    """limoe train hands its lock to the deepspeed launcher it starts: were limoe train killed, the
    launcher (which waits for the ranks) would still hold it."""
    from launch.launcher import run_command

    started, finish = tmp_path / "started", tmp_path / "finish"
    child = ("import pathlib, sys, time\npathlib.Path(sys.argv[1]).touch()\n"
             "while not pathlib.Path(sys.argv[2]).exists(): time.sleep(0.05)")
    lock = RunLock(tmp_path / "run").acquire()
    result = {}
    thread = threading.Thread(target=lambda: result.update(rc=run_command(
        [sys.executable, "-c", child, str(started), str(finish)], dict(os.environ), pass_fds=(lock.fd,))[0]))
    thread.start()
    try:
        deadline = time.monotonic() + 60  # a hang guard only
        while not started.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        lock.release()  # limoe train's own descriptor is gone
        with pytest.raises(RunDirectoryBusy):
            RunLock(tmp_path / "run").check()
    finally:
        finish.touch()
        thread.join(60)
    assert result["rc"] == 0
    RunLock(tmp_path / "run").check()  # free once the launcher has exited


def test_rank_0_leaves_the_lock_to_limoe_train_when_it_holds_it(tmp_path, monkeypatch):
    from launch.trainer import hold_run_lock

    lock = RunLock(tmp_path).acquire()
    try:
        monkeypatch.setenv(HELD_ENV, str(lock.path))
        assert hold_run_lock(tmp_path) is None
        monkeypatch.delenv(HELD_ENV)
        with pytest.raises(RunDirectoryBusy):  # started by hand while a job runs: refused
            hold_run_lock(tmp_path)
    finally:
        lock.release()
    own = hold_run_lock(tmp_path)
    assert own is not None and own.fd is not None
    own.release()
