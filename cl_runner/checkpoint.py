"""Save, find and read back checkpoints: everything a run needs to continue as if it had never stopped.

A checkpoint is a directory ``<run>/checkpoints/ckpt-<number>/`` holding ``model.safetensors`` (weights),
``best.safetensors`` (the best-epoch weights kept so far, if any) and ``state.pt`` (optimizer, scheduler,
GradScaler, strategy state, loop position, RNG states, matrix rows, history), plus ``manifest.json`` listing
every file's size and CRC32. It is written under a temporary name, fsynced and renamed, so a crash leaves
either the whole checkpoint or none. Numbers only grow: the next is 1 + the highest ever used in the run.

Reading one back (``read_checkpoint``) touches no model: a checkpoint whose files differ from its manifest or
fail to load is damaged; the run falls back to the next older one and moves the damaged one to
``checkpoints/damaged/``. Nothing is unpickled: weights load with safetensors, the rest with ``weights_only``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from cl_runner.results import disk_full_error, is_disk_full
from cl_runner.run_state import SAVED

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
DAMAGED = "damaged"  # checkpoints/damaged/: checkpoints that failed to read back, kept for inspection
STATE_KEYS = ("run", "task", "strategy", "extras", "rng")  # the parts of state.pt a resume reads


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
                    best: dict[str, torch.Tensor] | None, keep_last: int) -> tuple[Path, float]:
    """Write checkpoint ``number`` atomically, drop all but the newest ``keep_last``; returns (path, seconds).
    Out of space: the temporary directory is removed and a ``DiskFullError`` names it and the bytes needed."""
    started = time.perf_counter()
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".ckpt-*.tmp"):  # left by a killed write (one process per run directory)
        shutil.rmtree(stale, ignore_errors=True)
    final = root / checkpoint_name(number)
    tmp = root / f".{final.name}.tmp"
    try:
        _write_files(tmp, model, state, best)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc):
            raise disk_full_error(tmp, _tensor_bytes([_unwrap(model).state_dict(), best, state])) from exc
        raise
    for old in list_checkpoints(run_dir)[:-keep_last]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final, time.perf_counter() - started


def _write_files(tmp: Path, model: torch.nn.Module, state: dict[str, Any],
                 best: dict[str, torch.Tensor] | None) -> None:
    tmp.mkdir()
    save_model(_unwrap(model), str(tmp / "model.safetensors"))
    if best is not None:
        save_file({k: v.contiguous() for k, v in best.items()}, str(tmp / "best.safetensors"))
    with open(tmp / "state.pt", "wb") as handle:  # a Python file: a full disk surfaces as OSError(ENOSPC)
        torch.save(state, handle)
    files = sorted(p.name for p in tmp.iterdir())
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
    """A checkpoint read back and checked: its state (``state.pt``, read once), its best-epoch weights and
    the names and shapes of its model weights (loaded later by ``load_weights``, once they are known to fit)."""

    path: Path
    state: dict[str, Any]
    best: dict[str, torch.Tensor] | None
    shapes: dict[str, tuple[int, ...]]


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


def read_checkpoint(path: Path) -> Checkpoint:
    """Read and check checkpoint ``path`` without touching any model: its manifest, ``state.pt`` (loaded,
    with every part a resume needs), ``best.safetensors`` and the header of ``model.safetensors``.
    Raises ``CheckpointDamaged`` naming the first file that fails."""
    problem = manifest_problem(path)
    if problem:
        raise CheckpointDamaged(problem)
    state = _read(path / "state.pt", lambda f: torch.load(f, map_location="cpu", weights_only=True))
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else list(STATE_KEYS)
    missing += [f"run.{k}" for k in SAVED if k not in (state.get("run") or {})] if not missing else []
    if missing:
        raise CheckpointDamaged(f"state.pt: lacks {', '.join(missing)}")
    best_file = path / "best.safetensors"
    best = _read(best_file, lambda f: load_file(str(f))) if best_file.exists() else None
    return Checkpoint(path, state, best, _read(path / "model.safetensors", _shapes))


def _read(file: Path, load: Callable[[Path], Any]) -> Any:
    try:
        return load(file)
    except Exception as exc:  # torch, pickle and safetensors each raise their own kinds
        raise CheckpointDamaged(f"{file.name}: {type(exc).__name__}: {str(exc).strip()[:200]}") from exc


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


def weights_mismatch(checkpoint: Checkpoint, model: torch.nn.Module) -> str | None:
    """How the checkpoint's weights (and best weights) fail to fit ``model``'s names and shapes, or None."""
    expected = {k.removeprefix("_orig_mod."): v for k, v in _unwrap(model).state_dict().items()}
    problem = _compare("model.safetensors", checkpoint.shapes, expected)
    if problem is None and checkpoint.best is not None:
        best = {k.removeprefix("_orig_mod."): tuple(v.shape) for k, v in checkpoint.best.items()}
        problem = _compare("best.safetensors", best, expected)
    return problem


def _compare(file: str, shapes: dict[str, tuple[int, ...]], expected: dict[str, torch.Tensor]) -> str | None:
    stored = {expected[k].data_ptr() for k in shapes if k in expected}  # tied weights are saved once
    names = {"not in the model": sorted(set(shapes) - set(expected)),
             "missing": sorted(k for k, t in expected.items() if k not in shapes and t.data_ptr() not in stored)}
    for what, found in names.items():
        if found:
            return f"{file}: {len(found)} weights {what} ({', '.join(found[:3])}{', ...' * (len(found) > 3)})"
    wrong = [f"{file}: {k} is {list(shapes[k])}, the model's is {list(t.shape)}"
             for k, t in expected.items() if k in shapes and tuple(t.shape) != shapes[k]]
    return wrong[0] if wrong else None


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """Load the checkpoint's model weights into ``model`` (which must already have every module they name)."""
    load_model(_unwrap(model), str(path / "model.safetensors"))


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile wrapper
