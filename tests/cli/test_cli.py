"""cl-run through the real CLI in a subprocess: the files of a run, a multirun, and bad input (exit 2, one line)."""

import csv
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import cl_run, main_exit, write_jsonl

from cl_runner import cli
from cl_runner.engine import run as run_module

QUICK = ["device=cpu", "train.epochs=2"]


@pytest.mark.slow
def test_run_writes_matrix_metrics_history_and_config(tmp_path):
    proc = cl_run(*QUICK, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    with open(run_dir / "accuracy_matrix.csv") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["stage", "color", "city", "food"]
    assert [r[0] for r in rows[1:]] == ["init", "after_color", "after_city", "after_food"]
    assert all(0.0 <= float(v) <= 1.0 for r in rows[1:] for v in r[1:])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    for key in ("average_accuracy", "average_forgetting", "backward_transfer", "forward_transfer",
                "average_learning_curve_area", "versions", "config", "wall_time_per_task_s", "device"):
        assert key in metrics
    assert len(metrics["per_task"]) == 3 and metrics["config"]["train"]["epochs"] == 2
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert len(history) == 3 * 2 and {"train_loss", "validation_score", "tokens_per_s"} <= set(history[0])
    assert (run_dir / "config.yaml").exists()
    assert "Score matrix" in proc.stdout and str(run_dir.name) in proc.stdout
    # stdout is a pipe (a log file, Slurm): one whole line per task and stage, in the order they happened
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("cl-run naive"))
    assert header.endswith(" parameters") and "color, city, food" in header  # not wrapped at 80 columns
    stages = [line for line in lines if re.match(r"eval |\[\d/3\] ", line)]
    assert [s.split(" · ")[0] for s in stages] == [
        "eval init", "[1/3] color", "eval after color", "[2/3] city", "eval after city", "[3/3] food",
        "eval after food"]
    assert all(s.split(" · ")[1] == "epoch 2/2" and "loss " in s and s.endswith(" s") for s in stages[1::2])
    assert sum("tok/s" in line for line in lines) == 3 and "…" not in proc.stdout  # no bar printed late, none cut
    assert not list(run_dir.glob(".*.tmp"))


