"""The process side of a run: the process group, device and precision, seeding, the run directory's lock, and
stop signals."""

from __future__ import annotations

import fcntl
import os
import platform
import random
import signal
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from cl_runner.config.schema import Config, DeviceConfig
from cl_runner.core import dist
from cl_runner.core.errors import ConfigError, UserError


class RunInterrupted(BaseException):
    """SIGINT/SIGTERM stopped the run; ``checkpointed``: a checkpoint was written first. A BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` on the way (data or model loading) can swallow it."""

    def __init__(self, signum: int, run_dir: Path, checkpointed: bool = True) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum, self.run_dir, self.checkpointed = signum, run_dir, checkpointed


def resolve_device(cfg: DeviceConfig) -> tuple[torch.device, str]:
    """The torch device and the precision (fp32 | bf16 | fp16) the run will use."""
    kind = cfg.type
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device.type: cuda was requested but no CUDA device is visible (use device=cpu or auto)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device.type: mps was requested but MPS is not available")
    precision = cfg.precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if kind == "cuda" else "fp32"
    if precision == "fp16" and kind != "cuda":
        raise ConfigError(f"device.precision: fp16 needs CUDA (device is {kind}); use fp32 or bf16")
    return torch.device(kind), precision


def join(cfg: Config) -> dist.World:
    """Join the run's process group when ``distributed.kind`` asks for one (torchrun, srun, or a Slurm launcher job
    with several tasks) and return this process's rank; once per process, before the run directory is claimed."""
    use_cuda = resolve_device(cfg.device)[0].type == "cuda"
    return dist.join(cfg.distributed.kind, use_cuda, cfg.distributed.timeout_s)


def autocast_factory(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return partial(torch.autocast, device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def package_versions() -> dict[str, str]:
    """Versions for metrics.json, read from the installed packages' metadata (no import: importing datasets
    only for its version cost 0.6 s); None for one that is not installed (datasets: only tasks with
    ``source=datasets`` need it, and a GPU machine's image may lack it)."""
    from importlib.metadata import PackageNotFoundError, version

    from cl_runner import __version__

    def installed(distribution: str) -> str | None:
        try:
            return version(distribution)
        except PackageNotFoundError:
            return None

    packages = {"torch": "torch", "transformers": "transformers", "datasets": "datasets", "hydra": "hydra-core"}
    return {"cl_runner": __version__, "python": platform.python_version(),
            **{name: installed(distribution) for name, distribution in packages.items()}}


@contextmanager
def run_lock(run_dir: Path):
    """Hold ``<run_dir>/.lock`` for the whole run: a second cl-run on the same directory (or a second run() in this
    process) fails at once and writes nothing (a lock file it had to create is removed again)."""
    key = Path(run_dir).absolute()
    handle, created = _acquire(key)
    try:
        yield
    except UserError:
        if created:  # a refused start leaves the directory as it found it
            (key / ".lock").unlink(missing_ok=True)
        raise
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _acquire(run_dir: Path):
    """Open and flock ``run_dir/.lock``; (file, whether this call created it). A lock file removed by a refused
    start while we waited for it is opened anew, so two processes never hold different inodes of one path."""
    path = run_dir / ".lock"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            created = not path.exists()
            handle = open(path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                raise UserError(f"run directory {run_dir} is in use by another cl-run (lock file {path})") from None
            if path.exists() and os.fstat(handle.fileno()).st_ino == path.stat().st_ino:
                return handle, created
            handle.close()
    except OSError as exc:
        raise UserError(f"run directory {run_dir}: cannot write to it ({exc.strerror or exc})") from None
    raise UserError(f"run directory {run_dir}: its lock file {path} keeps changing; is another cl-run starting?")


@dataclass
class StopRequest:
    """Set by SIGINT/SIGTERM. ``deferred``: the run checkpoints and stops at the next step boundary; otherwise
    (start-up: nothing to checkpoint yet) the signal stops the run in ``run_dir`` at once."""

    signum: int | None = None
    deferred: bool = True
    run_dir: Path | None = None

    def check(self, run_dir: Path) -> None:
        if self.signum is not None:
            raise RunInterrupted(self.signum, run_dir)


@contextmanager
def stop_signals(stop: StopRequest):
    """Route SIGINT/SIGTERM to ``stop`` (see StopRequest); when deferred, a second SIGINT stops at once."""
    def request(signum, frame):
        if not stop.deferred:
            stop.signum = signum  # kept: a library that turns the exception into another one cannot hide it
            raise RunInterrupted(signum, stop.run_dir, checkpointed=False)
        if stop.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.signum = signum

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, request)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
