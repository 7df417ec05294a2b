"""The known case for Strategies I on the default sequence (same seed, CPU, default settings): replay and
ewc_replay forget clearly less than naive; ewc forgets less than naive. Plus the sweeps users run
(bad options are in test_bad_inputs.py)."""

import json

import pytest
from helpers import cl_run, make_config, run_quietly


@pytest.fixture(scope="module")
def forgetting(tmp_path_factory):
    out = {}
    for name in ("naive", "replay", "ewc", "ewc_replay", "der", "agem"):
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
def test_der_and_agem_forget_less_than_naive(forgetting):
    """Measured at seeds 0, 1, 2 (docs/strategies/projection.md): naive forgets 1.0 at each, DER++ -0.07 to 0.01,
    A-GEM 0.41 to 0.49; seed 0 here (the other strategies' runs are reused)."""
    assert forgetting["der"] <= forgetting["naive"] - 0.5
    assert forgetting["agem"] <= forgetting["naive"] - 0.3


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
