"""Monitor tasks (``tasks.monitor``): scored at every stage (init and after every task), never trained.

A monitor is any task config (loaded and scored like a task of the sequence, by its own metric) or an
lm-evaluation-harness task (``lm_eval: mmlu``), run through the harness's Python API on the model in memory
(``HFLM`` around our model and tokenizer: no second load from disk). Monitors are extra columns of
accuracy_matrix.csv (``monitor:<name>``) and a ``monitors`` block of metrics.json (init, final, drop from init,
worst stage); ACC, forgetting, BWT and FWT stay over the sequence's own tasks.

What keeps a monitor out of training: its examples are never in ``Context.train_sets`` (the only data the loop,
replay buffers and strategies read), the tokenizer of a built model is trained on the sequence's text only, and
every monitor pass restores the Python, NumPy and torch RNG states it found, so a run with monitors trains
exactly as the same run without them (tests/scoring/test_monitors.py compares the weights).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cl_runner.config.schema import Config, MonitorConfig
from cl_runner.core.errors import ConfigError, DataError
from cl_runner.core.logs import quiet_logger
from cl_runner.core.rng import rng_state, set_rng_state
from cl_runner.scoring.evaluate import Scorer, score_task
from cl_runner.scoring.sequence import sample
from cl_runner.strategies.base import Context, Strategy
from cl_runner.tasks import encode_task
from cl_runner.tasks.base import Task
from cl_runner.tasks.encode import EncodedTask
from cl_runner.tasks.load import load_task

FEWSHOT_SEED = 1234  # lm-evaluation-harness's default few-shot sampling seed
log = logging.getLogger(__name__)


@dataclass
class Monitor:
    name: str
    cfg: MonitorConfig
    task: Task | None = None  # task monitors: loaded like a task of the sequence
    encoded: EncodedTask | None = None

    @property
    def metric(self) -> str:
        return self.cfg.metric if self.task is not None else (self.cfg.score_key or "lm_eval")


class Monitors:
    """The run's monitors: loaded before the model (data errors first), encoded once the tokenizer exists,
    scored by ``score`` at every stage."""

    def __init__(self, cfg: Config, base_dir: Path | None) -> None:
        base = Path(base_dir or Path.cwd())
        self.cfg, self.harness = cfg, None
        with kept_rng():  # loading leaves the run's random stream as it was
            self.items = [Monitor(name, m, None if m.lm_eval else load_task(m, cfg.seed, base, f"tasks.monitor.{name}"))
                          for name, m in cfg.tasks.monitor.items()]
        harnessed = [m for m in self.items if m.task is None]
        if harnessed and cfg.distributed.kind != "none":
            raise ConfigError(f"tasks.monitor.{harnessed[0].name}.lm_eval: lm_eval monitors need one process "
                              f"(distributed={cfg.distributed.kind}); use a task-config monitor or distributed=none")
        if harnessed:
            self.harness = Harness(harnessed, base)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.items]

    def encode(self, tokenizer: Any, max_length: int) -> None:
        for m in self.items:
            if m.task is not None:
                cap = None if m.cfg.max_eval_examples is not None else self.cfg.eval.max_examples  # as for tasks
                encoded = encode_task(m.task, -1, tokenizer, max_length)
                m.encoded = replace(encoded, test=sample(encoded.test, cap, f"eval-test-{m.name}-{self.cfg.seed}"))

    def info(self) -> dict[str, Any]:
        """What metrics.json says of each monitor (its ``info``)."""
        return {m.name: {"source": "lm_eval" if m.task is None else m.task.info.get("source"),
                         "metric": m.metric, "lm_eval": m.cfg.lm_eval, "limit": m.cfg.limit,
                         "num_fewshot": m.cfg.num_fewshot} for m in self.items}

    def score(self, scorer: Scorer, strategy: Strategy, ctx: Context, tokenizer: Any,
              trained: int | None) -> dict[str, dict]:
        """Every monitor's result with the model as the latest task left it (``trained``; None: init), as the
        strategy scores that task (its adapter, its column); RNG states and the strategy's mode are put back."""
        results: dict[str, dict] = {}
        if not self.items:
            return results
        with kept_rng():
            strategy.before_eval(ctx, trained or 0)
            try:
                for m in self.items:
                    started = time.perf_counter()
                    results[m.name] = self._score_one(m, scorer, ctx, tokenizer)
                    results[m.name]["seconds"] = round(time.perf_counter() - started, 3)
            finally:
                strategy.after_eval(ctx)
        return results

    def _score_one(self, m: Monitor, scorer: Scorer, ctx: Context, tokenizer: Any) -> dict:
        if m.task is None:
            with ctx.autocast():
                return self.harness.score(m, scorer, tokenizer, self.cfg.train.max_length)
        scorer = replace(scorer, batch_size=m.task.eval_batch_size or scorer.batch_size, on_examples=None)
        result = score_task(scorer, m.encoded, m.task.metric, m.task.stop, m.task.labels, "test",
                            m.task.max_new_tokens, m.task.normalizer, m.task.answer_pattern)
        return {**result, "higher_is_better": m.task.higher_is_better}


