"""cl-run's own launcher (``distributed.nproc_per_node=N``): once the config is validated in cl-run's process, the
N worker processes of one node are started through torch's elastic launcher API, the one ``torchrun`` runs on
(``LaunchConfig`` + ``elastic_launch``, standalone rendezvous on localhost). Each worker is ``python -m cl_runner``
with cl-run's own arguments and torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, ...), so it runs exactly
what a torchrun rank runs; the job's exit status is the status of the rank that failed first (2 bad input,
5 disk full, 143 / 130 stopped by SIGTERM / SIGINT), not torchrun's 1, and nothing of torchrun's failure report
is printed: the failing rank has said why in one line.

Several nodes stay with torchrun or srun (docs/distributed.md)."""

from __future__ import annotations

import logging
import os
import sys
import uuid
from pathlib import Path

from cl_runner.core.errors import ConfigError


def processes_to_start(configs: list) -> int | None:
    """How many workers cl-run starts for these jobs (validated Configs): their ``distributed.nproc_per_node``,
    unless a launcher (torchrun, srun) started this process; None: run in this process."""
    from cl_runner.core.dist import launch_env

    counts = {c.distributed.nproc_per_node for c in configs}
    if counts == {None} or launch_env() is not None:
        return None
    if len(counts) > 1:
        raise ConfigError("distributed.nproc_per_node: every job of a sweep started by cl-run runs on the same "
                          f"processes; got {', '.join(sorted(str(n) for n in counts))}")
    count = counts.pop()
    if count == 1 and all(c.distributed.kind == "none" for c in configs):
        return None  # one process of a single-process run: this one
    return count


def start(configs: list, argv: list[str]) -> int | None:
    """Start the workers these validated jobs ask for (``processes_to_start``) with cl-run's arguments ``argv``
    and wait for them: the job's exit status, or None when this process runs the job itself."""
    from cl_runner.engine.runtime import resolve_device

    nproc = processes_to_start(configs)
    if nproc is None:
        return None
    use_cuda = resolve_device(configs[0].device)[0].type == "cuda"
    return launch(nproc, argv, use_cuda)


def resume_processes(cfg, run_dir: Path) -> int | None:
    """``cl-run resume=DIR`` of a distributed run in a plain process: the number of workers to resume it on (the
    saved ``distributed.nproc_per_node``, else the world size its metrics.json recorded), set in ``cfg`` (the saved
    config, not yet validated) so that it validates here; None for a single-process run or under a launcher.
    Raises ConfigError with the command that resumes this directory when the count is not known."""
    from cl_runner.core.dist import launch_env
    from cl_runner.engine.claim import read_metrics

    kind = cfg.distributed.kind
    if kind == "none" or launch_env() is not None:
        return None
    recorded = read_metrics(run_dir).get("distributed") or {}
    count = cfg.distributed.nproc_per_node or (recorded.get("world_size") if isinstance(recorded, dict) else None)
    if not isinstance(count, int) or count < 1:
        raise ConfigError(f"resume: {run_dir} is a distributed={kind} run whose number of processes was not recorded; "
                          f"resume it with: torchrun --nproc_per_node=<devices> -m cl_runner resume={run_dir}")
    cfg.distributed.nproc_per_node = count
    return count


def device_errors(nproc: int, use_cuda: bool) -> str | None:
    """Why ``nproc`` processes cannot start on this node's devices (one line), or None: one CUDA device each."""
    if use_cuda:
        import torch

        count = torch.cuda.device_count()
        if nproc > count:
            return (f"distributed.nproc_per_node: {nproc} processes need one CUDA device each, but {count} "
                    f"{'is' if count == 1 else 'are'} visible; use distributed.nproc_per_node={max(count, 1)}")
    return None


def exit_status(code: int) -> int:
    """A worker's exit code as a shell reports it: a death by signal (negative: ``-signum``) is 128 + signum."""
    return 128 - code if code < 0 else code


def launch(nproc: int, argv: list[str], use_cuda: bool) -> int:
    """Start ``nproc`` workers running ``python -m cl_runner *argv`` on this node and wait for them; returns the
    job's exit status (0, or the first failure's own code). Raises ConfigError when the devices do not fit."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    problem = device_errors(nproc, use_cuda)
    if problem:
        raise ConfigError(problem)
    # the agent's own reports (start-up settings, "Sending process ... closing signal", the failure table): the
    # ranks print their errors themselves, and this process maps the outcome to one exit status
    for name in ["torch.distributed.elastic", *logging.root.manager.loggerDict]:  # each module's has its own level
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    if nproc > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = "1"  # as torchrun does: N processes on one node share its cores
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
        rdzv_backend="c10d", rdzv_endpoint="localhost:0",  # torchrun --standalone: a free port on this host
        max_restarts=0, monitor_interval=0.1, start_method="spawn")
    try:
        elastic_launch(config, sys.executable)("-m", "cl_runner", *argv)
    except ChildFailedError as failed:
        _, first = failed.get_first_failure()
        return exit_status(first.exitcode) or 1
    except SignalException as stopped:  # cl-run itself was signalled: the agent passed it on to the workers
        return 128 + int(stopped.sigval)
    return 0
