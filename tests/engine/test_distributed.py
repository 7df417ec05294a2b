"""Several processes (torchrun, gloo on CPU): the same run at any process count, rank 0 alone writes, and the
launch errors. The support matrix of docs/distributed.md is checked against what these runs observe.

Tolerance. With dropout off, 1 and 2 processes compute the same step gradients up to float rounding: the
gradient all-reduce adds the ranks' halves, where one process sums over the whole batch, and the losses of a
step are added in another order. AdamW divides by the root of the second moment, so a rounding difference of
~1e-7 in an early gradient moves the weights by ~lr x 1e-7 relative, and over this run's ~50 steps per task the
epoch losses drift apart by at most 4e-5 relative (measured: naive 3.9e-5, lwf 2.9e-5, replay 4.6e-6, ewc 3.7e-7,
adapters 2.1e-8, lamol 5.0e-7). The test allows 1e-3: a wrong gradient (a rank's half counted twice, a missing
all-reduce, a different data order) moves the first epoch's loss by more than 1e-2. l2 under fsdp gets 5e-3
(measured 1.0e-3 on the last task): GPT-2's key bias has a true gradient of zero (softmax ignores a constant added
to every key), so its gradient is pure rounding noise, which Adam turns into steps of about lr whatever the noise;
L2's penalty then pulls on those drifted weights, and gradient clipping passes the difference to every weight.
Without clipping the same comparison gives 1.6e-4, and one process with grad_accum=2 already differs by 3.7e-4.
si gets 2e-3 (measured 2.9e-4 with ddp, 2.6e-4 with fsdp; one process with grad_accum=2 drifted as far, 1.0e-3 in
one run): its importance is the sum over steps of -g x (the step's weight change), so a rounding difference in an
early gradient changes every later task's penalty weights as well as the weights themselves. der and gem
(measured up to 1.7e-4; der with per-step insertion 6.2e-4 ddp, 2.9e-4 fsdp: the logits it stores come from each
rank's own forward, rounded to fp16) add a gradient from a second backward pass, summed across ranks in another order.
The accuracy matrix is compared exactly: its cells are counts of correct answers out of 64, and a flip of one
answer is 1.6e-2."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bad_files import write_model_dirs
from helpers import REPO, cl_run, hydra_config

DRIVER = REPO / "tests" / "dist_driver.py"
DOCS = REPO / "docs" / "distributed.md"
STRATEGIES = ["naive", "joint", "replay", "ewc", "l2", "lwf", "ewc_replay", "adapters", "shared_lora", "progressive",
              "mer", "lamol", "der", "agem", "gem", "si", "mas", "ilora", "prompt_tuning", "progressive_prompts",
              "merge", "ogd", "l2p"]
LOSS_RTOL = 1e-3
LOSS_RTOL_OF = {("l2", "fsdp"): 5e-3, ("si", "ddp"): 2e-3, ("si", "fsdp"): 2e-3}  # see the module docstring


# --standalone: a free rendezvous port, so torchrun tests on two pytest-xdist workers never meet
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def torchrun(*args: str, cwd: Path, timeout: float = 900, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([*TORCHRUN[:-1], f"--nproc_per_node={nproc}", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)


def drive(out: Path, kind: str, strategies: list[str] = STRATEGIES, extra: tuple[str, ...] = (),
          nproc: int = 2) -> dict:
    """The driver's results for ``strategies``: in this process for ``none``, else an ``nproc``-process torchrun
    job; ``extra``: more config overrides."""
    job = [str(DRIVER), str(out), kind, ",".join(strategies), *extra]
    if kind == "none":
        done = subprocess.run([sys.executable, *job], cwd=out.parent, capture_output=True, text=True, timeout=900)
    else:
        done = torchrun(*job, cwd=out.parent, nproc=nproc)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    return drive(tmp_path_factory.mktemp("none") / "out", "none")["results"]


def documented_support() -> dict[str, dict[str, str]]:
    """docs/distributed.md's support table: {strategy: {"ddp": "same run" | "refused", "fsdp": ...}}."""
    table = DOCS.read_text().split("<!-- support-matrix:start -->")[1].split("<!-- support-matrix:end -->")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.strip().splitlines()[2:]]
    return {r[0].strip("`"): {"ddp": r[1].split(":")[0], "fsdp": r[2].split(":")[0]} for r in rows}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_processes_train_the_single_process_run_or_refuse_in_one_line(kind, reference, tmp_path):
    report = drive(tmp_path / "out", kind)
    observed = {}
    for strategy, got in report["results"].items():
        assert got["status"] in ("ok", "refused"), f"{strategy}: {got}"
        if got["status"] == "refused":
            assert "\n" not in got["error"] and f"distributed={kind}" in got["error"], got["error"]
            observed[strategy] = "refused"
            continue
        want = reference[strategy]
        assert got["matrix"] == want["matrix"], strategy
        assert got["saved"] == want["saved"], strategy  # model/: the whole model gathered on rank 0, not a shard
        assert len(got["losses"]) == len(want["losses"])
        rtol = LOSS_RTOL_OF.get((strategy, kind), LOSS_RTOL)
        for a, b in zip(got["losses"], want["losses"], strict=True):
            assert abs(a - b) <= rtol * abs(b), (strategy, got["losses"], want["losses"])
        observed[strategy] = "same run"
    assert report["writes_by_rank"][1] == [], "rank 1 wrote files: " + ", ".join(report["writes_by_rank"][1][:5])
    assert any(path.endswith("metrics.json.tmp") for path in report["writes_by_rank"][0])  # write_atomic
    documented = {name: row[kind] for name, row in documented_support().items()}
    assert documented == observed, f"docs/distributed.md's {kind} column is out of date: observed {observed}"
    assert {"naive", "replay", "ewc", "lwf", "adapters"} <= {s for s, v in observed.items() if v == "same run"}
    assert {"mer", "lamol"} & {s for s, v in observed.items() if v == "same run"}