@contextmanager
def kept_rng() -> Iterator[None]:
    """Restore the Python, NumPy and torch (CPU, CUDA) RNG states on exit: scoring a monitor (the harness seeds
    and samples) leaves training's random stream as it was."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


# ----------------------------------------------------------------------------------------- lm-evaluation-harness
class Harness:
    """lm-evaluation-harness on the model in memory. The tasks are built when the run starts, before the model
    loads (an unknown name or a dataset that cannot be read fails there), and kept: every stage scores the same
    examples with the same few-shot prompts (the harness's own few-shot seed)."""

    def __init__(self, monitors: list[Monitor], base_dir: Path) -> None:
        folders = {m.name: base_dir / Path(m.cfg.include_path).expanduser() for m in monitors if m.cfg.include_path}
        for name, folder in folders.items():  # (an absolute path stays as it is under base_dir / ...)
            if not folder.is_dir():
                raise DataError(f"tasks.monitor.{name}.include_path: not a folder of lm-eval task YAMLs: {folder}")
        paths = list(dict.fromkeys(str(folder) for folder in folders.values()))
        self.manager = task_manager(paths, [m.cfg.lm_eval for m in monitors])
        for m in monitors:
            if m.cfg.lm_eval not in self.manager.all_tasks:
                raise ConfigError(f"tasks.monitor.{m.name}.lm_eval: {m.cfg.lm_eval!r} is not an lm-evaluation-harness "
                                  f"task or group{' (nor in ' + ', '.join(paths) + ')' if paths else ''}; "
                                  "list them with: lm_eval ls tasks")
        self.loaded = {m.name: harness_call(m, lambda m=m: self.load(m)) for m in monitors}

    def score(self, m: Monitor, scorer: Scorer, tokenizer: Any, max_length: int) -> dict:
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM

        model = getattr(scorer.model, "_orig_mod", scorer.model)  # torch.compile's wrapper: the module itself
        was_training = model.training
        tasks = self.loaded[m.name]
        for task in tasks["tasks"].values():
            task.set_fewshot_seed(seed=FEWSHOT_SEED)  # the same few-shot examples at every stage
        batch_size = m.cfg.eval_batch_size or scorer.batch_size
        try:
            out = harness_call(m, lambda: evaluate(
                lm=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length),
                task_dict=tasks, limit=_limit(m.cfg.limit), bootstrap_iters=0, log_samples=False))
        finally:
            model.train(was_training)
        return harness_result(out, m)

    def load(self, m: Monitor) -> Any:
        """``m``'s harness task objects (``TaskManager.load``, which reads the datasets) with its few-shot count (a
        task whose own config says 0 keeps 0, as the harness does)."""
        loaded = self.manager.load([m.cfg.lm_eval])
        for task in loaded["tasks"].values():
            own = task.get_config("num_fewshot")
            task.set_config(key="num_fewshot", value=m.cfg.num_fewshot if m.cfg.num_fewshot is not None and own != 0
                            else own or 0)
        return loaded


