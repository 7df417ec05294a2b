"""Strategies under several processes: which kinds each refuses (one line, before anything loads), and for the
supported ones the pieces that must equal the single-process result, checked on 2 gloo processes.

One torchrun launch (``test_two_processes_give_the_single_process_result``) runs this file as a script: every
rank computes the single-process reference itself (``distributed=none``), then the same under ``ddp`` and
``fsdp`` in one process group (the kind is switched between checks), and rank 0 writes what it measured to a
JSON file the test reads. Checked there: the Fisher (empirical and sampled: DDP splits the examples and sums,
FSDP gives each rank its shard), EWC's and L2's penalty gradient and value on FSDP shards, the LwF teacher
sharded like the student, LAMOL's sampled rows, and a short run of the real loop (two tasks, dropout off) whose
final weights must match the single process for each supported strategy. The last row of the JSON is the
support matrix (``docs/strategies.md`` shows it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: tiny_lm when run as a script (torchrun)

from tiny_lm import one_thread, task_examples, tiny_context, tiny_model, train  # noqa: E402,F401 (autouse fixture)

from cl_runner.core import dist  # noqa: E402
from cl_runner.core.errors import ConfigError  # noqa: E402
from cl_runner.strategies.registry import build_strategy, builtin_strategies, strategy_class  # noqa: E402
from cl_runner.strategies.support import support_errors  # noqa: E402

STRATEGIES = ("naive", "joint", "replay", "ewc", "l2", "lwf", "ewc_replay", "adapters", "shared_lora", "progressive",
              "mer", "lamol")
REFUSED_UNDER_FSDP = {"lamol"}  # adapters, shared_lora, progressive: their modules are made before sharding
# Fisher, penalty gradients and teacher logits are the single-process values up to the order of float additions
# (~1e-7 absolute here); the penalty value is compared relatively. Weights after a short run (two tasks of 2 steps,
# lr 1e-2): the step gradients differ by rounding only, which AdamW's division by the root of the second moment
# turns into ~1e-5 (measured at most 2.5e-5, naive included); a wrong gradient (a rank's half counted twice, an
# unreduced penalty, a teacher that is not the old model) moves them by > 1e-3.
TOLERANCE, TRAIN_TOLERANCE = 1e-6, 1e-4


def config(name: str, **options):
    return strategy_class(name).Config(name=name, **options)


def distributed_errors(cfg, kind: str) -> list[str]:
    """What the config check says of strategy ``cfg`` under ``distributed.kind`` ``kind`` (its class's facts)."""
    return support_errors(strategy_class(cfg.name), [cfg], distributed=kind)


@contextmanager
def as_world(kind: str, rank: int = 0, size: int = 1):
    """This process as rank ``rank`` of a run of ``kind`` (the process group, when needed, already joined)."""
    saved = dist._WORLD[0]
    dist._WORLD[0] = dist.World(rank, size, 0, kind)
    try:
        yield
    finally:
        dist._WORLD[0] = saved


# ------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_each_strategy_runs_or_is_refused_in_one_line(name, kind):
    errors = distributed_errors(config(name), kind)
    if kind == "fsdp" and name in REFUSED_UNDER_FSDP:
        assert len(errors) == 1 and "\n" not in errors[0]
        assert errors[0].startswith(f"distributed.kind: strategy {name} cannot run with distributed=fsdp: ")
        assert errors[0].endswith("use distributed=ddp")
    else:
        assert errors == []
    assert distributed_errors(config(name), "none") == []


def test_the_docs_support_matrix_is_what_the_classes_declare():
    """docs/distributed.md's table, row by row (its observed side is tests/engine/test_distributed.py's slow test,
    which also says which strategies it lists)."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "distributed.md").read_text(encoding="utf-8")
    table = text.split("<!-- support-matrix:start -->")[1].split("<!-- support-matrix:end -->")[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.strip().splitlines()[2:]]
    documented = {(r[0].strip("`"), kind): r[i].split(":")[0] for r in rows for i, kind in ((1, "ddp"), (2, "fsdp"))}
    assert documented and {name for name, _ in documented} <= set(builtin_strategies())
    declared = {(name, kind): "refused" if distributed_errors(config(name), kind) else "same run"
                for name, kind in documented}
    assert documented == declared


def test_lamol_without_generation_is_naive_and_runs_sharded():
    assert distributed_errors(config("lamol", gen_ratio=0.0), "fsdp") == []


def test_olora_penalty_is_refused_sharded_only():
    errors = distributed_errors(config("adapters", orthogonal_lambda=0.1), "fsdp")
    assert len(errors) == 1 and "orthogonal_lambda" in errors[0] and "distributed=fsdp" in errors[0]
    assert distributed_errors(config("adapters", orthogonal_lambda=0.1), "ddp") == []


def test_building_a_refused_strategy_in_a_sharded_process_fails_before_training():
    with as_world("fsdp", size=2):
        with pytest.raises(ConfigError, match=r"^distributed.kind: strategy lamol cannot run with distributed=fsdp"):
            build_strategy(config("lamol"))
        assert build_strategy(config("ewc")).name == "ewc"


@pytest.mark.parametrize("name", ["adapters", "shared_lora", "progressive"])
def test_modules_of_later_tasks_are_made_before_sharding_or_the_task_refuses(name):
    """Under FSDP a module added after sharding would be neither sharded nor reduced: ``before_shard`` makes
    every task's module first (inactive: the model's function is unchanged); without it the first task refuses."""
    with as_world("fsdp", size=2):
        ctx, strategy = tiny_context(tiny_model()), build_strategy(config(name, rank=2))
        with pytest.raises(ConfigError, match=rf"^distributed.kind: strategy {name} cannot run with distributed="):
            strategy.before_task(ctx)
        model = tiny_model()
        ctx, strategy = tiny_context(model), build_strategy(config(name, rank=2))
        before = model(input_ids=torch.tensor([task_examples(0)[0]["input_ids"]])).logits
        names = {n for n, _ in model.named_parameters()}
        strategy.before_shard(ctx)
        assert len({n for n, _ in model.named_parameters()} - names) > 0
        assert torch.equal(model(input_ids=torch.tensor([task_examples(0)[0]["input_ids"]])).logits, before)
        made = {n for n, _ in model.named_parameters()}
        for task in range(3):
            ctx.task_index = task
            strategy.before_task(ctx)
        assert {n for n, _ in model.named_parameters()} == made  # nothing added after sharding


@pytest.mark.slow
def test_a_refused_strategy_stops_a_torchrun_job_in_one_line_before_training(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
    env.pop("HYDRA_FULL_ERROR", None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "cl_runner",
                           "distributed=fsdp", "strategy=lamol", "train.epochs=1", "checkpoint.enabled=false"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("cl-run: error:")]  # rank 0's
    assert len(lines) == 1 and "]: Traceback" not in done.stderr, done.stderr[-3000:]  # none from a rank
    assert lines[0].startswith("cl-run: error: distributed.kind: strategy lamol cannot run with distributed=fsdp: ")
    assert not list(tmp_path.rglob("history.jsonl")) and "Score matrix" not in done.stdout


# ------------------------------------------------------------------------------------- 1 vs 2 processes
@pytest.mark.slow
def test_two_processes_give_the_single_process_result(tmp_path):
    out = tmp_path / "measured.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           __file__, str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(out.read_text())
    for check, diff in measured["checks"].items():
        assert diff <= (TRAIN_TOLERANCE if "/train_" in check else TOLERANCE), f"{check}: differs by {diff}"
    assert measured["teacher_sharded"] and measured["lamol_rows_equal"]
    expected = {"ddp": sorted(STRATEGIES), "fsdp": sorted(set(STRATEGIES) - {"lamol"})}
    assert {kind: sorted(names) for kind, names in measured["trained"].items()} == expected


# ------------------------------------------------------------------------------ the worker (torchrun)
def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest difference of two sets of weights, leaving out the key bias (the middle third of GPT-2's
    ``c_attn.bias``): softmax ignores a shift shared by a query's scores, so its true gradient is zero and Adam
    turns the rounding noise it gets instead (different sums in one and two processes) into steps of ~lr. ``b``
    may have more (a later task's adapter made before sharding)."""
    assert a.keys() <= b.keys()
    diffs = {k: (_full(a[k]).float() - _full(b[k]).float()).abs() for k in a}
    for k in diffs:
        if k.endswith("attn.c_attn.bias"):
            third = diffs[k].numel() // 3
            diffs[k][third : 2 * third] = 0
    return max(float(d.max()) for d in diffs.values())


