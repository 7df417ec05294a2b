"""Save, find and read back checkpoints: everything a run needs to continue as if it had never stopped.

A checkpoint is a directory ``<run>/checkpoints/ckpt-<number>/`` holding ``model.safetensors`` (weights),
``best.safetensors`` (the best-epoch weights kept so far, if any) and ``state.pt`` (optimizer, scheduler,
GradScaler, strategy state, loop position, RNG states, matrix rows, history), plus ``manifest.json`` listing
every file's size and CRC32. It is written under a temporary name, fsynced and renamed, so a crash leaves
either the whole checkpoint or none. Numbers only grow: the next is 1 + the highest ever used in the run.

Reading one back (``read_checkpoint``) touches no model: a checkpoint whose files differ from its manifest or
fail to load is damaged; the run falls back to the next older one and moves the damaged one to
``checkpoints/damaged/``. Nothing is unpickled: weights load with safetensors, the rest with ``weights_only``.

Distributed runs (``distributed=ddp|fsdp``, any process count) write ``shards/`` instead of the safetensors
files: ``torch.distributed.checkpoint`` (DCP) files in which every rank writes its shard of the weights, the
optimizer state, the best weights and the strategy's DTensors (checkpoint_dcp.py). Rank 0 writes the rest
(``state.pt``, with every rank's RNG state, and ``manifest.json``) once every rank's shards are written, then
renames the directory. How weights are stored (tied weights once, names and shapes that fit) is weights.py's.

Nothing is stored twice. Best weights equal to the current ones (a checkpoint at the end of the best epoch so
far) are not written: ``state.pt`` says ``"best": "model"`` and a resume copies them from the loaded weights.
Best weights that the previous checkpoint already holds (no better epoch since) are hard-linked from it, not
written again (distributed: ``best/``, a DCP directory of its own); each checkpoint directory stays complete.
Strategy state equal to a stored weight (LwF's teacher, EWC's anchor where it is the current weights) is stored in
``state.pt`` as a reference to it (``weights.by_reference``; single process) and put back when read.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from cl_runner.core import dist
from cl_runner.core.files import disk_full_error, is_disk_full
from cl_runner.engine.checkpoint_dcp import (
    read_shards,
    read_strategy_shards,
    shard_shapes,
    write_best_shards,
    write_shards,
)
from cl_runner.engine.run_state import SAVED
from cl_runner.engine.weights import by_reference, copy_weights, resolved, retied, same_weights, untied, unwrap

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
DAMAGED = "damaged"  # checkpoints/damaged/: checkpoints that failed to read back, kept for inspection
STATE_KEYS = ("run", "task", "strategy", "extras", "rng")  # the parts of state.pt a resume reads
SHARDS = "shards"  # distributed checkpoints: the DCP files every rank writes its shards into
BEST_SHARDS = "best"  # distributed checkpoints: the best weights' DCP files (hard-linked while they do not change)
BEST_IS_MODEL = "model"  # state.pt "best": the best weights are the checkpoint's own weights (stored once)


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, number: int, model: torch.nn.Module, state: dict[str, Any],
                    best: dict[str, torch.Tensor] | None, keep_last: int,
                    optimizer: torch.optim.Optimizer | None = None, best_from: Path | None = None
                    ) -> tuple[Path, float]:
    """Write checkpoint ``number`` atomically, drop all but the newest ``keep_last``; returns (path, seconds).
    Out of space: the temporary directory is removed and a ``DiskFullError`` names it and the bytes needed.
    Distributed: every rank calls this together (``optimizer``: the task's, whose state goes to the shards).
    ``best_from``: an earlier checkpoint whose best weights are ``best`` (hard-linked instead of written)."""
    started = time.perf_counter()
    root = Path(run_dir) / CHECKPOINTS
    final = root / checkpoint_name(number)
    tmp = root / f".{final.name}.tmp"
    if best_from is None and same_weights(best, model):
        state, best = {**state, "best": BEST_IS_MODEL}, None
    if dist.world().main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".ckpt-*.tmp"):  # left by a killed write (one run per directory)
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()  # no rank writes into the temporary directory before rank 0 cleared it
    try:
        if dist.world().distributed:
            _write_sharded(tmp, model, state, best, optimizer, best_from)
        else:
            _write_files(tmp, model, state, best, best_from)
        _publish(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(exc):
            raise disk_full_error(tmp, _tensor_bytes([unwrap(model).state_dict(), best, state])) from exc
        raise
    if dist.world().main:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final, time.perf_counter() - started


def _disk_full(exc: BaseException) -> bool:
    """``is_disk_full``, also for DCP's ``CheckpointException`` (which carries every rank's failure)."""
    failures = getattr(exc, "failures", None) or {}
    return is_disk_full(exc) or any(is_disk_full(f[0] if isinstance(f, tuple) else getattr(f, "exception", None))
                                    for f in failures.values())


def _publish(tmp: Path, final: Path) -> None:
    """Rank 0 renames the complete temporary directory to its final name."""
    def rename() -> None:
        os.replace(tmp, final)
        _fsync_dir(final.parent)

    on_main(rename)


def on_main(action: Callable[[], None]) -> None:
    """Run ``action`` on rank 0; every rank waits for it and raises what it raised (a full disk, say), so no
    rank goes on to a collective that rank 0 will never join."""
    if not dist.world().distributed:
        action()
        return
    error = None
    if dist.world().main:
        try:
            action()
        except Exception as exc:
            error = exc
    error = dist.broadcast_object(error)
    if error is not None:
        raise error


def _write_files(tmp: Path, model: torch.nn.Module, state: dict[str, Any],
                 best: dict[str, torch.Tensor] | None, best_from: Path | None) -> None:
    tmp.mkdir()
    save_model(unwrap(model), str(tmp / "model.safetensors"))
    if best is not None and not link_best(best_from, tmp):
        save_file({k: v.contiguous() for k, v in untied(best, model).items()}, str(tmp / "best.safetensors"))
    stored = _shapes(tmp / "model.safetensors").keys()  # the names save_model kept (one of each tied pair)
    weights = {k: v for k, v in unwrap(model).state_dict().items() if k in stored}
    _write_state(tmp, {**state, "strategy": by_reference(state["strategy"], weights)} if "strategy" in state else state)


def link_best(source: Path | None, tmp: Path) -> bool:
    """Hard-link the best weights' files of checkpoint ``source`` into ``tmp``; False (nothing linked) when
    there is no source or the file system cannot link. Distributed: rank 0 links, every rank hears the answer."""
    def link() -> bool:
        files = [f for f in [source / "best.safetensors", *sorted((source / BEST_SHARDS).glob("*"))] if f.is_file()]
        if not files:
            return False
        try:
            for f in files:
                target = tmp / f.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(f, target)
        except OSError:  # no hard links here (another file system, FAT, some network mounts)
            shutil.rmtree(tmp / BEST_SHARDS, ignore_errors=True)
            (tmp / "best.safetensors").unlink(missing_ok=True)
            return False
        return True

    linked = link() if source is not None and dist.world().main else False
    return bool(dist.broadcast_object(linked)) if source is not None else False


def _write_state(tmp: Path, state: dict[str, Any]) -> None:
    """``state.pt``, then the manifest of every file in ``tmp`` (shards included), everything fsynced."""
    with open(tmp / "state.pt", "wb") as handle:  # a Python file: a full disk surfaces as OSError(ENOSPC)
        torch.save(state, handle)
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    for file_name in files:
        with open(tmp / file_name, "rb") as handle:
            os.fsync(handle.fileno())
    manifest = {"files": {f: {"bytes": (tmp / f).stat().st_size, "crc32": _crc32(tmp / f)} for f in files},
                "created": time.time()}
    with open(tmp / "manifest.json", "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_dir(tmp)


def _write_sharded(tmp: Path, model: torch.nn.Module, state: dict[str, Any], best: dict[str, torch.Tensor] | None,
                   optimizer: torch.optim.Optimizer | None, best_from: Path | None) -> None:
    """Every rank: its shards through DCP (weights, optimizer, best weights, the strategy's DTensors); rank 0
    then writes ``state.pt`` (plain data, every rank's RNG state) and the manifest."""
    state = write_shards(tmp / SHARDS, model, state, optimizer)
    if best is not None and not link_best(best_from, tmp):
        write_best_shards(tmp / BEST_SHARDS, best, model)
    state = {**state, "rng": dist.all_gather_objects(state["rng"])}  # rank order
    on_main(lambda: _write_state(tmp, state))


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in nested dicts and lists (what a checkpoint of them needs on disk, about)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return _tensor_bytes(list(obj.values()))
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def checkpoint_name(number: int) -> str:
    return f"ckpt-{number:06d}"


def _number(path: Path) -> int | None:
    digits = path.name.removeprefix("ckpt-")
    return int(digits) if path.name.startswith("ckpt-") and digits.isdigit() else None


def list_checkpoints(run_dir: Path, folder: str = "") -> list[Path]:
    """Complete checkpoint directories (in ``checkpoints/<folder>``), oldest first (by their number)."""
    root = Path(run_dir) / CHECKPOINTS / folder
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _number(p) is not None), key=_number)


