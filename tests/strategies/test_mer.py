"""mer: with one inner step and beta = gamma = 1 it is replay exactly (what is checked: the same accuracy
matrix and bit-identical final weights as replay with the same buffer options and seed, i.e. the same
optimizer steps on the same replay-mixed batches); the Reptile steps are the stated interpolations; an epoch
closes its last meta-batch; the state round-trips mid-meta-batch."""

from __future__ import annotations

import pytest
import torch
from helpers import make_config, run_quietly
from safetensors.torch import load_file
from tiny_lm import one_thread, tiny_context, tiny_model, train  # noqa: F401 (autouse fixture)

from cl_runner.core.errors import ConfigError
from cl_runner.engine.checkpoint import list_checkpoints
from cl_runner.strategies.mer import MER, MERConfig


def final_run(tmp_path, name: str, *overrides: str) -> tuple[list, dict]:
    result = run_quietly(make_config(*overrides, "train.epochs=2", "strategy.buffer_size=32"), tmp_path / name)
    rows = [[stage["scores"][n]["score"] for n in result["tasks"]] for stage in result["stages"]]
    return rows, load_file(str(list_checkpoints(tmp_path / name)[-1] / "model.safetensors"))


@pytest.mark.slow
def test_one_inner_step_with_unit_rates_is_exactly_replay(tmp_path):
    replay_rows, replay_weights = final_run(tmp_path, "replay", "strategy=replay")
    mer_rows, mer_weights = final_run(tmp_path, "mer", "strategy=mer", "strategy.inner_steps=1",
                                      "strategy.beta=1", "strategy.gamma=1")
    assert mer_rows == replay_rows
    assert replay_weights.keys() == mer_weights.keys()
    assert all(torch.equal(replay_weights[k], mer_weights[k]) for k in replay_weights)


def weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def fake_step(model: torch.nn.Module, scale: float) -> None:
    """Stands in for an optimizer step: any change of the weights."""
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(scale * (i + 1) * 1e-3)


@pytest.mark.parametrize(("inner_steps", "meta_batches", "beta", "gamma"), [(2, 1, 0.5, 1.0), (1, 2, 0.5, 0.25),
                                                                            (2, 2, 0.3, 0.6)])
def test_reptile_steps_interpolate_as_stated(inner_steps, meta_batches, beta, gamma):
    model = tiny_model()
    ctx = tiny_context(model)
    mer = MER(MERConfig(inner_steps=inner_steps, meta_batches=meta_batches, beta=beta, gamma=gamma))
    mer.before_task(ctx)
    theta = start_batch = start_group = weights(model)  # the expectation, computed on its own
    for step in range(2 * inner_steps * meta_batches):
        before = weights(model)
        fake_step(model, scale=step + 1)
        theta = theta + (weights(model) - before)
        mer.after_step(ctx)
        if (step + 1) % inner_steps == 0:  # within-batch: theta_W0 + beta (theta - theta_W0)
            theta = start_batch + beta * (theta - start_batch)
            if (step + 1) % (inner_steps * meta_batches) == 0:  # across-batch: theta_A0 + gamma (theta - theta_A0)
                theta = start_group = start_group + gamma * (theta - start_group)
            start_batch = theta
        torch.testing.assert_close(weights(model), theta, atol=1e-6, rtol=0)
    assert mer.reptile.window == 0 and mer.reptile.group == 0


def trained(inner_steps: int, beta: float, epochs: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights before and after task 0 through the real loop (2 steps per epoch, no dropout)."""
    model = tiny_model()
    start = weights(model)
    mer = MER(MERConfig(inner_steps=inner_steps, beta=beta, gamma=1.0))
    train(tiny_context(model), mer, task=0, epochs=epochs)
    assert mer.reptile.window == 0  # every meta-batch was closed
    return start, weights(model)


def test_the_last_epoch_of_a_task_closes_its_shorter_meta_batch():
    """Two optimizer steps in the only epoch, five inner steps per meta-batch: the task's step budget ends the
    epoch mid meta-batch, and its Reptile step must still happen (without it beta changes nothing)."""
    start, plain = trained(inner_steps=5, beta=1.0)  # beta = gamma = 1: no meta-update at all
    start, meta = trained(inner_steps=5, beta=0.5)  # the same two steps, then theta_0 + beta (theta - theta_0)
    torch.testing.assert_close(meta, start + 0.5 * (plain - start), atol=1e-6, rtol=0)


def test_state_round_trips_in_the_middle_of_a_meta_batch():
    model = tiny_model()
    ctx = tiny_context(model)
    cfg = MERConfig(inner_steps=3, beta=0.5)
    mer = MER(cfg)
    mer.before_task(ctx)
    fake_step(model, 1.0)
    mer.after_step(ctx)
    resumed = MER(cfg)
    resumed.load_state_dict(mer.state_dict())
    twin = tiny_model()
    twin.load_state_dict(model.state_dict())
    ctx2 = tiny_context(twin)
    for strategy, m, c in ((mer, model, ctx), (resumed, twin, ctx2)):
        for _ in range(2):
            fake_step(m, 2.0)
            strategy.after_step(c)
    assert torch.equal(weights(model), weights(twin))


@pytest.mark.parametrize(("overrides", "message"), [
    (["strategy.beta=0"], r"strategy.beta: expected a value in \(0, 1\]"),
    (["strategy.gamma=1.5"], r"strategy.gamma: expected a value in \(0, 1\]"),
    (["strategy.inner_steps=0"], "strategy.inner_steps: expected a positive"),
    (["strategy.buffer_size=0"], "strategy.buffer_size: expected a positive"),
])
def test_bad_options_fail_with_their_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_config("strategy=mer", *overrides)


@pytest.mark.gpu
def test_runs_on_cuda_in_bf16(tmp_path):
    result = run_quietly(make_config("strategy=mer", "strategy.meta_batches=2", "device=cuda", "train.epochs=1"),
                         tmp_path)
    assert result["status"] == "completed" and result["precision"] == "bf16"