def _model(kind: str, model: torch.nn.Module | None = None) -> torch.nn.Module:
    model = tiny_model() if model is None else model
    if kind == "fsdp":
        from cl_runner.config.schema import DistributedConfig
        from cl_runner.engine.parallel import shard

        shard(model, DistributedConfig(kind="fsdp"))
    return model


def _fisher_checks(kind: str, checks: dict[str, float]) -> None:
    from cl_runner.strategies.common import local, shard_like
    from cl_runner.strategies.fisher import fisher_diagonal

    for mode in ("empirical", "sampled"):
        def fisher(ctx, mode=mode):
            return fisher_diagonal(ctx, task_examples(0, 7), mode=mode, generator=torch.Generator().manual_seed(3),
                                   batch_size=3)

        with as_world("none"):
            ref = fisher(tiny_context(tiny_model()))
        model = _model(kind)
        got = fisher(tiny_context(model))
        params = dict(model.named_parameters())
        assert all(got[n].shape == local(params[n]).shape for n in got)  # shards under FSDP: no full copy
        checks[f"{kind}/fisher_{mode}"] = max(float((got[n] - shard_like(ref[n], params[n])).abs().max())
                                              for n in got)


def _anchor_checks(kind: str, checks: dict[str, float]) -> None:
    """EWC then L2 (two tasks: the merge) on perturbed weights: the penalty gradient and value; the state saved
    as shards (DTensors) and loaded again, and the single-process state loaded on the shards (1 -> 2 processes)."""
    for name, options in (("ewc", {"ewc_lambda": 50.0, "fisher_samples": 5}), ("l2", {"l2_lambda": 3.0})):
        results, states = {}, {}
        for world_kind in ("none", kind):
            with as_world("none") if world_kind == "none" else nullcontext():
                model = tiny_model() if world_kind == "none" else _model(kind)
                ctx, strategy = tiny_context(model), build_strategy(config(name, **options))
                for task in (0, 1):
                    ctx.task_index = task
                    _nudge(model, task)
                    strategy.after_task(ctx)
                _nudge(model, 2)
                model.zero_grad(set_to_none=True)
                strategy.after_backward(ctx)
                grads = {n: p.grad for n, p in model.named_parameters()}
                results[world_kind] = (grads, strategy.penalty(model), strategy.accounting())
                states[world_kind] = strategy.state_dict()
        checks[f"{kind}/{name}_penalty_grad"] = _diff(results["none"][0], results[kind][0])
        assert results["none"][2] == results[kind][2], (results["none"][2], results[kind][2])
        assert all(hasattr(t, "to_local") for t in states[kind]["anchor"])  # shards, laid out like the weights
        for source in ("none", kind):  # resumed from one process's state, and from the shards
            resumed = build_strategy(config(name, **options))
            resumed.load_state_dict(states[source])
            value = resumed.penalty(model)
            checks[f"{kind}/{name}_penalty_value_from_{source}"] = abs(results["none"][1] / value - 1)


