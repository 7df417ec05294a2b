"""Sharded evaluation (issue 14): each rank scores every N-th batch of a split and the per-example results are
gathered, so N processes give the single-process scores exactly, for ddp and for fsdp (where every rank makes
the same forward calls: dummy batches, generation stepping until every rank is done).

Quick tests: the batch plan and the gathering; two ranks simulated by threads with in-process collectives.
Slow test: ``torchrun --nproc_per_node=2`` (gloo) runs this file as a script (``worker``) with ddp and fsdp.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from cl_runner.config.schema import EvalConfig
from cl_runner.core import dist
from cl_runner.models import generation
from cl_runner.scoring import evaluate
from cl_runner.scoring.evaluate import Scorer, gather_results, greedy_generate, rank_batches, score_task
from cl_runner.tasks.encode import EncodedTask, EvalItem

EOS = 3
LABELS, LABEL_IDS = ["[20]", "[21, 22]", "[23]"], [[20], [21, 22], [23]]


def _model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64, bos_token_id=EOS,
                        eos_token_id=EOS)
    return GPT2LMHeadModel(config).eval()


def _scorer(model: torch.nn.Module) -> Scorer:
    """Batches of 4 examples: 18 items make 5 batches, so under 2 ranks rank 1 scores one batch fewer."""
    return Scorer(model=model, pad_id=0, eos_id=EOS, device=torch.device("cpu"), autocast=nullcontext,
                  batch_size=4, cfg=EvalConfig(), decode=str)


def _tasks(model: torch.nn.Module) -> dict[str, EncodedTask]:
    """18 items of 1..13 prompt tokens. Prompts of 3 to 5 tokens end with EOS, which this model repeats: the
    second batch (rank 1's first) stops generating after one step, the others run the whole budget. Half the
    exact-match references are the model's own answers, so the score is neither 0 nor 1."""
    gen = torch.Generator().manual_seed(1)
    items = []
    for i in range(18):
        prompt = torch.randint(4, 64, (1 + i * 7 % 13,), generator=gen).tolist()
        prompt = prompt[:-1] + [EOS] if 3 <= len(prompt) <= 5 else prompt
        target = torch.randint(4, 64, (1 + i % 3,), generator=gen).tolist()
        items.append(EvalItem(prompt_ids=prompt, target_ids=target + [EOS], target=LABELS[i % 3]))
    own = greedy_generate(_scorer(model), [it.prompt_ids for it in items], 6)  # 6: the longest target + 2
    answers = [EvalItem(it.prompt_ids, it.target_ids, str(o) if i % 2 else it.target)
               for i, (it, o) in enumerate(zip(items, own, strict=True))]
    return {metric: EncodedTask(name=metric, train=[], validation=[], test=test, label_ids=LABEL_IDS)
            for metric, test in (("exact_match", answers), ("label_accuracy", items), ("perplexity", items))}


def _score_all(scorer: Scorer, tasks: dict[str, EncodedTask]) -> dict[str, dict]:
    return {metric: score_task(scorer, task, metric, "\n", LABELS) for metric, task in tasks.items()}


def _forward_counter(model: torch.nn.Module, counts: Counter, key=lambda: 0) -> None:
    model.register_forward_hook(lambda *_: counts.update([key()]))


# ------------------------------------------------------------------------------------------ the batch plan
@pytest.mark.parametrize("size", [1, 2, 3])
@pytest.mark.parametrize("n_batches", [0, 1, 2, 5, 7])
def test_every_batch_is_scored_by_exactly_one_rank_strided(n_batches, size):
    plans = [rank_batches(n_batches, rank, size, same_calls=False) for rank in range(size)]
    assert sorted(k for plan in plans for k in plan) == list(range(n_batches))
    assert all(plan == list(range(rank, n_batches, size)) for rank, plan in enumerate(plans))
    padded = [rank_batches(n_batches, rank, size, same_calls=True) for rank in range(size)]
    assert len({len(plan) for plan in padded}) == 1  # FSDP: every rank makes as many batches
    assert [[k for k in plan if k is not None] for plan in padded] == plans


def test_gathered_results_come_back_in_example_order_each_once():
    assert gather_results([{0: "a", 2: "c"}, {1: "b", 3: "d"}], 4) == ["a", "b", "c", "d"]
    with pytest.raises(RuntimeError):
        gather_results([{0: "a", 1: "b"}, {1: "b"}], 2)  # scored twice
    with pytest.raises(RuntimeError):
        gather_results([{0: "a"}, {}], 2)  # not scored


# ------------------------------------------------------------------------------------------ ranks as threads
class ThreadRanks:
    """``size`` ranks as threads of this process: ``world()``, ``all_gather_objects`` and ``all_reduce_max`` of
    cl_runner.scoring.evaluate replaced by in-process equivalents (a barrier per collective; a missed one times out)."""

    def __init__(self, size: int, kind: str) -> None:
        self.size, self.kind = size, kind
        self.local, self.slots = threading.local(), [None] * size
        self.events: list[list[str]] = [[] for _ in range(size)]  # per rank: forward, gather, reduce in order
        self.barrier = threading.Barrier(size, timeout=60)

    def world(self) -> dist.World:
        return dist.World(rank=self.local.rank, size=self.size, kind=self.kind)

    def all_gather(self, obj):
        self.local.events.append("gather")
        self.barrier.wait()
        self.slots[self.local.rank] = obj
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out

    def all_reduce_max(self, values):
        self.local.events.append("reduce")
        return [max(column) for column in zip(*self.all_gather(values), strict=True)]

    def run(self, fn) -> list:
        results, errors = [None] * self.size, []

        def body(rank: int) -> None:
            self.local.rank, self.local.events = rank, self.events[rank]
            try:
                results[rank] = fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, in the test's thread
                errors.append(exc)
                self.barrier.abort()

        threads = [threading.Thread(target=body, args=(rank,)) for rank in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_ranks_score_exactly_as_one_and_fsdp_ranks_make_the_same_forwards(monkeypatch, kind):
    model = _model()
    tasks = _tasks(model)
    single = _score_all(_scorer(model), tasks)
    assert 0 < single["exact_match"]["score"] < 1 and 0 < single["label_accuracy"]["score"] < 1
    alone = _forward_count(model, tasks)
    ranks = ThreadRanks(2, kind)
    model.register_forward_hook(lambda *_: ranks.local.events.append("forward"))
    monkeypatch.setattr(evaluate, "world", ranks.world)
    monkeypatch.setattr(evaluate, "all_gather_objects", ranks.all_gather)
    monkeypatch.setattr(generation, "world", ranks.world)
    monkeypatch.setattr(generation, "all_reduce_max", ranks.all_reduce_max)
    both = ranks.run(lambda: _score_all(_scorer(model), tasks))
    assert both == [single, single]  # every number, on every rank
    forwards = [events.count("forward") for events in ranks.events]
    assert all(0 < f < alone for f in forwards)  # each rank scores a share
    if kind == "fsdp":  # forwards are collectives: the same calls in the same order on every rank
        assert ranks.events[0] == ranks.events[1]
    else:  # nothing keeps the ranks in step: rank 0 has a batch more, and generation steps differ
        assert ranks.events[0] != ranks.events[1]


def _forward_count(model: torch.nn.Module, tasks: dict[str, EncodedTask]) -> int:
    """The forward calls of one process scoring ``tasks``."""
    counts = Counter()
    handle = model.register_forward_hook(lambda *_: counts.update([0]))
    _score_all(_scorer(model), tasks)
    handle.remove()
    return counts[0]


def test_progress_counts_every_example_once_on_rank_0(monkeypatch):
    model = _model()
    tasks = _tasks(model)
    ranks, seen = ThreadRanks(2, "ddp"), Counter()
    monkeypatch.setattr(evaluate, "world", ranks.world)
    monkeypatch.setattr(evaluate, "all_gather_objects", ranks.all_gather)

    def score() -> None:
        scorer = _scorer(model)
        scorer.on_examples = lambda n: seen.update({ranks.local.rank: n})
        score_task(scorer, tasks["perplexity"], "perplexity", "\n", None)

    ranks.run(score)
    assert seen[0] == 18  # rank 0 scores one batch per round and reports the round's examples


# ------------------------------------------------------------------------------------------ real processes
def worker(kind: str, out: Path) -> None:
    """One rank of ``torchrun --nproc_per_node=N this_file.py --kind KIND --out DIR``: score the three tasks and
    write ``rank<r>.json`` (scores, the batches this rank planned, its forward calls)."""
    torch.set_num_threads(1)
    model = _model()
    tasks = _tasks(model)  # before sharding: every rank has the same items
    where = dist.join(kind, use_cuda=False, timeout_s=120)
    if where.sharded:
        from cl_runner.config.schema import DistributedConfig
        from cl_runner.engine.parallel import shard

        shard(model, DistributedConfig(kind="fsdp"))
    forwards, planned = Counter(), []
    _forward_counter(model, forwards)
    spy = evaluate.rank_batches
    evaluate.rank_batches = lambda *a, **k: planned.append(spy(*a, **k)) or planned[-1]
    scores = _score_all(_scorer(model), tasks)
    (out / f"rank{where.rank}.json").write_text(json.dumps(
        {"scores": scores, "planned": planned, "forwards": forwards[0], "world": [where.rank, where.size]}))
    dist.leave()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_processes_score_exactly_as_one(tmp_path, kind):
    model = _model()
    single = _score_all(_scorer(model), _tasks(model))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           __file__, "--kind", kind, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [[0, 2], [1, 2]]
    assert [r["scores"] for r in ranks] == [single, single]
    for metric_plan in zip(*(r["planned"] for r in ranks), strict=True):  # per task: the 5 batches, 3 + 2
        assert sorted(k for plan in metric_plan for k in plan if k is not None) == list(range(5))
    if kind == "fsdp":  # a dummy batch on rank 1, and generation stepping until both ranks are done
        assert [r["planned"][0] for r in ranks] == [[0, 2, 4], [1, 3, None]]
        assert ranks[0]["forwards"] == ranks[1]["forwards"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", choices=["ddp", "fsdp"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    worker(args.kind, args.out)