def next_number(run_dir: Path, at_least: int) -> int:
    """1 + the highest checkpoint number ever used: kept and damaged checkpoints, and the run state's own."""
    used = list_checkpoints(run_dir) + list_checkpoints(run_dir, DAMAGED)
    return 1 + max([at_least, *(_number(p) for p in used)])


class CheckpointDamaged(Exception):
    """A checkpoint that cannot be read back whole; the message says which file and why."""


@dataclass
class Checkpoint:
    """A checkpoint read back and checked: its state (``state.pt``, read once), its best-epoch weights (single
    process; a distributed checkpoint's are loaded with the weights) and the names and shapes of its model
    weights and best weights (the weights are loaded later by ``load_weights``, once they are known to fit)."""

    path: Path
    state: dict[str, Any]
    best: dict[str, torch.Tensor] | None
    shapes: dict[str, tuple[int, ...]]
    best_shapes: dict[str, tuple[int, ...]] | None = None
    sharded: bool = False  # written by a distributed run: ``shards/`` (DCP) instead of safetensors files

    @property
    def best_is_model(self) -> bool:
        return self.state.get("best") == BEST_IS_MODEL


def manifest_problem(path: Path) -> str | None:
    """Why the checkpoint's files do not match its manifest (None when every size and CRC32 does)."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        for file_name, meta in manifest["files"].items():
            f = path / file_name
            if f.stat().st_size != meta["bytes"] or _crc32(f) != meta["crc32"]:
                return f"{file_name}: size or CRC32 differs from manifest.json"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"manifest.json: {type(exc).__name__}: {exc}"
    return None


def read_checkpoint(path: Path, verify: bool = True) -> Checkpoint:
    """Read and check checkpoint ``path`` without touching any model: its manifest (unless ``verify`` is false:
    a rank other than 0 reads what rank 0 checked), ``state.pt`` (loaded, with every part a resume needs),
    ``best.safetensors`` and the header of ``model.safetensors`` (distributed: the DCP metadata).
    Raises ``CheckpointDamaged`` naming the first file that fails."""
    problem = manifest_problem(path) if verify else None
    if problem:
        raise CheckpointDamaged(problem)
    state = _read(path / "state.pt", lambda f: torch.load(f, map_location="cpu", weights_only=True))
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else list(STATE_KEYS)
    missing += [f"run.{k}" for k in SAVED if k not in (state.get("run") or {})] if not missing else []
    if missing:
        raise CheckpointDamaged(f"state.pt: lacks {', '.join(missing)}")
    if (path / SHARDS).is_dir():
        shapes = _read(path / SHARDS / ".metadata", lambda f: shard_shapes(f.parent))
        best_meta = path / BEST_SHARDS / ".metadata"
        best = _read(best_meta, lambda f: shard_shapes(f.parent)).get("best") if best_meta.exists() else None
        return Checkpoint(path, state, None, shapes.get("model", {}), best, sharded=True)
    state["strategy"] = _read(path / "model.safetensors", lambda f: _with_weights(state["strategy"], f))
    best_file = path / "best.safetensors"
    best = _read(best_file, lambda f: load_file(str(f))) if best_file.exists() else None
    best_shapes = {k: tuple(v.shape) for k, v in best.items()} if best is not None else None
    return Checkpoint(path, state, best, _read(path / "model.safetensors", _shapes), best_shapes)


def _read(file: Path, load: Callable[[Path], Any]) -> Any:
    try:
        return load(file)
    except Exception as exc:  # torch, pickle and safetensors each raise their own kinds
        raise CheckpointDamaged(f"{file.name}: {type(exc).__name__}: {str(exc).strip()[:200]}") from exc


def _with_weights(strategy: Any, file: Path) -> Any:
    """The strategy state with the weights it references (``weights.by_reference``) read from ``file``."""
    with safe_open(str(file), framework="pt") as handle:
        return resolved(strategy, handle.get_tensor)


def _shapes(file: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(file), framework="pt") as handle:
        return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118


def newest_readable(run_dir: Path) -> tuple[Checkpoint | None, list[tuple[Path, str]]]:
    """The newest checkpoint that reads back whole, and the newer damaged ones passed over (path, reason)."""
    damaged = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return read_checkpoint(path), damaged
        except CheckpointDamaged as exc:
            damaged.append((path, str(exc)))
    return None, damaged


def move_aside(path: Path, reason: str) -> Path:
    """Move a damaged checkpoint to ``checkpoints/damaged/`` (kept for inspection, never read again)."""
    target = path.parent / DAMAGED / path.name
    if target.exists():
        target = target.with_name(f"{path.name}.{time.time_ns()}")
    target.parent.mkdir(exist_ok=True)
    os.replace(path, target)
    log.warning("checkpoint %s is damaged (%s); moved to %s", path, reason, target)
    return target


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """Load the checkpoint's model weights into ``model`` (which must already have every module they name)."""
    load_model(unwrap(model), str(path / "model.safetensors"))