@torch.no_grad()
def _nudge(model: torch.nn.Module, salt: int) -> None:
    """The same deterministic change of every weight, on the whole model or on each rank's shards."""
    from cl_runner.strategies.common import local, shard_like

    for i, (_, p) in enumerate(model.named_parameters()):
        full = torch.sin(torch.arange(p.numel(), dtype=torch.float32) * (i + 1) + salt).reshape(p.shape) * 0.01
        local(p).add_(shard_like(full, p))


def _teacher_checks(kind: str, checks: dict[str, float], measured: dict) -> None:
    from cl_runner.strategies.lwf import LwF

    ids = torch.tensor([task_examples(1)[0]["input_ids"]])
    with as_world("none"):
        reference = tiny_model()(input_ids=ids).logits
    model = _model(kind)
    lwf = LwF(config("lwf"))
    lwf.after_task(tiny_context(model))
    with torch.no_grad():
        checks[f"{kind}/lwf_teacher_logits"] = float((lwf.teacher(input_ids=ids).logits - reference).abs().max())
    if kind == "fsdp":
        from torch.distributed.fsdp import FSDPModule

        measured["teacher_sharded"] = isinstance(lwf.teacher, FSDPModule) and all(
            hasattr(p, "to_local") and p.to_local().numel() < p.numel() for p in lwf.teacher.parameters()
            if p.numel() > 1)


