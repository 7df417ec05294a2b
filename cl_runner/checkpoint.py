"""Save and find checkpoints: everything a run needs to continue as if it had never stopped.

A checkpoint is a directory ``<run>/checkpoints/ckpt-<sequence number>/`` holding ``model.safetensors`` (weights),
``best.safetensors`` (the best-epoch weights kept so far, if any) and ``state.pt`` (optimizer, scheduler,
GradScaler, strategy state, loop position, RNG states, matrix rows, history), plus ``manifest.json`` listing
every file's size and CRC32. It is written under a temporary name, fsynced and renamed, so a crash leaves
either the whole checkpoint or none; a damaged one (manifest mismatch) is skipped with a warning in favour of
the previous one. Nothing is unpickled: weights load with safetensors, the rest with ``weights_only=True``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"


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


def save_checkpoint(run_dir: Path, name: str, model: torch.nn.Module, state: dict[str, Any],
                    best: dict[str, torch.Tensor] | None, keep_last: int) -> tuple[Path, float]:
    """Write checkpoint ``name`` atomically, drop all but the newest ``keep_last``; returns (path, seconds)."""
    started = time.perf_counter()
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(_unwrap(model), str(tmp / "model.safetensors"))
    if best is not None:
        save_file({k: v.contiguous() for k, v in best.items()}, str(tmp / "best.safetensors"))
    torch.save(state, tmp / "state.pt")
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
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final, time.perf_counter() - started


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (by their global step)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("ckpt-")]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def is_intact(path: Path) -> bool:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        for file_name, meta in manifest["files"].items():
            f = path / file_name
            if f.stat().st_size != meta["bytes"] or _crc32(f) != meta["crc32"]:
                return False
        return True
    except (OSError, ValueError, KeyError):
        return False


def latest_intact(run_dir: Path) -> Path | None:
    """The newest checkpoint whose manifest matches its files; damaged newer ones are reported and skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        if is_intact(path):
            return path
        log.warning("checkpoint %s is damaged or incomplete; using the previous one", path)
    return None


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """The checkpoint's state (``state.pt``, read once) and its best-epoch weights (or None).

    The model's weights are loaded separately by ``load_weights``: a strategy may first have to re-create the
    modules (adapters) they belong to, from the strategy state returned here.
    """
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    best = load_file(str(path / "best.safetensors")) if (path / "best.safetensors").exists() else None
    return state, best


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """Load the checkpoint's model weights into ``model`` (which must already have every module they name)."""
    load_model(_unwrap(model), str(path / "model.safetensors"))


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile wrapper
