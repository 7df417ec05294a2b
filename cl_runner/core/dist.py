"""The processes of one run: ``torch.distributed`` started by ``torchrun`` (or ``srun``), and the few collective
operations the rest of cl-runner uses.

One run is N processes (ranks) that train one model. ``world()`` says which rank this process is; with
``distributed=none`` (the default) it is rank 0 of 1 and every helper here is a no-op that returns its input,
so single-process code never branches on anything but ``world().main`` (rank 0 writes the run's files) and
``world().sharded`` (FSDP: every forward is a collective, so every rank must make the same forward calls).

Start: ``torchrun --nproc_per_node=N -m cl_runner distributed=ddp ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; under Slurm without torchrun (``srun`` or Hydra's submitit
launcher with ``tasks_per_node`` > 1) they are derived from ``SLURM_PROCID``, ``SLURM_NTASKS`` and the node list.
The process group uses gloo for CPU tensors and NCCL for CUDA tensors (``cpu:gloo,cuda:nccl``), so host-side
agreement (objects, stop flags) never waits on the GPU stream."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

KINDS = ("none", "ddp", "fsdp")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    kind: str = "none"  # none | ddp | fsdp (the run's distributed.kind)

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes the run's files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.kind != "none"

    @property
    def sharded(self) -> bool:
        """FSDP: parameters are sharded and every forward all-gathers them, on every rank together."""
        return self.kind == "fsdp"


_WORLD = [World()]


def world() -> World:
    return _WORLD[0]


def launch_env() -> dict[str, int] | None:
    """Rank, world size and local rank from torchrun's (or Slurm's) environment; None when not launched so."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return {"rank": int(env["RANK"]), "size": int(env["WORLD_SIZE"]), "local_rank": int(env.get("LOCAL_RANK", 0))}
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return {"rank": int(env["SLURM_PROCID"]), "size": int(env["SLURM_NTASKS"]),
                "local_rank": int(env.get("SLURM_LOCALID", 0))}
    return None


def launch_error(kind: str, nproc_per_node: int | None = None) -> str | None:
    """Why ``kind`` cannot run in this process's environment (one line), or None. ``nproc_per_node``: cl-run
    starts that many processes itself (engine/launch.py), so no launcher environment is needed before it does."""
    found = launch_env()
    if kind != "none" and found is None and nproc_per_node is None:
        return (f"distributed.kind: {kind} needs one process per device: add distributed.nproc_per_node=<devices> "
                f"(cl-run starts them), or start them with torchrun: torchrun --nproc_per_node=<devices> -m cl_runner "
                f"distributed={kind} ... (several nodes: docs/distributed.md)")
    if kind == "none" and found is not None and found["size"] > 1:
        return (f"distributed.kind: none, but {found['size']} processes were started (torchrun/srun); "
                "add distributed=ddp or distributed=fsdp, or start one process")
    return None  # under torchrun/srun, distributed.nproc_per_node is not used: theirs is the count


def printing_rank() -> bool:
    """Whether this process prints a bad input's one line: the first process of its node (torchrun's LOCAL_RANK,
    Slurm's SLURM_LOCALID), or the only one. The others find the same error and stay silent."""
    found = launch_env()
    return found is None or found["local_rank"] == 0


def _slurm_rendezvous() -> None:
    """MASTER_ADDR/MASTER_PORT for a Slurm job started without torchrun: submitit's helper reads the node list."""
    if "MASTER_ADDR" in os.environ:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def join(kind: str, use_cuda: bool, timeout_s: float = 1800.0) -> World:
    """Join the run's process group (once per process) and make ``world()`` this rank; ``kind`` none: rank 0 of 1."""
    import torch
    import torch.distributed as torch_dist

    if kind == "none":
        _WORLD[0] = World()
        return _WORLD[0]
    found = launch_env()
    assert found is not None, launch_error(kind)
    if not torch_dist.is_initialized():
        if "RANK" not in os.environ:
            _slurm_rendezvous()
        if use_cuda:
            torch.cuda.set_device(found["local_rank"])
        backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"
        torch_dist.init_process_group(backend=backend, rank=found["rank"], world_size=found["size"],
                                      timeout=timedelta(seconds=timeout_s))
    _WORLD[0] = World(found["rank"], found["size"], found["local_rank"], kind)
    return _WORLD[0]


def leave() -> None:
    """Leave the process group (end of the process's runs)."""
    import torch.distributed as torch_dist

    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
    _WORLD[0] = World()


def _active() -> bool:
    if world().size <= 1:
        return False
    import torch.distributed as torch_dist

    return torch_dist.is_initialized()


def shard_bounds(n: int, rank: int | None = None, size: int | None = None) -> tuple[int, int]:
    """This rank's contiguous slice ``[start, end)`` of ``n`` items; slice sizes differ by at most one and the
    slices, in rank order, are the items in their original order."""
    rank = world().rank if rank is None else rank
    size = world().size if size is None else size
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not _active():
        return obj
    import torch.distributed as torch_dist

    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not _active():
        return [obj]
    import torch.distributed as torch_dist

    out: list[Any] = [None] * world().size
    torch_dist.all_gather_object(out, obj)
    return out


def all_reduce_max(values: list[float]) -> list[float]:
    """The element-wise maximum over ranks of a short host list (stop flags, counts); a CPU collective."""
    if not _active():
        return list(values)
    import torch
    import torch.distributed as torch_dist

    t = torch.tensor(values, dtype=torch.float64)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return t.tolist()


def all_reduce_sum(tensor):
    """``tensor`` summed over ranks, in place (on its own device: gloo for CPU, NCCL for CUDA); returns it."""
    if _active():
        import torch.distributed as torch_dist

        torch_dist.all_reduce(tensor)
    return tensor


def barrier() -> None:
    if _active():
        import torch.distributed as torch_dist

        torch_dist.barrier()