@pytest.mark.slow
def test_multirun_gives_each_job_a_numbered_directory(tmp_path):
    proc = cl_run("-m", "train.lr=1e-3,3e-3", "device=cpu", "train.epochs=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (sweep,) = list((tmp_path / "outputs" / "multirun").glob("*/*"))
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0_device=cpu,train.epochs=1,train.lr=0.001", "1_device=cpu,train.epochs=1,train.lr=0.003"]
    lrs = [json.loads((sweep / j / "metrics.json").read_text())["config"]["train"]["lr"] for j in jobs]
    assert lrs == [1e-3, 3e-3]


def _task_override(tmp_path, **fields):
    base = {"name": "mine", "source": "datasets", "path": "json", "metric": "exact_match",
            "input_column": "question", "target_column": "answer"}
    base.update(fields)
    items = ",".join(f"{k}:{v}" for k, v in base.items())
    return f"tasks.tasks=[{{{items}}}]"


# The full catalogue runs in-process in test_bad_inputs.py; these go through the real console entry point.
BAD = [
    (["strategy=bogus"], "strategy=bogus: unknown option"),
    (["-m", "train.lr=1e-3,-2"], "train.lr: expected a positive number"),  # every sweep job is checked first
    (["model.name_or_path=/does/not/exist"], "model.name_or_path: directory not found"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("args", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_config_exits_2_with_one_line(tmp_path, args, message):
    proc = cl_run(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "outputs").exists() or "name_or_path" in message


@pytest.mark.slow
def test_missing_column_exits_2_naming_the_column(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "reply": "a"}] * 4)
    proc = cl_run(_task_override(tmp_path, data_files="{train:d.jsonl,test:d.jsonl}"), "device=cpu", cwd=tmp_path)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "tasks.tasks.0.target_column: column 'answer' not in" in line and "question, reply" in line
    assert "\n" not in line and "Traceback" not in proc.stdout


# --- a refused start changes no byte of the run it refuses; signals at start-up (issue 12)
def tree(root: Path) -> dict[str, str]:
    """Every path under ``root``: directories as such, files by a hash of their bytes."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


@contextmanager
def locked_by_another_process(run_dir: Path):
    """``run_dir``'s lock held by a live process, as a running cl-run holds it."""
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(600)",
                               str(run_dir / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.kill()
        holder.wait()


@pytest.fixture
def unfinished_run(tmp_path, monkeypatch):
    """A run of one epoch whose status is set back to interrupted, so that resume would continue it."""
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    proc = cl_run("device=cpu", "train.epochs=1", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "metrics.json").write_text(json.dumps({**metrics, "status": "interrupted"}))
    return run_dir


@pytest.mark.slow
def test_every_refused_start_leaves_a_real_run_byte_identical(unfinished_run, capsys):
    run_dir = unfinished_run
    before = tree(run_dir)
    refusals = [
        (["device=cpu", "train.epochs=1", "train.lr=0.01", f"hydra.run.dir={run_dir}"], "different experiment"),
        (["device=cpu", "train.epochs=1", "train.lr=-1", f"hydra.run.dir={run_dir}"], "train.lr: expected a positive"),
        (["device=cpu", "model.name_or_path=/does/not/exist", f"hydra.run.dir={run_dir}"], "different experiment"),
        ([f"resume={run_dir}", "train.lr=0.01"], "resume: train.lr cannot change on resume"),
    ]
    for argv, message in refusals:
        code, lines = main_exit(argv, capsys)
        assert (code, len(lines)) == (2, 1) and message in lines[0], lines
        assert tree(run_dir) == before, argv
    with locked_by_another_process(run_dir):
        for argv in (["device=cpu", "train.epochs=1", f"hydra.run.dir={run_dir}"], [f"resume={run_dir}"]):
            code, lines = main_exit(argv, capsys)
            assert code == 2 and f"run directory {run_dir} is in use by another cl-run" in lines[-1], lines
            assert tree(run_dir) == before, argv
    run_dir.chmod(0o555)
    try:
        code, lines = main_exit([f"resume={run_dir}"], capsys)
    finally:
        run_dir.chmod(0o755)
    assert code == 2 and lines == [f"cl-run: error: resume: {run_dir} is read-only; make it writable "
                                   f"(chmod u+w {run_dir}) to continue the run"]
    assert tree(run_dir) == before
    config_yaml = run_dir / "config.yaml"
    config_yaml.write_text(config_yaml.read_text().replace("n_embd: 128", "n_embd: 64"))  # no longer the checkpoint's
    before = tree(run_dir)
    proc = cl_run(f"resume={run_dir}", cwd=run_dir.parent)  # its own process: no logging set up by the calls above
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) <= 3 and "Traceback" not in proc.stderr, proc.stderr
    assert "does not match" in lines[-1] and "model.arch.n_embd" in lines[-1], proc.stderr
    assert tree(run_dir) == before


def test_losing_concurrent_start_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "live"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text('{"status": "running"}\n')
    before = tree(run_dir)
    with locked_by_another_process(run_dir):
        before = tree(run_dir)
        code, lines = main_exit(["device=cpu", f"hydra.run.dir={run_dir}"], capsys)
    assert code == 2 and lines == [f"cl-run: error: run directory {run_dir} is in use by another cl-run "
                                   f"(lock file {run_dir / '.lock'})"]
    assert tree(run_dir) == before  # no "failed" status written into the live run's metrics.json, no .hydra/


def test_sweep_job_whose_directory_holds_another_experiment_is_left_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    job = tmp_path / "sweep" / "job0"
    (job / ".hydra").mkdir(parents=True)
    for name, text in (("config.yaml", "seed: 7\n"), (".hydra/overrides.yaml", "- seed=7\n"),
                       ("metrics.json", '{"status": "completed"}\n'), ("cli.log", "its own log\n")):
        (job / name).write_text(text)
    before = tree(job)
    code, lines = main_exit(["-m", "device=cpu", "train.lr=0.01", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                             "hydra.sweep.subdir=job${hydra.job.num}"], capsys)
    assert code == 1  # a sweep with a failed job
    assert any(f"{job} already holds a different experiment" in line for line in lines), lines
    assert tree(job) == before


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_before_any_run_starts_gives_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, signum,
                                                                        code):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "preflight", lambda *args: os.kill(os.getpid(), signum))
    assert main_exit(["device=cpu"], capsys) == (code, [
        f"cl-run: stopped by {signal.Signals(signum).name} before any run started; nothing was written"])
    assert list(tmp_path.iterdir()) == []


def interrupt_build(signum: int, wrapped: bool):
    """A build_parts that is stopped by ``signum``, optionally inside a library that re-raises it as its own."""
    def build_parts(*args):
        try:
            os.kill(os.getpid(), signum)
        except BaseException as exc:
            if wrapped:
                raise RuntimeError("a library's own error") from exc
            raise
    return build_parts


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "re-raised by a library"])
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_while_loading_marks_the_run_interrupted_and_it_can_be_resumed(tmp_path, monkeypatch, capsys,
                                                                              signum, code, wrapped):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_module, "build_parts", interrupt_build(signum, wrapped))
    run_dir = tmp_path / "run"
    status, lines = main_exit(["device=cpu", f"hydra.run.dir={run_dir}"], capsys)
    name = signal.Signals(signum).name
    assert (status, lines) == (code, [f"cl-run: stopped by {name}; no checkpoint yet (a resume starts from the "
                                      f"beginning). Resume with: cl-run resume={run_dir}"])
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "interrupted"
    assert (run_dir / "config.yaml").is_file() and (run_dir / ".hydra" / "overrides.yaml").is_file()
    before = tree(run_dir)
    assert main_exit([f"resume={run_dir}"], capsys)[0] == code  # accepted: it got as far as loading again
    assert tree(run_dir) == before


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("after", [0.3, 2.0, 6.0])
def test_signal_early_in_a_real_start_up_is_one_clean_line(tmp_path, signum, code, after):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cl_runner", "device=cpu", f"hydra.run.dir={run_dir}"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(after)  # whichever moment this lands on (imports, composition, loading), the outcome is clean
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err
    lines = [line for line in err.splitlines() if line.startswith("cl-run:")]
    assert len(lines) == 1 and "Traceback" not in err and f"stopped by {signal.Signals(signum).name}" in lines[0]
    if run_dir.exists():  # the run had begun: resumable
        assert json.loads((run_dir / "metrics.json").read_text())["status"] == "interrupted"
        assert (run_dir / "config.yaml").is_file()


@pytest.fixture
def counted(monkeypatch, tmp_path):
    """Compositions, validations and the engine's runs of cli.main in this process: the engine's run() is a
    stand-in that claims the directory and returns, so only cl-run's own work is counted."""
    from hydra._internal.hydra import Hydra

    from cl_runner.config import validate as config_validate
    from cl_runner.engine import run as engine

    found = {"composed": 0, "validated": [], "run": []}
    compose, validate = Hydra.compose_config, config_validate.validate

    def counting_compose(self, *args, **kwargs):
        found["composed"] += 1
        return compose(self, *args, **kwargs)

    def counting_validate(cfg):
        found["validated"].append(validate(cfg))
        return found["validated"][-1]

    def engine_run(config, run_dir, config_yaml, *, hooks, **kwargs):
        found["run"].append(config)
        hooks.claimed(run_dir, False)
        hooks.ended(run_dir, None)
        return {}

    monkeypatch.setattr(Hydra, "compose_config", counting_compose)
    monkeypatch.setattr(config_validate, "validate", counting_validate)
    monkeypatch.setattr(engine, "run", engine_run)
    monkeypatch.chdir(tmp_path)
    return found


def test_a_single_run_is_composed_and_validated_once_and_the_engine_gets_that_config(counted, tmp_path):
    cli.main(["device=cpu", f"hydra.run.dir={tmp_path / 'run'}"])
    assert counted["composed"] == 1 and len(counted["validated"]) == 1
    assert len(counted["run"]) == 1 and counted["run"][0] is counted["validated"][0]
    assert (tmp_path / "run" / ".hydra" / "overrides.yaml").read_text() == "- device=cpu\n"  # Hydra's job files


def test_each_sweep_job_runs_on_the_config_checked_before_the_sweep_started(counted, tmp_path):
    cli.main(["-m", "device=cpu", "seed=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert len(counted["validated"]) == 2  # every job checked up front, none again when it starts
    assert [c.seed for c in counted["run"]] == [1, 2]
    assert all(a is b for a, b in zip(counted["run"], counted["validated"], strict=True))
