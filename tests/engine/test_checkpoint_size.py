"""Checkpoints that fit the model: nothing stored twice (best weights equal to the weights are a reference, best
weights the previous checkpoint holds are hard-linked, tied weights are stored once), `checkpoint.mid_task=false`
writes only task-end checkpoints, and the sizes docs/checkpoints.md gives are what a run writes."""

from __future__ import annotations

import io
import json

import pytest
import torch
from helpers import make_config
from rich.console import Console

from cl_runner.core import rng
from cl_runner.engine import checkpoint as ckpt
from cl_runner.engine.run import run
from cl_runner.engine.run_state import RunState
from cl_runner.engine.weights import copy_weights, weights_mismatch


class Tied(torch.nn.Module):
    """An embedding tied to the output layer (as GPT-2's wte and lm_head), plus an untied layer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.mid = torch.nn.Embedding(32, 8), torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 32, bias=False)
        self.head.weight = self.emb.weight


def payload() -> dict:
    return {"run": RunState(info={"tasks": []}).to_checkpoint(), "task": None, "strategy": {}, "extras": {},
            "rng": rng.rng_state()}


def shifted(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Best weights that differ from the model's."""
    return {k: v + 1 for k, v in copy_weights(model).items()}


def test_strategy_state_equal_to_the_weights_is_stored_as_a_reference(tmp_path):
    """LwF's teacher (a state dict equal to the weights, tied names included) and an anchor list holding one
    weight's copy and a changed one: state.pt references the equal ones and reading it puts them back."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    teacher = {k: v.clone() for k, v in model.state_dict().items()}
    anchor = [model[1].weight.detach().clone(), model[0].weight.detach() + 1]
    strategy = {"teacher": teacher, "anchor": anchor, "weight": 1.0}
    plain, _ = ckpt.save_checkpoint(tmp_path / "plain", 1, model, {**payload(), "strategy": {"anchor": anchor[1:]}},
                                    None, keep_last=1)
    path, _ = ckpt.save_checkpoint(tmp_path / "refs", 1, model, {**payload(), "strategy": strategy}, None, keep_last=1)
    stored = torch.load(path / "state.pt", weights_only=True)["strategy"]
    assert stored["teacher"]["0.weight"] == {"__cl_weight__": "0.weight"} and stored["anchor"][0] == {
        "__cl_weight__": "1.weight"} and isinstance(stored["anchor"][1], torch.Tensor)
    # the references cost next to nothing: the same state.pt size as a state without the equal tensors
    assert (path / "state.pt").stat().st_size < (plain / "state.pt").stat().st_size + 2048
    back = ckpt.read_checkpoint(path).state["strategy"]
    assert back["teacher"].keys() == teacher.keys()
    assert all(torch.equal(back["teacher"][k], v) for k, v in teacher.items())
    assert all(torch.equal(a, b) for a, b in zip(back["anchor"], anchor, strict=True)) and back["weight"] == 1.0


def test_best_equal_to_the_weights_is_a_reference_and_comes_back_whole(tmp_path):
    model = Tied()
    path, _ = ckpt.save_checkpoint(tmp_path, 1, model, payload(), copy_weights(model), keep_last=2)
    assert not (path / "best.safetensors").exists() and not ckpt.has_best(path)
    read = ckpt.read_checkpoint(path)
    assert read.best_is_model and read.best is None
    best = ckpt.best_weights(read, model, None)
    assert best.keys() == model.state_dict().keys()
    assert all(torch.equal(best[k], v) for k, v in model.state_dict().items())
    best["mid.weight"] += 1  # a copy: training on does not move the best weights
    assert not torch.equal(best["mid.weight"], model.mid.weight)


def test_best_weights_of_tied_models_are_stored_once_and_come_back_tied(tmp_path):
    model, best = Tied(), shifted(Tied())
    path, _ = ckpt.save_checkpoint(tmp_path, 1, model, payload(), best, keep_last=2)
    read = ckpt.read_checkpoint(path)
    assert set(read.best) == {"emb.weight", "mid.weight", "mid.bias"}  # head.weight is emb.weight
    assert weights_mismatch(model, read.shapes, read.best_shapes) is None
    back = ckpt.best_weights(read, model, None)
    assert back.keys() == best.keys() and all(torch.equal(back[k], v) for k, v in best.items())
    model.load_state_dict(back)  # what the loop does at the task's end


def test_unchanged_best_is_hard_linked_and_outlives_the_older_checkpoint(tmp_path):
    model, best = Tied(), shifted(Tied())
    first, _ = ckpt.save_checkpoint(tmp_path, 1, model, payload(), best, keep_last=1)
    with torch.no_grad():
        model.mid.weight += 1  # trained on; the best weights stay
    second, _ = ckpt.save_checkpoint(tmp_path, 2, model, payload(), best, keep_last=1, best_from=first)
    assert not first.exists()  # pruned
    assert (second / "best.safetensors").stat().st_nlink == 1  # the link survived the pruning, alone now
    read = ckpt.read_checkpoint(second)  # manifest, CRC and all
    back = ckpt.best_weights(read, model, None)
    assert all(torch.equal(back[k], v) for k, v in best.items())


def test_best_is_linked_not_copied(tmp_path):
    model, best = Tied(), shifted(Tied())
    first, _ = ckpt.save_checkpoint(tmp_path, 1, model, payload(), best, keep_last=2)
    second, _ = ckpt.save_checkpoint(tmp_path, 2, model, payload(), best, keep_last=2, best_from=first)
    assert (first / "best.safetensors").stat().st_ino == (second / "best.safetensors").stat().st_ino


def run_small(tmp_path, *overrides: str) -> dict:
    cfg = make_config("train.validate_every=1", "checkpoint.keep_last=100", *overrides)
    return run(cfg, tmp_path, console=Console(file=io.StringIO(), width=120))


@pytest.mark.slow
def test_mid_task_false_checkpoints_only_between_tasks(tmp_path):
    metrics = run_small(tmp_path, "checkpoint.every_n_steps=1", "checkpoint.mid_task=false")
    kept = ckpt.list_checkpoints(tmp_path)
    assert metrics["checkpoints"]["count"] == len(kept) == len(metrics["tasks"])
    assert all(ckpt.read_checkpoint(p).state["task"] is None for p in kept)


@pytest.mark.slow
def test_sizes_are_those_the_docs_give(tmp_path):
    """A mid-task checkpoint of the tiny default holds the fp32 weights once (4 B/param), AdamW's two moments
    (8 B per trainable param) and, once validated, the best weights once (4 B/param, tied weights once):
    the rows of the size table in docs/checkpoints.md."""
    metrics = run_small(tmp_path, "checkpoint.every_n_steps=4")
    params = metrics["parameters"]["total"]
    mid = [p for p in ckpt.list_checkpoints(tmp_path) if ckpt.read_checkpoint(p).state["task"] is not None]
    with_best = next(p for p in mid if ckpt.has_best(p))
    weights, best = (with_best / "model.safetensors").stat().st_size, (with_best / "best.safetensors").stat().st_size
    state = (with_best / "state.pt").stat().st_size
    assert weights == pytest.approx(4 * params, rel=0.01)
    assert best == pytest.approx(weights, rel=0.001)  # not the 2.5 MB a copy with both tied names takes
    assert state == pytest.approx(8 * params, rel=0.02)  # moments of every (trainable) parameter, little else
    task_end = [p for p in ckpt.list_checkpoints(tmp_path) if p not in mid]
    assert all(ckpt.checkpoint_bytes(p) == pytest.approx(4 * params, rel=0.05) for p in task_end)
    doc = (ckpt.Path(__file__).resolve().parents[2] / "docs" / "checkpoints.md").read_text()
    assert f"{params / 1e6:.2f}M" in doc  # the tiny default's row
    json.dumps(metrics["checkpoints"])
