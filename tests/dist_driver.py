"""Runs one small experiment per strategy in this process (or in each process of a torchrun job) and writes
what the invariance tests compare: ``OUT/results.json`` = {strategy: {"status": "ok", "matrix", "losses"} or
{"status": "refused", "error"}}, written by rank 0.

    python tests/dist_driver.py OUT none naive,ewc [override ...]
    torchrun --nproc_per_node=2 tests/dist_driver.py OUT ddp naive,ewc [override ...]

Every strategy runs in the same process group, one after another (a torchrun start costs seconds on a CPU)."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import make_config  # noqa: E402
from rich.console import Console  # noqa: E402

from cl_runner.core import dist  # noqa: E402
from cl_runner.core.errors import UserError  # noqa: E402
from cl_runner.engine.run import run  # noqa: E402

# No dropout: its masks are drawn per micro-batch in the micro-batch's shape, so they (not their distribution)
# change with the number of processes, as with train.grad_accum.
NO_DROPOUT = ["+model.arch.resid_pdrop=0", "+model.arch.embd_pdrop=0", "+model.arch.attn_pdrop=0"]
# one epoch a task and 32 facts scored: the ranks' agreement shows from the first steps on, and a suite's CI time
# is bounded (23 strategies x 3 process kinds)
COMMON = [*NO_DROPOUT, "checkpoint.enabled=false", "train.keep_best=false", "train.epochs=1", "eval.max_examples=32"]
WRITES: list[str] = []  # files this rank opened for writing under OUT (ranks other than 0 must open none)


def watch_writes(out: Path) -> None:
    """Record every file this process opens for writing under ``out`` (a Python audit hook sees every open)."""
    root = str(out.resolve())

    def hook(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], str) and args[0].startswith(root):
            mode, flags = args[1], args[2]
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & 3):
                WRITES.append(args[0])

    sys.addaudithook(hook)


def one(out: Path, kind: str, strategy: str, extra: list[str]) -> dict:
    try:
        cfg = make_config(f"strategy={strategy}", f"distributed={kind}", *COMMON, *extra)
        run(cfg, out / strategy, console=Console(file=io.StringIO(), width=120))
    except UserError as exc:
        return {"status": "refused", "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
        return {"status": "crashed", "error": f"{type(exc).__name__}: {exc}"}
    if not dist.world().main:
        return {}
    lines = (out / strategy / "history.jsonl").read_text().splitlines()
    return {"status": "ok", "saved": saved_tensors(out / strategy / "model"), "matrix": [r.split(",")[1:] for r in
                                       (out / strategy / "accuracy_matrix.csv").read_text().splitlines()[1:]],
            "losses": [json.loads(line)["train_loss"] for line in lines]}


def saved_tensors(model_dir: Path) -> list[str]:
    """The saved model's tensors (save.final_model), each file's keys and shapes: under FSDP gathered whole."""
    from safetensors import safe_open

    out = []
    for path in sorted(model_dir.rglob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            out += [f"{path.relative_to(model_dir)}:{k}:{list(handle.get_slice(k).get_shape())}" for k in handle.keys()]
    return out


def main(argv: list[str]) -> None:
    out, kind, strategies, extra = Path(argv[0]), argv[1], argv[2].split(","), argv[3:]
    out.mkdir(parents=True, exist_ok=True)
    watch_writes(out)
    results = {s: one(out, kind, s, extra) for s in strategies}
    writes = dist.all_gather_objects(sorted(set(WRITES)))
    if dist.world().main:
        report = {"results": results, "writes_by_rank": writes}
        (out / "results.json").write_text(json.dumps(report, indent=1))
    dist.leave()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as cl-run does: a rank's interpreter teardown can abort over the process group's threads


if __name__ == "__main__":
    main(sys.argv[1:])