def load_shards(checkpoint: Checkpoint, model: torch.nn.Module,
                optimizer: torch.optim.Optimizer | None) -> dict[str, torch.Tensor] | None:
    """Every rank, together: load a distributed checkpoint's weights (and, with ``optimizer``, its state) into
    this rank's shards, resharded to the current process count; returns its best weights (None if it has none)."""
    best = checkpoint.path / BEST_SHARDS if checkpoint.best_shapes is not None else None
    return read_shards(checkpoint.path / SHARDS, model, optimizer, best)


def load_strategy_shards(checkpoint: Checkpoint, model: torch.nn.Module) -> None:
    """Every rank, together: put the strategy's DTensors (placeholders in ``state.pt``) back into the
    checkpoint's strategy state, sharded like the model's parameters (plain tensors if the model is not sharded)."""
    checkpoint.state["strategy"] = read_strategy_shards(checkpoint.state["strategy"], checkpoint.path / SHARDS, model)


def best_weights(checkpoint: Checkpoint, model: torch.nn.Module,
                 sharded_best: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """The interrupted task's best weights, once the checkpoint's weights are loaded into ``model``: a copy of
    them (``"best": "model"``), the shards ``load_shards`` returned, or ``best.safetensors``."""
    if checkpoint.best_is_model:
        return copy_weights(model)
    if checkpoint.sharded:
        return sharded_best
    return None if checkpoint.best is None else retied(checkpoint.best, model)


def newest_on_every_rank(run_dir: Path) -> tuple[Checkpoint | None, list[tuple[Path, str]]]:
    """``newest_readable`` on rank 0 (the only rank that checks manifests and moves damaged checkpoints), and
    the checkpoint it chose read by every other rank, so all ranks resume from the same one."""
    world = dist.world()
    found, damaged = newest_readable(run_dir) if world.main else (None, [])
    if not world.distributed:
        return found, damaged
    path, damaged = dist.broadcast_object((found.path if found is not None else None, damaged))
    if found is None and path is not None:
        found = read_checkpoint(path, verify=False)
    return found, damaged


def checkpoint_bytes(path: Path) -> int:
    """Bytes of every file of a checkpoint (its shards included; hard-linked best weights too)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def has_best(path: Path) -> bool:
    """Whether checkpoint ``path`` holds best-weight files (not a reference to its own weights)."""
    return (path / "best.safetensors").is_file() or (path / BEST_SHARDS / ".metadata").is_file()
