"""Strategies sized from the model and the free memory (strategies/memory.py): the automatic estimation batch gives
the fixed default's Fisher where that fits, shrinks where it does not, a state that cannot fit is refused before
training in one line naming the option, and an out-of-memory line names the strategy's own options."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
from tiny_lm import one_thread, tiny_model  # noqa: F401 (autouse fixture)

from cl_runner.core.errors import ConfigError
from cl_runner.models.lm import collate
from cl_runner.strategies import memory
from cl_runner.strategies.base import Context
from cl_runner.strategies.der import DER, DERConfig
from cl_runner.strategies.ewc import EWC, EWCConfig
from cl_runner.strategies.gem import GEM, GEMConfig
from cl_runner.strategies.lwf import LwF, LwFConfig
from cl_runner.strategies.merge import FullMerge, MergeConfig
from cl_runner.strategies.ogd import OGD, OGDConfig
from cl_runner.strategies.si_mas import MAS, MASConfig

VOCAB = 50


def make_ctx(model: torch.nn.Module, n: int = 12) -> Context:
    g = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (3 + int(torch.randint(0, 10, (1,), generator=g)),), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:], "task_id": 0})
    return Context(model=model, device=torch.device("cpu"), autocast=contextlib.nullcontext,
                   collate=functools.partial(collate, pad_id=0), task_names=["t0", "t1", "t2"],
                   train_sets=[examples] * 3, batch_size=4, seed=0)


def test_batch_options_take_auto_or_a_positive_integer():
    assert EWCConfig().fisher_batch_size == "auto" and MASConfig().mas_batch_size == "auto"
    assert EWCConfig(fisher_batch_size=4).errors("s") == [] and EWCConfig(fisher_batch_size="8").errors("s") == []
    for bad in (0, -2, "many", 1.5, True):
        assert EWCConfig(fisher_batch_size=bad).errors("s") == [
            f"s.fisher_batch_size: expected auto or a positive integer, got {bad!r}"]
    assert MASConfig(mas_batch_size=0).errors("s") == ["s.mas_batch_size: expected auto or a positive integer, got 0"]


def test_auto_batch_is_the_largest_that_fits_half_the_free_memory():
    per = memory.per_example_gradient_bytes(1000, 4)
    assert per == 8000 and memory.per_example_gradient_bytes(1000, 2) == 10000  # bf16: + its fp32 copy
    assert memory.auto_batch(per, 10**12) == 16  # plenty: the old fixed default, never more
    assert memory.auto_batch(per, 2 * 3 * per + 1) == 3  # half of the free memory holds 3
    assert memory.auto_batch(per, 10) == 1 and memory.auto_batch(per, None) == 16


def test_135m_model_on_24gb_gets_a_batch_that_fits():
    """The issue's case: 134.5M parameters, ~20 GiB available: 16 per-example gradients (17 GiB) do not fit in
    half of it; auto takes 9 (~9.7 GiB)."""
    per = memory.per_example_gradient_bytes(134_500_000, 4)
    assert memory.auto_batch(per, 20 * memory.GIB) == 9


def fisher(cfg: EWCConfig, monkeypatch, free: int | None) -> dict[str, torch.Tensor]:
    monkeypatch.setattr(memory, "free_bytes", lambda device: free)
    ctx = make_ctx(tiny_model(vocab=VOCAB), n=20)
    ctx.task_index = 0
    return EWC(cfg).estimate_fisher(ctx)


def test_auto_gives_the_fixed_defaults_fisher_where_it_fits_and_a_smaller_batch_where_not(monkeypatch):
    fixed = fisher(EWCConfig(fisher_batch_size=16), monkeypatch, None)
    auto = fisher(EWCConfig(), monkeypatch, 10**12)
    assert all(torch.equal(fixed[n], auto[n]) for n in fixed)  # bit for bit: the same batch of 16
    numel = sum(f.numel() for f in fixed.values())
    two = 2 * 2 * memory.per_example_gradient_bytes(numel, 4) + 1  # half of it holds 2 examples' gradients
    calls, real = [], memory.auto_batch
    monkeypatch.setattr(memory, "auto_batch",
                        lambda per, free, cap=16: calls.append(real(per, free, cap)) or calls[-1])
    small = fisher(EWCConfig(), monkeypatch, two)
    assert calls == [2]
    for n in fixed:  # another batch: the same Fisher up to float rounding
        torch.testing.assert_close(small[n], fixed[n], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize(("strategy", "key"), [
    (EWC(EWCConfig()), "strategy.penalised_params"),
    (MAS(MASConfig()), "strategy.penalised_params"),
    (GEM(GEMConfig()), "strategy"),
    (OGD(OGDConfig()), "strategy.max_basis_mb"),
    (LwF(LwFConfig()), "model.dtype"),
    (DER(DERConfig()), "strategy.top_k"),
    (FullMerge(MergeConfig()), "strategy.state_dtype"),
])
def test_a_state_that_cannot_fit_is_refused_before_training_naming_the_option(monkeypatch, strategy, key):
    ctx = make_ctx(tiny_model(vocab=VOCAB))
    strategy.check(ctx)  # the tiny model fits this machine
    monkeypatch.setattr(memory, "free_bytes", lambda device: 1000)
    with pytest.raises(ConfigError) as refused:
        strategy.check(ctx)
    line = str(refused.value)
    assert "\n" not in line and line.startswith(f"{key}: ") and "GiB is free on cpu" in line


def test_free_bytes_reads_the_host():
    free = memory.free_bytes("cpu")
    assert free is not None and free > 2**20