# fsdp's mixed-precision policy as on a GPU: bf16 autocast, weights gathered in bf16, gradients reduced in fp32
BF16 = ("device.precision=bf16", "distributed.param_dtype=bfloat16", "distributed.reduce_dtype=float32")
# the run the tolerances below were measured on: 2 epochs a task, 64 facts scored (the driver's default is shorter)
BF16_RUN = ("train.epochs=2", "eval.max_examples=64")


@pytest.mark.slow
def test_bf16_fsdp_over_gloo_on_one_and_two_processes_trains_the_same_run_within_bf16_rounding(tmp_path):
    """The GPU's bf16 path on CPU: 1 and 2 processes with the same bf16 policy. Tolerance: bf16 keeps 8 bits of
    mantissa (relative rounding 4e-3), so splitting a step's batch over ranks changes its gradients' roundings far
    more than in fp32. The first epoch's mean loss stays within 5e-4 relative (measured 1.1e-4), where a wrong
    gradient (a rank's half missing or counted twice) moves it by more than 1e-2; over the whole run the drift
    grows (measured 2.4e-2 relative at the last epoch; fp32 against bf16 differ by 0.25 there), so every epoch gets
    5e-2; accuracy cells may differ by 6 of 64 answers (measured 4). bf16 must be in effect: its first epoch
    differs from the fp32 reference by more than 2e-4 (measured 6.2e-4)."""
    one, two = (drive(tmp_path / f"n{n}", "fsdp", ["naive"], (*BF16, *BF16_RUN), nproc=n)["results"]["naive"]
                for n in (1, 2))
    assert one["status"] == two["status"] == "ok", (one, two)
    assert json.loads((tmp_path / "n2" / "naive" / "metrics.json").read_text())["precision"] == "bf16"
    (first_one, *rest_one), (first_two, *rest_two) = one["losses"], two["losses"]
    assert abs(first_two - first_one) <= 5e-4 * first_one, (one["losses"], two["losses"])
    for a, b in zip(rest_one, rest_two, strict=True):
        assert abs(a - b) <= 5e-2 * b, (one["losses"], two["losses"])
    cells = [(float(a), float(b)) for ra, rb in zip(one["matrix"], two["matrix"], strict=True)
             for a, b in zip(ra, rb, strict=True)]
    assert all(abs(a - b) <= 6 / 64 + 1e-9 for a, b in cells), (one["matrix"], two["matrix"])
    fp32 = drive(tmp_path / "fp32", "none", ["naive"], BF16_RUN)["results"]["naive"]["losses"][0]
    assert abs(first_one - fp32) > 2e-4 * fp32, (first_one, fp32)


CLI_RUN = ("distributed=ddp", "model=tiny", "train.epochs=1", "train.keep_best=false", "checkpoint.enabled=false")


