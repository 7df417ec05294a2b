"""device.threads: the policy's choices, its application to a run (fixed and auto, re-checked under load), the
CLI's one-line errors for bad values, and the OpenMP wait policy the CLI sets before torch loads."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from helpers import cl_run, make_config

from cl_runner import cli
from cl_runner.core import checks
from cl_runner.engine import threads
from cl_runner.engine.assembly import build_parts, run_info

M = 1_000_000


@pytest.fixture(autouse=True)
def restore_threads():
    """build_parts changes this process's thread count: put back conftest's single thread afterwards."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("cores", "jobs", "params", "others_busy", "passive", "expected"), [
    (2, 1, 135 * M, 0.0, True, 2),    # quiet machine: every core
    (2, 1, 5 * M, 0.0, True, 2),      # a 5M model too
    (2, 1, 500_000, 0.0, True, 1),    # the tiny model (0.5M, below PARAMS_PER_THREAD): one thread
    (2, 2, 135 * M, 0.0, True, 2),    # two cl-runs side by side, waits sleep: both keep 2 (the floor)
    (2, 2, 135 * M, 0.0, False, 1),   # ... waits spin: one core each
    (2, 1, 135 * M, 1.0, True, 2),    # a busy process beside a run whose waits sleep: load is ignored
    (2, 1, 135 * M, 1.0, False, 1),   # ... whose waits spin: the free core only
    (2, 1, 135 * M, 0.25, False, 2),  # background noise below FREE_MARGIN does not take a core away
    (16, 4, 135 * M, 0.0, True, 4),   # a sweep of 4 jobs on 16 cores: a quarter each
    (16, 16, 135 * M, 0.0, True, 2),  # 16 jobs on 16 cores, waits sleep: the floor of 2
    (16, 1, 8 * M, 0.0, True, 4),     # capped by what the model can use (one thread per PARAMS_PER_THREAD)
    (16, 1, 135 * M, 15.0, False, 1),  # a loaded machine never gets fewer than one thread
    (1, 3, 135 * M, 0.0, True, 1),    # one core: one thread, floor or not
])
def test_choose_threads(cores, jobs, params, others_busy, passive, expected):
    assert threads.choose_threads(cores, jobs, params, others_busy, passive) == expected


@pytest.mark.parametrize(("value", "expected"), [("auto", None), ("AUTO", None), ("3", 3), (4, 4)])
def test_parse_setting(value, expected):
    assert checks.parse_threads(value) == expected


@pytest.mark.parametrize("value", ["0", "many", "-1", "1.5", "True"])
def test_bad_threads_exit_2_with_one_line(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["device=cpu", f"device.threads={value}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.strip().splitlines() == [
        f"cl-run: error: device.threads: expected auto or a positive integer, got '{value}'"]


def test_explicit_threads_are_applied(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # an explicit device.threads beats the environment
    torch.set_num_threads(1)
    parts = build_parts(make_config("device.threads=3"), tmp_path, None)
    assert torch.get_num_threads() == 3
    assert run_info(parts)["cpu_threads"] == 3  # recorded in metrics.json


@pytest.mark.parametrize(("wait", "under_load"), [("ACTIVE", 1), ("PASSIVE", 3)])
def test_auto_follows_the_machine_and_rechecks_it(wait, under_load, tmp_path, monkeypatch):
    """Spinning waiters give cores back when other work arrives; with sleeping ones the count is chosen once (it
    costs little to keep, and a count that drifted with the load would change the run's float sums)."""
    load = {"others": 0.0, "jobs": 1}
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", wait)
    monkeypatch.setattr(threads, "available_cores", lambda: 3)
    monkeypatch.setattr(threads, "PARAMS_PER_THREAD", 1000)  # let the tiny model use every core
    monkeypatch.setattr(threads.CpuMeter, "others_busy", lambda self: load["others"])
    monkeypatch.setattr(threads, "live_runs", lambda: load["jobs"])
    torch.set_num_threads(1)
    parts = build_parts(make_config("device.threads=auto"), tmp_path, None)
    assert torch.get_num_threads() == 3
    load.update(others=2.0, jobs=3)  # other work and two more cl-runs arrive, seen at a re-check (as the model runs)
    monkeypatch.setattr(threads, "RECHECK_S", 0.0)
    batch = parts.ctx.collate(parts.encoded[0].train[:2])
    parts.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert torch.get_num_threads() == under_load


def test_omp_num_threads_counts_as_a_fixed_setting_under_auto(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(1)
    build_parts(make_config("device.threads=auto"), tmp_path, None)
    assert torch.get_num_threads() == 2


def test_live_runs_counts_registered_processes(tmp_path, monkeypatch):
    import fcntl

    monkeypatch.setattr(threads, "REGISTRY", tmp_path / "runs")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "999999999").touch()  # a process that exited: not counted, and cleaned up
    with open(tmp_path / "runs" / "999999998", "a") as other:  # another live cl-run holds its lock
        fcntl.flock(other, fcntl.LOCK_EX)
        assert threads.live_runs() == 1
        mine = threads.register_run()
        try:
            assert threads.live_runs() == 2
        finally:
            mine.close()
    assert threads.live_runs() == 1  # an empty registry still counts this run
    assert not (tmp_path / "runs" / "999999999").exists()


def test_wait_policy_is_passive_unless_the_user_chose(monkeypatch):
    monkeypatch.setattr("cl_runner.core.lazy.is_loaded", lambda name: False)  # as in cl-run, before torch loads
    env: dict[str, str] = {}
    threads.set_wait_policy(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    threads.set_wait_policy(env)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_wait_policy_is_left_alone_once_torch_runs():
    env: dict[str, str] = {}
    threads.set_wait_policy(env)  # torch is loaded in this process: its threads keep the policy they started with
    assert env == {}


def test_cl_run_makes_idle_threads_sleep(tmp_path):
    code = ("import os, sys; from cl_runner import cli; sys.argv = ['cl-run', '--help'];\n"
            "try: cli.main(['--help'])\nexcept SystemExit: pass\nprint('policy', os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert "policy PASSIVE" in out.stdout, out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["auto", "2"])
def test_cli_run_logs_the_thread_count(setting, tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the run's own choice, as users get it
    proc = cl_run("device=cpu", "train.epochs=1", f"device.threads={setting}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = re.findall(r"threads: (\d+) \((auto from \d+ cores|device.threads)", proc.stdout + proc.stderr)
    assert len(lines) == 1
    count, source = int(lines[0][0]), lines[0][1]
    if setting == "auto":
        assert source.startswith("auto") and 1 <= count <= threads.available_cores()
    else:
        assert (count, source) == (2, "device.threads")
