"""cl-run's own launcher (engine/launch.py) and the ranks' agreement on a refused start (engine/claim.py), without
starting processes: the whole-job runs are in test_distributed.py."""

from __future__ import annotations

import fcntl
import json
import signal
from pathlib import Path

import pytest
from helpers import main_exit, snapshot
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cl_runner import cli
from cl_runner.config.schema import Config
from cl_runner.core import dist
from cl_runner.core.errors import ConfigError, UserError
from cl_runner.engine import launch
from cl_runner.engine.claim import Refused, agreed
from cl_runner.outputs.jobs import read_job


def saved_run(root: Path, *overrides: str, metrics: dict | None = None) -> Path:
    """A run directory as a distributed start leaves it: its config.yaml and, if given, its metrics.json."""
    with initialize_config_dir(str(cli.CONF_DIR), version_base="1.3"):
        text = OmegaConf.to_yaml(compose("config", overrides=list(overrides)), resolve=True)
    root.mkdir()
    (root / "config.yaml").write_text(text)
    if metrics is not None:
        (root / "metrics.json").write_text(json.dumps(metrics))
    return root


@pytest.fixture
def no_launcher_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(("code", "status"), [(2, 2), (5, 5), (143, 143), (-signal.SIGTERM, 143),
                                              (-signal.SIGINT, 130), (-signal.SIGKILL, 137)])
def test_a_workers_exit_code_is_the_jobs_status_as_a_shell_reports_it(code, status):
    assert launch.exit_status(code) == status


def test_the_job_exits_with_the_first_failing_ranks_own_status(monkeypatch):
    """elastic_launch reports every failed rank: the job's status is the one that failed first (rank 1 refused its
    input with 2; the agent then stopped rank 0 with SIGTERM), not torchrun's 1."""
    import torch.distributed.launcher.api as api
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    seen = {}

    def fake_launch(config, entrypoint):
        seen["config"], seen["entrypoint"] = config, entrypoint

        def run(*args):
            seen["args"] = args
            first = ProcessFailure(local_rank=1, pid=11, exitcode=2, error_file="/nonexistent")
            first.timestamp = 1
            later = ProcessFailure(local_rank=0, pid=10, exitcode=-signal.SIGTERM, error_file="/nonexistent")
            later.timestamp = 2
            raise ChildFailedError("cl_runner", {0: later, 1: first})

        return run

    monkeypatch.setattr(api, "elastic_launch", fake_launch)
    assert launch.launch(2, ["distributed=ddp", "distributed.nproc_per_node=2"], use_cuda=False) == 2
    assert seen["args"] == ("-m", "cl_runner", "distributed=ddp", "distributed.nproc_per_node=2")
    config = seen["config"]
    assert (config.nproc_per_node, config.min_nodes, config.max_nodes, config.max_restarts) == (2, 1, 1, 0)
    assert config.rdzv_backend == "c10d" and config.rdzv_endpoint == "localhost:0"  # torchrun --standalone


def test_a_signal_to_cl_run_ends_the_job_with_its_status(monkeypatch):
    """SIGTERM to cl-run while the workers run: torch's agent passes it on to them (they checkpoint and stop) and
    raises SignalException; the job's status is 143, as a single process's."""
    import torch.distributed.launcher.api as api
    from torch.distributed.elastic.multiprocessing.api import SignalException

    def stopped(*args):
        raise SignalException("stopped", sigval=signal.SIGTERM)

    monkeypatch.setattr(api, "elastic_launch", lambda config, entrypoint: stopped)
    assert launch.launch(2, [], use_cuda=False) == 143


def test_more_cuda_workers_than_devices_are_refused_before_any_starts(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"distributed.nproc_per_node: 2 processes need one CUDA device each, but "
                                          r"1 is visible; use distributed.nproc_per_node=1"):
        launch.launch(2, [], use_cuda=True)