def _lamol_rows(kind: str, measured: dict) -> None:
    from cl_runner.strategies.pseudo import sample_after

    def rows():
        return sample_after(tiny_context(tiny_model()), 7, 9, 8, 0, 2, 5, 1.0, torch.Generator().manual_seed(1), 4)

    with as_world("none"):
        reference = rows()
    measured["lamol_rows_equal"] = rows() == reference


RUN_OPTIONS = {"replay": {"buffer_size": 6}, "ewc_replay": {"buffer_size": 6, "fisher_samples": 6},
               "ewc": {"fisher_samples": 6, "ewc_lambda": 100.0}, "l2": {"l2_lambda": 1.0},
               "mer": {"buffer_size": 6, "inner_steps": 2}, "lamol": {"gen_batch_size": 4},
               "adapters": {"rank": 2, "orthogonal_lambda": 0.5}, "shared_lora": {"rank": 2},
               "progressive": {"rank": 2}}
SHARDED_OPTIONS = {"adapters": {"orthogonal_lambda": 0.0}}  # O-LoRA's penalty is refused under FSDP


def _trained(name: str, kind: str, options: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Final weights and accounting after two tasks through the real loop, the model sharded under ``fsdp`` after
    the strategy's ``before_shard`` (the order ``run.build_parts`` follows)."""
    model = tiny_model()
    ctx, strategy = tiny_context(model), strategy_class(name)(config(name, **options))
    if kind == "fsdp":
        strategy.before_shard(ctx)
        model = _model(kind, model)
    for task in (0, 1):
        train(ctx, strategy, task, epochs=1)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, strategy.accounting()


def _train_checks(kind: str, checks: dict[str, float], measured: dict) -> None:
    """Every strategy that runs under ``kind`` (and, under FSDP, those that need ``before_shard``): the final
    weights and the accounting against one process's."""
    for name in STRATEGIES:
        options = {**RUN_OPTIONS.get(name, {}), **(SHARDED_OPTIONS.get(name, {}) if kind == "fsdp" else {})}
        if distributed_errors(config(name, **options), kind):
            continue
        with as_world("none"):
            want, want_costs = _trained(name, "none", options)
        got, costs = _trained(name, kind, options)
        checks[f"{kind}/train_{name}"] = _diff(want, got)
        assert costs == want_costs, (name, kind, costs, want_costs)
        measured["trained"].setdefault(kind, []).append(name)


def _worker(out: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    dist.join("ddp", use_cuda=False, timeout_s=300)
    checks: dict[str, float] = {}
    measured: dict = {"checks": checks, "trained": {}}
    for kind in ("ddp", "fsdp"):
        with as_world(kind, rank, 2):
            _fisher_checks(kind, checks)
            if kind == "fsdp":
                _anchor_checks(kind, checks)
            _teacher_checks(kind, checks, measured)
            _lamol_rows(kind, measured)
            _train_checks(kind, checks, measured)
    gathered = dist.all_gather_objects(measured)
    if rank == 0:
        measured["checks"] = {k: max(m["checks"][k] for m in gathered) for k in checks}
        Path(out).write_text(json.dumps(measured, indent=1))
    dist.leave()


if __name__ == "__main__":
    _worker(sys.argv[1])