def harness_call(m: Monitor, call: Callable[[], Any]) -> Any:
    """``call()`` with the harness's logger quiet; any failure (a dataset the hub does not serve, a task that does
    not fit the model) becomes one line naming the monitor."""
    try:
        with quiet_logger("lm_eval"):  # it warns about every default it fills in
            return call()
    except Exception as exc:
        detail = (str(exc).strip().splitlines() or [""])[0]
        raise DataError(f"tasks.monitor.{m.name}.lm_eval: lm-evaluation-harness failed on {m.cfg.lm_eval!r}: "
                        f"{type(exc).__name__}: {detail}") from exc


def _limit(limit: float | None) -> int | float | None:
    return int(limit) if limit is not None and limit >= 1 else limit


def task_manager(paths: list[str], names: list[str]) -> Any:
    """A harness TaskManager: only the ``include_path`` folders when they hold every task named (indexing
    the harness's own ~15,000 task files takes ~20 s), else those folders and the harness's tasks."""
    from lm_eval.tasks import TaskManager

    if paths:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(name in local.all_tasks for name in names):
            return local
    return TaskManager(include_path=paths or None)


def harness_result(out: dict[str, Any], m: Monitor) -> dict:
    """The monitor's score from ``simple_evaluate``'s output: ``score_key`` (e.g. ``acc,none``) or the task's
    first metric; ``n``: the examples scored (all subtasks of a group)."""
    found = out["results"].get(m.cfg.lm_eval) or next(iter(out["results"].values()))
    metrics = [k for k in found if "," in k and "_stderr," not in k]
    key = m.cfg.score_key or (metrics[0] if metrics else None)
    if key not in found:
        raise DataError(f"tasks.monitor.{m.name}.score_key: {key!r} is not among the results of {m.cfg.lm_eval!r} "
                        f"({', '.join(metrics)})")
    higher = out.get("higher_is_better", {}).get(m.cfg.lm_eval, {}).get(key.split(",")[0], True)
    n = sum(v.get("effective", 0) for v in out.get("n-samples", {}).values())
    return {"score": float(found[key]), "n": n, "score_key": key, "higher_is_better": bool(higher)}


# ----------------------------------------------------------------------------------------- rows and summary
def matrix_rows(stages: list[dict], task_names: list[str], monitor_names: list[str]) -> list[list[float | None]]:
    """accuracy_matrix.csv's rows: the sequence's columns, then one per monitor."""
    return [[s["scores"][n]["score"] for n in task_names]
            + [s.get("monitors", {}).get(n, {}).get("score") for n in monitor_names] for s in stages]


def summarize(stages: list[dict], monitor_names: list[str]) -> dict[str, dict]:
    """Per monitor: init and final score, ``drop`` from init (signed so that > 0 is worse, as forgetting), the
    worst stage and its score. Apart from ACC, forgetting, BWT and FWT, which are over the sequence only."""
    out = {}
    for name in monitor_names:
        scored = [(s["stage"], s["monitors"][name]) for s in stages if name in s.get("monitors", {})]
        if not scored:
            continue
        sign = 1.0 if scored[0][1].get("higher_is_better", True) else -1.0
        worst_stage, worst = min(scored, key=lambda sr: sign * sr[1]["score"])
        init, final = scored[0][1]["score"], scored[-1][1]["score"]
        out[name] = {"init": init, "final": final, "drop": sign * (init - final), "worst_stage": worst_stage,
                     "worst": worst["score"], "higher_is_better": sign > 0,
                     "seconds": round(math.fsum(r.get("seconds", 0.0) for _, r in scored), 3)}
    return out


def print_monitors(console: Console, summary: dict[str, dict]) -> None:
    """The monitors' own table, below the run's summary."""
    if not summary:
        return
    from cl_runner.core.console import print_whole

    table = Table(title="Monitors (never trained; not in ACC/BWT/FWT)", title_justify="left")
    for column in ("monitor", "init", "final", "drop (>0 worse)", "worst stage", "worst", "seconds"):
        table.add_column(column, justify="left" if column in ("monitor", "worst stage") else "right", overflow="fold")
    for name, s in summary.items():
        table.add_row(escape(name), *(f"{s[k]:.3f}" for k in ("init", "final", "drop")), escape(s["worst_stage"]),
                      f"{s['worst']:.3f}", f"{s['seconds']:.1f}")
    print_whole(console, table)
