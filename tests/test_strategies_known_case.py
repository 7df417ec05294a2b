"""The known case for Strategies I on the default sequence (same seed, CPU, default settings): replay and
ewc_replay forget clearly less than naive; ewc forgets less than naive. Plus the sweeps users run
(bad options are in test_bad_inputs.py)."""

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


@pytest.mark.slow
def test_replay_and_ewc_replay_forget_clearly_less_than_naive(forgetting):
    assert forgetting["naive"] >= 0.8
    assert forgetting["replay"] <= forgetting["naive"] - 0.5
    assert forgetting["ewc_replay"] <= forgetting["naive"] - 0.5


@pytest.mark.slow
def test_ewc_forgets_less_than_naive(forgetting):
    assert forgetting["ewc"] <= forgetting["naive"] - 0.2


@pytest.mark.slow
@pytest.mark.parametrize("sweep", [["strategy=ewc", "strategy.ewc_lambda=10,100"],
                                   ["strategy=replay", "strategy.buffer_size=50,200"]])
def test_strategy_sweeps_run_as_multiruns(tmp_path, sweep):
    proc = cl_run("-m", *sweep, "device=cpu", "train.epochs=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (sweep_dir,) = list((tmp_path / "outputs" / "multirun").glob("*/*"))
    key, values = sweep[1].split("=")
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert [p.name.split("_")[0] for p in jobs] == ["0", "1"]
    got = [json.loads((job / "metrics.json").read_text())["config"]["strategy"][key.split(".")[1]] for job in jobs]
    assert got == [float(v) if "lambda" in key else int(v) for v in values.split(",")]
