"""Atomic file writes and disk-full detection: the leaf every writer of a run's files uses. A file (or a whole
directory: a saved model) is replaced whole (temporary name, fsync, rename), so an interrupted run never leaves a
half-written one."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from cl_runner.core.errors import DiskFullError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException | None) -> bool:
    """ENOSPC or EDQUOT, also when wrapped: torch.save raises a RuntimeError whose context is the OSError, and
    safetensors a SafetensorError whose text ends in "(os error 28)"."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            return True
        if any(f"(os error {code})" in str(exc) for code in DISK_FULL):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(path: Path, needed: int) -> DiskFullError:
    """The one line for a write that ran out of space: the path, the bytes it needed and the bytes left there."""
    free = shutil.disk_usage(next(p for p in [Path(path), *Path(path).parents] if p.exists())).free
    return DiskFullError(f"{path}: no space left on device (writing {human_bytes(needed)}; {human_bytes(free)} "
                         f"free there); free some space, then continue with: cl-run resume={run_dir_of(path)}")


def run_dir_of(path: Path) -> Path:
    """The run directory a written file belongs to (checkpoint files live two or three levels down)."""
    path = Path(path).absolute()
    return next((p for p in path.parents if (p / "config.yaml").exists()), path.parent)


def human_bytes(n: float) -> str:
    units = ["B", "kB", "MB", "GB", "TB"]
    while n >= 1000 and len(units) > 1:
        n, units = n / 1000, units[1:]
    return f"{n:.1f} {units[0]}" if units[0] != "B" else f"{n:.0f} B"


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` whole (temporary name, fsync, rename); out of space: the temporary file is removed and
    a ``DiskFullError`` names the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise disk_full_error(path, len(text.encode())) from exc
        raise


def tree_bytes(path: Path) -> int:
    """The bytes of every file under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def write_dir_atomic(path: Path, fill: Callable[[Path], None]) -> int:
    """Make directory ``path`` whole or not at all: ``fill(tmp)`` writes it under a hidden temporary name beside
    it (``.<name>.tmp``), its files are fsynced, then it is renamed into place (an older ``path`` is moved aside
    first and removed after), so a crash never leaves a half-written ``path``. Returns its size in bytes; out of
    space: the temporary directory is removed and a ``DiskFullError`` names the path."""
    path = Path(path)
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    for stale in (tmp, old):  # left by a crash: never complete, never read
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        size = tree_bytes(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException as exc:
        written = tree_bytes(tmp) if tmp.exists() else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc):
            raise disk_full_error(path, written) from exc
        raise
    shutil.rmtree(old, ignore_errors=True)
    return size
