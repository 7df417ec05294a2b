"""How many CPU threads torch uses: ``device.threads`` (``auto``, or a fixed positive number).

Measured on 2-core machines (scripts/bench_threads.py, figures in docs/gpus.md): the collapse under load comes
from OpenMP threads that *spin* while they wait for a sibling the OS has descheduled (20-100x slower steps with
torch's default 2 spinning threads on a loaded machine). With ``OMP_WAIT_POLICY=PASSIVE`` (waiting threads sleep;
``set_wait_policy``, which the CLI calls before torch is imported, because libgomp reads it once, when it loads)
a shared machine costs little, but waking a sleeping thread costs more than a tiny model's operations gain from
it: on a quiet machine the 0.5M tiny model ran 1.7x faster on one thread than on two, a 5M model gained from two.
``auto`` uses

    min(cores available / cl-runs alive on this machine (but at least 2), one thread per PARAMS_PER_THREAD)

chosen once, when the model is built, so that the thread count (and with it the order of float sums) does not
drift with the load during a run. Where waiting threads spin (a user's OMP_WAIT_POLICY), the share has no floor,
``auto`` also keeps to the cores other processes leave free (their CPU time over the last interval from
/proc/stat, ours taken out; not the 1-minute load average, which lags), and the choice is re-checked every
``RECHECK_S`` seconds as the model runs, so a run follows the load as it changes. An explicit
``OMP_NUM_THREADS`` in the environment counts as a fixed value. ``torch.set_num_threads`` takes effect at any
time for the calling thread (OpenMP, MKL and oneDNN all follow it); inter-op threads are left alone (cl-runner
runs no inter-op parallel work).
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cl_runner.core.checks import parse_threads

log = logging.getLogger(__name__)
RECHECK_S = 5.0  # seconds between re-checks of the machine's load (auto)
FREE_MARGIN = 0.3  # a core counts as free when other processes use less than 1 - FREE_MARGIN of it
PARAMS_PER_THREAD = 2_000_000  # at most a thread per 2M parameters: the 0.5M tiny model runs 1.7x faster on one
#                                thread than on two sleeping-waiting ones on a quiet machine, a 5M one gains from 2
PASSIVE_FLOOR = 2  # threads a run sharing the machine keeps when waits sleep (measured: never slower than 1)
MIN_WINDOW_S = 0.2  # shortest interval the load is measured over
REGISTRY = Path(tempfile.gettempdir()) / f"cl-runner-{os.getuid()}" / "runs"


def available_cores() -> int:
    """The cores this process may run on (its affinity mask: Slurm's and taskset's limits included)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def choose_threads(cores: int, jobs: int = 1, params: int = 0, others_busy: float = 0.0,
                   passive: bool = True) -> int:
    """The thread count for ``cores`` available cores shared by ``jobs`` cl-runs, a model of ``params``
    parameters, other processes keeping ``others_busy`` cores busy, and OpenMP waits that sleep (``passive``)
    or spin. Sleeping waiters make a little oversubscription cheap, so a shared run keeps ``PASSIVE_FLOOR``."""
    share = cores // max(jobs, 1)
    if passive:
        share, others_busy = max(share, min(cores, PASSIVE_FLOOR)), 0.0
    useful = max(1, params // PARAMS_PER_THREAD)
    free = math.floor(cores - others_busy + FREE_MARGIN)
    return max(1, min(share, useful, free))


def waits_passively(environ: dict[str, str] = os.environ) -> bool:
    """Whether idle OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE when torch loaded) rather than spin."""
    return environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


class CpuMeter:
    """How many cores other processes kept busy since the last reading (from /proc/stat, our own time taken out)."""

    def __init__(self, cpus: set[int] | None = None) -> None:
        self.cpus = cpus if cpus is not None else _affinity()
        self.last = self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        """(busy seconds of our cpus, our process's CPU seconds, monotonic time), None where /proc/stat is not."""
        try:
            lines = Path("/proc/stat").read_text().splitlines()
        except OSError:
            return None
        tick, busy = os.sysconf("SC_CLK_TCK"), 0
        for line in lines:
            name, *values = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in self.cpus:
                user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in values[:8])
                busy += user + nice + system + irq + softirq + steal
        own = os.times()
        return busy / tick, own.user + own.system, time.monotonic()

    def others_busy(self) -> float:
        """Cores used by other processes since the previous call (0.0 when it cannot be measured)."""
        before, now = self.last, self._sample()
        if before is not None and now is not None and now[2] - before[2] < MIN_WINDOW_S:
            time.sleep(MIN_WINDOW_S - (now[2] - before[2]))  # too short a window to measure: wait a little
            now = self._sample()
        self.last = now
        if now is None or before is None:
            return 0.0
        return max(0.0, ((now[0] - before[0]) - (now[1] - before[1])) / (now[2] - before[2]))


