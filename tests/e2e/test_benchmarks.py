"""The benchmarks in scripts/ run end to end at their smallest size and report every row with sane fields
(timings themselves are never asserted)."""

import json
import math

import pytest
from helpers import REPO

TINY = ["--device", "cpu", "--rounds", "1", "--block", "1", "--warmup", "1", "--batch-size", "2",
        "--seq-len", "16"]


@pytest.fixture
def scripts(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import bench_loop
    import bench_strategies

    return bench_loop, bench_strategies


def check_loop_report(report: dict, contenders: tuple[str, ...]) -> None:
    size = report["sizes"]["tiny"]
    assert set(size["contenders"]) == set(contenders)
    for name, row in size["contenders"].items():
        assert "error" not in row, (name, row)
        assert row["tokens_per_s"] > 0 and math.isclose(row["step_ms"] * row["tokens_per_s"], 1000 * 2 * 16)
        assert row["vs_plain"] > 0 and row["peak_memory_mib"] >= 0
        assert row["mfu"] is None  # CPU: no peak FLOP/s
    assert size["contenders"]["plain"]["vs_plain"] == 1.0
    assert report["threads"] >= 1 and size["parameters"] > 0


def test_bench_loop_reports_cl_runner_against_the_plain_loop(scripts, tmp_path, capsys):
    bench_loop, _ = scripts
    report = bench_loop.main([*TINY, "--sizes", "tiny", "--contenders", "cl_runner,plain",
                              "--out", str(tmp_path / "loop.json")])
    check_loop_report(report, ("cl_runner", "plain"))
    assert json.loads((tmp_path / "loop.json").read_text()) == report
    out = capsys.readouterr().out
    assert "torch threads" in out and all(f"\n{name} " in out for name in ("cl_runner", "plain"))


@pytest.mark.slow
def test_bench_loop_every_contender(scripts, tmp_path, capsys):
    bench_loop, _ = scripts
    report = bench_loop.main([*TINY, "--sizes", "tiny"])
    check_loop_report(report, bench_loop.CONTENDERS)
    out = capsys.readouterr().out
    assert all(f"\n{name} " in out for name in bench_loop.CONTENDERS)


def test_bench_loop_rejects_an_unknown_contender(scripts, capsys):
    bench_loop, _ = scripts
    with pytest.raises(SystemExit) as exit_info:
        bench_loop.main(["--contenders", "plain,keras"])
    assert exit_info.value.code == 2 and "keras" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_strategies_every_strategy_through_the_real_loop(scripts, tmp_path, capsys):
    _, bench_strategies = scripts
    report = bench_strategies.main([*TINY, "--setup-steps", "1", "--fisher-samples", "4",
                                    "--fisher-batch-size", "2", "--out", str(tmp_path / "strategies.json")])
    rows = report["strategies"]
    expected = {p.stem for p in (REPO / "conf" / "strategy").glob("*.yaml")}
    assert set(rows) == expected and len(expected) >= 12
    for name, row in rows.items():
        assert row["step_ms"] > 0 and row["vs_naive"] > 0 and row["setup_s"] >= 0, name
    assert rows["naive"]["vs_naive"] == 1.0
    assert rows["naive"]["examples_per_step"] == 2  # the real loop pulled the strategy's batches
    assert rows["replay"]["examples_per_step"] > 2  # replay adds its buffer share to every step
    fisher = report["fisher"]
    assert fisher["speedup"] > 0 and fisher["max_abs_diff"] <= 1e-4 * fisher["max_abs_fisher"]
    saved = json.loads((tmp_path / "strategies.json").read_text())
    assert set(saved["strategies"]) == expected and saved["fisher"]["speedup"] == fisher["speedup"]
    out = capsys.readouterr().out
    assert all(f"\n{name} " in out for name in expected)


@pytest.mark.slow
def test_bench_distributed_reports_memory_per_rank_of_every_kind(monkeypatch, tmp_path, capsys):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import bench_distributed

    report = bench_distributed.main(["--size", "tiny", "--examples", "8", "--batch-size", "4", "--epochs", "2",
                                     "--out", str(tmp_path / "dist.json"), "--keep", str(tmp_path / "runs")])
    rows = report["kinds"]
    assert list(rows) == ["none", "ddp", "fsdp"]
    for kind, row in rows.items():
        assert row["status"] == "ok", (kind, row["errors"])
        assert row["processes"] == (1 if kind == "none" else 2)
        assert len(row["peak_rss_mib_per_rank"]) == row["processes"]  # every rank reported its own figure
        assert row["peak_rss_mib"] > row["baseline_rss_mib"] > 0 and row["tokens_per_s"] > 0
        assert row["parameters"] == rows["none"]["parameters"] > 0  # the same model in every kind
    assert rows["ddp"]["memory_vs_ddp"] == 1.0 and rows["fsdp"]["memory_vs_ddp"] > 0
    assert json.loads((tmp_path / "dist.json").read_text()) == json.loads(json.dumps(report))
    out = capsys.readouterr().out
    assert all(f"\n{kind} " in out for kind in ("none", "ddp", "fsdp"))


def test_bench_generation_compares_with_hf_generate_token_for_token(monkeypatch, tmp_path, capsys):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import bench_generation

    out = tmp_path / "generation.json"
    assert bench_generation.main(["--sizes", "tiny", "--examples", "4", "--batch", "2", "--max-len", "12",
                                  "--max-new-tokens", "4", "--rounds", "1", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["rows_differing"] == 0 and row["ratio"] > 0 and 0 < row["mean_new_tokens"] <= 4
    assert set(row["examples_per_s"]) == {"cl_runner", "hf_generate"} and "ratio" in capsys.readouterr().out