def test_under_a_launcher_or_without_a_count_this_process_runs_the_job(monkeypatch, no_launcher_env):
    def config(kind: str, nproc: int | None) -> Config:
        c = Config()
        c.distributed.kind, c.distributed.nproc_per_node = kind, nproc
        return c

    assert launch.processes_to_start([config("ddp", 2)]) == 2
    assert launch.processes_to_start([config("ddp", None)]) is None
    assert launch.processes_to_start([config("none", 1)]) is None
    with pytest.raises(ConfigError, match="every job of a sweep started by cl-run runs on the same processes"):
        launch.processes_to_start([config("ddp", 2), config("ddp", 4)])
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch.processes_to_start([config("ddp", 2)]) is None  # a worker (or a torchrun rank): runs the job


def test_resume_of_a_distributed_run_restarts_it_on_as_many_workers(tmp_path, monkeypatch, capsys, no_launcher_env):
    """cl-run resume=DIR in a plain shell: a run torchrun started (its metrics.json recorded 2 processes) resumes on
    2 workers started by cl-run, with resume=DIR as their only argument; the job's status is theirs."""
    run_dir = saved_run(tmp_path / "run", "distributed=ddp",
                        metrics={"status": "interrupted", "distributed": {"kind": "ddp", "world_size": 2}})
    started = []
    monkeypatch.setattr(launch, "launch", lambda nproc, argv, use_cuda: started.append((nproc, argv, use_cuda)) or 143)
    before = snapshot(tmp_path)
    code, _ = main_exit([f"resume={run_dir}"], capsys)
    assert code == 143 and started == [(2, [f"resume={run_dir}"], False)]
    assert snapshot(tmp_path) == before  # cl-run's own process writes nothing: the workers resume the run
    nproc_run = saved_run(tmp_path / "own", "distributed=fsdp", "distributed.nproc_per_node=3")
    main_exit([f"resume={nproc_run}"], capsys)
    assert started[-1][:2] == (3, [f"resume={nproc_run}"])  # the run's own config says how many


def test_a_killed_rank_0_does_not_leave_a_run_running_for_ever(tmp_path):
    """metrics.json says running, but no process holds the run's lock: cl-report sees an interrupted run."""
    run_dir = saved_run(tmp_path / "run", "distributed=ddp", metrics={"status": "running"})
    (run_dir / ".lock").write_text("")
    assert read_job(run_dir).status == "interrupted"
    with open(run_dir / ".lock", "a+") as handle:  # its cl-run still running: the lock is held
        fcntl.flock(handle, fcntl.LOCK_EX)
        assert read_job(run_dir).status == "running"
    (run_dir / ".lock").unlink()  # no lock file (an older run): metrics.json is all there is
    assert read_job(run_dir).status == "running"


def test_ranks_agree_on_a_refused_start_with_the_first_refusing_ranks_line(monkeypatch):
    """Rank 0 loaded its inputs; rank 1 refused its: rank 0 raises the same refusal (and undoes the start) instead of
    going on until torchrun kills it; a rank that failed unexpectedly makes the others give up as well."""
    monkeypatch.setattr(dist, "_WORLD", [dist.World(0, 2, 0, "ddp")])
    told = {}
    monkeypatch.setattr(dist, "all_gather_objects", lambda mine: [mine, told.get(1)])
    assert agreed(lambda: "parts") == "parts"
    told[1] = ("model.name_or_path: damaged", 2)
    with pytest.raises(Refused, match=r"^rank 1: model.name_or_path: damaged$") as refused:
        agreed(lambda: "parts")
    assert refused.value.exit_code == 2 and refused.value.agreed and isinstance(refused.value, UserError)

    def refuse():
        raise ConfigError("train.max_length: too long")

    with pytest.raises(Refused, match=r"^train.max_length: too long$"):  # rank 0's own line, unprefixed
        agreed(refuse)
    told[1] = ("MemoryError: ", 1)
    with pytest.raises(Refused) as failed:
        agreed(lambda: "parts")
    assert failed.value.exit_code == 1


def test_one_process_loads_without_agreement():
    def load():
        raise ConfigError("bad")

    with pytest.raises(ConfigError):
        agreed(load)