def one_run(cwd: Path, done: subprocess.CompletedProcess) -> Path:
    """The one run directory a 2-process CLI job left, checked as rank 0 alone writes it."""
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [p for p in (cwd / "outputs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs  # both ranks took rank 0's time-stamped directory
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["distributed"] == {"kind": "ddp", "world_size": 2}
    assert sorted(p.name for p in (runs[0] / "logs").iterdir()) == ["rank1.log"]  # rank 0 logs to cl-run's log
    assert done.stdout.count("Score matrix") == 1  # only rank 0 prints the table
    return runs[0]


@pytest.fixture(scope="module")
def torchrun_cli_run(tmp_path_factory) -> Path:
    """cl-run under torchrun (2 processes, gloo): the run directory."""
    cwd = tmp_path_factory.mktemp("torchrun_cli")
    return one_run(cwd, torchrun("-m", "cl_runner", *CLI_RUN, cwd=cwd))


@pytest.mark.slow
def test_cli_under_torchrun_one_run_directory_rank_logs_and_results_from_rank_0(torchrun_cli_run):
    assert (torchrun_cli_run / "accuracy_matrix.csv").is_file()


@pytest.mark.slow
def test_cl_runs_own_workers_train_the_torchrun_run(torchrun_cli_run, tmp_path):
    """distributed.nproc_per_node=2: cl-run starts the 2 ranks itself (torch's elastic launcher) and they train
    the run torchrun's ranks train, into one directory, rank 0 alone writing and printing."""
    done = cl_run(*CLI_RUN, "distributed.nproc_per_node=2", cwd=tmp_path, timeout=600)
    run_dir = one_run(tmp_path, done)
    own = (run_dir / "accuracy_matrix.csv").read_text()
    assert own == (torchrun_cli_run / "accuracy_matrix.csv").read_text()
    assert "ChildFailedError" not in done.stderr and "torchelastic" not in done.stderr


@pytest.mark.slow
def test_a_model_one_worker_refuses_is_one_line_exit_2_and_leaves_nothing_behind(tmp_path):
    """A bad input only a rank finds after the process group is joined, and only rank 1 (its model path names
    its rank: a truncated safetensors file; rank 0's model is good): the ranks agree on the refusal before any
    leaves, so rank 0 is not killed by the launcher halfway through its start but undoes it (no .hydra/,
    config.yaml, logs/, .lock, metrics.json; the directories the run path needed are removed); rank 0 alone
    prints, and the job's exit status is the rank's own 2."""
    write_model_dirs(tmp_path)
    shutil.copytree(tmp_path / "model-ok", tmp_path / "model-0")
    shutil.copytree(tmp_path / "model-truncated", tmp_path / "model-1")
    done = cl_run("distributed=ddp", "distributed.nproc_per_node=2", "model.name_or_path=model-${oc.env:RANK,ok}",
                  "train.max_length=64", "hydra.run.dir=new/run", cwd=tmp_path, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower() or "stopped" in line]
    assert len(errors) == 1, done.stderr[-3000:]
    assert errors[0].startswith("cl-run: error: rank 1: model.name_or_path: model-1/model.safetensors is damaged "
                                "or truncated"), errors
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(("env", "prints"), [
    ({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}, True),  # torchrun: the first rank of the second node
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, False),
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "1", "SLURM_LOCALID": "1"}, False),  # srun without torchrun
], ids=["torchrun-local-rank-0", "torchrun-local-rank-1", "srun-local-id-1"])
def test_a_rank_refuses_a_missing_device_before_joining_and_only_the_nodes_first_rank_prints(env, prints, tmp_path,
                                                                                             monkeypatch, capsys):
    """A torchrun/srun rank (its environment, in this process): device=cuda without CUDA is answered before the
    process group is joined (it used to crash there, in torch.cuda.set_device, on every rank); the first process
    of each node prints the one line, the others exit 2 silently. (A real torchrun launch of such a refusal:
    tests/strategies/test_strategies_dist.py's lamol case.)"""
    import torch
    import torch.distributed as torch_dist

    from cl_runner import cli

    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as ended:
        cli.main(["distributed=ddp", "device=cuda", "hydra.run.dir=new/run"])
    err = capsys.readouterr().err
    assert ended.value.code == 2 and not torch_dist.is_initialized()
    want = ["cl-run: error: device.type: cuda was requested but no CUDA device is visible (use device=cpu or auto)"]
    assert err.splitlines() == (want if prints else []), err
    assert list(tmp_path.iterdir()) == []


def test_a_single_process_config_started_by_torchrun_on_two_processes_is_refused(tmp_path, monkeypatch):
    from cl_runner.core.dist import launch_error

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    message = launch_error("none")
    assert message and "distributed=ddp" in message and "2 processes" in message
    assert launch_error("ddp") is None


