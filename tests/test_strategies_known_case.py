"""The known case for Strategies I on the default sequence (same seed, CPU, default settings): replay and
ewc_replay forget clearly less than naive; ewc forgets less than naive. Plus sweeps and bad options via the CLI."""

import json

import pytest

from helpers import cl_run, make_config, run_quietly


@pytest.fixture(scope="module")
def forgetting(tmp_path_factory):
    out = {}
    for name in ("naive", "replay", "ewc", "ewc_replay"):
        result = run_quietly(make_config(f"strategy={name}", small=False), tmp_path_factory.mktemp(name))
        out[name] = result["average_forgetting"]
    return out


def test_replay_and_ewc_replay_forget_clearly_less_than_naive(forgetting):
    assert forgetting["naive"] >= 0.8
    assert forgetting["replay"] <= forgetting["naive"] - 0.5
    assert forgetting["ewc_replay"] <= forgetting["naive"] - 0.5


def test_ewc_forgets_less_than_naive(forgetting):
    assert forgetting["ewc"] <= forgetting["naive"] - 0.2


@pytest.mark.parametrize("sweep", [["strategy=ewc", "strategy.ewc_lambda=10,100"],
                                   ["strategy=replay", "strategy.buffer_size=50,200"]])
def test_strategy_sweeps_run_as_multiruns(tmp_path, sweep):
    proc = cl_run("-m", *sweep, "device=cpu", "train.epochs=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (sweep_dir,) = list((tmp_path / "outputs" / "multirun").glob("*/*"))
    key, values = sweep[1].split("=")
    got = [json.loads((sweep_dir / str(i) / "metrics.json").read_text())["config"]["strategy"][key.split(".")[1]]
           for i in range(2)]
    assert got == [float(v) if "lambda" in key else int(v) for v in values.split(",")]


BAD = [
    (["strategy=ewc", "strategy.ewc_lambda=-1"], "strategy.ewc_lambda: expected a non-negative number"),
    (["strategy=replay", "strategy.buffer_size=0"], "strategy.buffer_size: expected a positive number"),
    (["strategy=replay", "strategy.sampling=fancy"], "strategy.sampling: expected one of reservoir, random"),
    (["strategy=ewc", "strategy.fisher=exact"], "strategy.fisher: expected one of empirical, sampled"),
    (["strategy=lwf", "strategy.temperature=0"], "strategy.temperature: expected a positive number"),
    (["strategy=naive", "strategy.buffer_size=10"], "strategy.buffer_size: unknown key"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_strategy_options_exit_2(tmp_path, args, message):
    proc = cl_run(*args, cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
