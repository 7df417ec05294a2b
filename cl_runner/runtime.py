"""The process side of a run: device and precision, seeding, the run directory's lock, and stop signals."""

from __future__ import annotations

import fcntl
import platform
import random
import signal
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from cl_runner.errors import ConfigError, UserError
from cl_runner.schema import DeviceConfig


class RunInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was written and the run can be resumed."""

    def __init__(self, signum: int, run_dir: Path) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum, self.run_dir = signum, run_dir


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
    import datasets
    import hydra
    import transformers

    from cl_runner import __version__

    return {"cl_runner": __version__, "python": platform.python_version(), "torch": str(torch.__version__),
            "transformers": transformers.__version__, "datasets": datasets.__version__, "hydra": hydra.__version__}


@contextmanager
def run_lock(run_dir: Path):
    """Hold ``<run_dir>/.lock`` for the whole run: a second cl-run on the same directory fails at once."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(f"run directory {run_dir} is in use by another cl-run (lock file {run_dir / '.lock'})") \
            from None
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


@dataclass
class StopRequest:
    """Set by SIGINT/SIGTERM: the run checkpoints and stops at the next step boundary."""

    signum: int | None = None

    def check(self, run_dir: Path) -> None:
        if self.signum is not None:
            raise RunInterrupted(self.signum, run_dir)


@contextmanager
def stop_signals(stop: StopRequest):
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary; a second SIGINT stops at once."""
    def request(signum, frame):
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