def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def live_runs() -> int:
    """cl-runs of this user alive on this machine now (each holds a lock on its file in ``REGISTRY``)."""
    try:
        names = list(REGISTRY.iterdir())
    except OSError:
        return 1
    alive = 0
    for path in names:
        try:
            with open(path, "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path.unlink(missing_ok=True)  # its process is gone
        except BlockingIOError:
            alive += 1
        except OSError:
            continue
    return max(alive, 1)


def register_run() -> Any:
    """Count this process among the live cl-runs until it exits (the returned handle holds the lock)."""
    try:
        REGISTRY.mkdir(parents=True, exist_ok=True)
        handle = open(REGISTRY / str(os.getpid()), "a")
    except OSError:
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


@dataclass
class ThreadPolicy:
    """``device.threads`` for one process: a fixed count, or ``auto`` re-chosen every ``RECHECK_S`` seconds."""

    fixed: int | None
    params: int = 0
    meter: CpuMeter = field(default_factory=lambda: _METER)
    threads: int = 0
    checked: float = -math.inf  # monotonic time of the last choice
    inputs: str = ""  # what the last auto choice was made from, for the log

    def choose(self) -> int:
        if self.fixed is not None:
            return self.fixed
        cores, jobs, passive = available_cores(), live_runs(), waits_passively()
        others = 0.0 if passive else self.meter.others_busy()
        self.inputs = (f"{cores} cores, {jobs} cl-run(s), {self.params / 1e6:.1f}M parameters, "
                       + ("OpenMP waits sleep" if passive else f"OpenMP waits spin, others busy {others:.1f}"))
        return choose_threads(cores, jobs, self.params, others, passive)

    def update(self) -> int:
        """Apply the current choice (cheap between re-checks); returns the thread count in force."""
        now = time.monotonic()
        if now - self.checked >= RECHECK_S:
            self.checked = now
            chosen = self.choose()
            if chosen != self.threads:
                import torch

                torch.set_num_threads(chosen)
                self.threads = chosen
        return self.threads

    def __call__(self, module: Any, args: Any) -> None:  # a forward pre-hook: re-check as the model runs
        self.update()

    def __deepcopy__(self, memo: dict) -> ThreadPolicy:  # a teacher copied from the model shares the policy
        return self


_METER = CpuMeter()  # its first window starts at import, so the first choice needs no wait
_RUN: list[Any] = []  # this process's registry handle, held until exit


def count_this_run(alive: bool = True) -> None:
    """Count this process among the live cl-runs on this machine (until it exits), or stop counting it."""
    while _RUN and not alive:
        handle = _RUN.pop()
        if handle is not None:
            handle.close()
    if alive and not _RUN:
        _RUN.append(register_run())


def apply_threads(setting: Any, model: Any) -> ThreadPolicy:
    """Apply ``device.threads`` to this process for ``model``; ``auto`` keeps re-checking as the model runs."""
    fixed = parse_threads(setting)
    source = "device.threads"
    if fixed is None and os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        fixed, source = int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    count_this_run()
    policy = ThreadPolicy(fixed, params=sum(p.numel() for p in model.parameters()))
    policy.update()
    if fixed is None and not waits_passively():  # spinning waits collapse under load: follow it as it changes
        model.register_forward_pre_hook(policy)
        source = f"auto from {policy.inputs}; re-checked every {RECHECK_S:g} s"
    elif fixed is None:  # chosen once: the count (and so float summation order) does not drift with the load
        source = f"auto from {policy.inputs}; pin device.threads for results independent of the machine"
    log.info("threads: %d (%s)", policy.threads, source)
    return policy


def set_wait_policy(environ: dict[str, str] = os.environ) -> None:
    """Make idle OpenMP threads sleep instead of spinning (unless the user chose); only effective before torch
    is imported, because libgomp reads OMP_WAIT_POLICY once, when it loads (so nothing is set once it has:
    the variable would then claim a policy the running threads do not follow)."""
    from cl_runner.core.lazy import is_loaded

    if not is_loaded("torch"):
        environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