@pytest.mark.parametrize("n,size", [(10, 2), (7, 3), (1, 2), (0, 2), (5, 1)])
def test_rank_slices_are_the_items_in_order_with_sizes_differing_by_at_most_one(n, size):
    from cl_runner.core.dist import shard_bounds

    bounds = [shard_bounds(n, r, size) for r in range(size)]
    assert [i for start, end in bounds for i in range(start, end)] == list(range(n))
    sizes = [end - start for start, end in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_the_ranks_micro_batches_share_the_whole_steps_target_tokens():
    from cl_runner.engine.loop import local_share, split, weighted

    step = [{"input_ids": list(range(4 + i)), "labels": [-100] * 3 + list(range(1 + i))} for i in range(5)]
    one = weighted(split(step, 2))
    two = [local_share(step, 1, rank, 2) for rank in range(2)]
    assert [w for part in two for _, w in part] == pytest.approx([w for _, w in one])
    assert sum(w for part in two for _, w in part) == pytest.approx(1.0)
    assert [e for part in two for examples, _ in part for e in examples] == step  # the single-process order
    lone = local_share(step[:1], 1, 1, 2)  # rank 1 of a one-example step: a zero-weight pass on that example
    assert lone == [(step[:1], 0.0)]


def test_the_docs_table_names_every_strategy():
    assert set(documented_support()) == set(STRATEGIES)
    assert re.search(r"torchrun --nproc_per_node", DOCS.read_text())


def test_slurm_multi_gpu_launcher_config_composes_one_process_per_gpu():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    launcher = hydra_config("hydra/launcher=slurm_ddp", "hydra.launcher.partition=gpu", "distributed=fsdp",
                             "hydra.launcher.nodes=2").hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.nodes) == ("gpu", 2)
    assert launcher.tasks_per_node == launcher.gpus_per_node == 8 and launcher.max_num_timeout > 0


def test_slurm_tasks_without_torchrun_are_ranks(monkeypatch):
    from cl_runner.core.dist import launch_env

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_PROCID", "9")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert launch_env() == {"rank": 9, "size": 16, "local_rank": 1}
    monkeypatch.setenv("SLURM_NTASKS", "1")  # an ordinary one-task Slurm job is not a distributed launch
    assert launch_env() is None


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint_then_resume_finishes(tmp_path):
    """Slurm pre-emption signals every rank, but not at the same instant: the ranks agree at each step boundary,
    so a signal to rank 1 alone stops both after the same step, with one checkpoint, and ``cl-run resume=DIR``
    (cl-run's own workers) completes it."""
    import signal
    import time

    run_dir = tmp_path / "run"
    args = ["-m", "cl_runner", "distributed=ddp", "train.epochs=30", "train.keep_best=false",
            f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen([*TORCHRUN, *args],
                           cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    history = run_dir / "history.jsonl"  # written empty at the start: wait for the first epoch's line
    while not (history.exists() and history.stat().st_size) and time.time() < deadline:
        time.sleep(0.2)
    children = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
    rank1 = [int(pid) for pid in children if b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")]
    assert len(rank1) == 1, children
    os.kill(rank1[0], signal.SIGTERM)
    _, err = job.communicate(timeout=300)
    assert job.returncode != 0 and err.count("exitcode  : 143") + err.count("SIGTERM") >= 1, err[-2000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["checkpoints"]["count"] >= 1
    # resumed by cl-run itself, in a plain process: on as many workers as metrics.json recorded (torchrun's 2)
    resumed = cl_run(f"resume={run_dir}", cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["distributed"]["world_size"] == 2


@pytest.mark.slow
def test_sigterm_to_one_rank_while_loading_ends_the_whole_job_instead_of_hanging(tmp_path):
    """Before the task loop a signal stops a rank at once; the other rank, waiting in a collective, is ended by
    torchrun (the stopped rank exits without the interpreter teardown, which could wait on its process group)."""
    import signal
    import time

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen([*TORCHRUN, "-m", "cl_runner",
                            "distributed=ddp", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    rank1, deadline = [], time.time() + 120
    while not rank1 and time.time() < deadline:
        time.sleep(0.5)
        children = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
        rank1 = [int(p) for p in children if b"RANK=1" in Path(f"/proc/{p}/environ").read_bytes().split(b"\0")]
    time.sleep(3)  # inside cl-run's start-up (imports, composing, joining the group)
    os.kill(rank1[0], signal.SIGTERM)
    _, err = job.communicate(timeout=240)
    assert job.returncode != 0 and "exitcode  : 143" in err, err[-2000:]
