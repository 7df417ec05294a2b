"""LAMOL (Sun et al. 2020): the LM also learns to generate its tasks' examples, and replays what it generates
(sampling, parsing and the generation batch are plain functions in ``pseudo.py``)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from cl_runner.core.checks import check_positive
from cl_runner.core.errors import ConfigError
from cl_runner.models.lm import Encoded, causal_lm_loss
from cl_runner.strategies.base import Context, Strategy, StrategyConfig
from cl_runner.strategies.pseudo import (
    after_cue,
    answer_cue,
    end_token,
    generation_batch,
    parse_sample,
    prompt_of,
    sample_after,
)
from cl_runner.strategies.seeding import seeded_rng
from cl_runner.strategies.support import Refused, Supports

GEN_SALT = 51  # ctx.generator salt (+ the earlier task's index): top-k sampling of that task's pseudo-examples
INIT_SALT = 52  # seed offset of the (overwritten) initialisation of the generation tokens' rows


@dataclass
class LAMOLConfig(StrategyConfig):
    name: str = "lamol"
    gen_ratio: float = 0.2  # pseudo-examples per earlier task, as a fraction of the new task's size (0 = off)
    lm_lambda: float = 0.25  # weight of the generation (LM) loss
    top_k: int = 20  # sampling keeps the k most likely tokens
    temperature: float = 1.0  # sampling temperature
    gen_batch_size: int = 64  # sequences sampled at once

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        check_positive(errs, f"{key}.gen_ratio", self.gen_ratio, allow_zero=True)
        check_positive(errs, f"{key}.lm_lambda", self.lm_lambda, allow_zero=True)
        for name in ("top_k", "temperature", "gen_batch_size"):
            check_positive(errs, f"{key}.{name}", getattr(self, name))
        return errs


def generation_share(ctx: Context) -> float:
    """What makes the generation loss of the micro-batch (a mean over its real tokens) add up, once the loop
    has weighted it by the micro-batch's share of the step's *target* tokens, to the generation loss of the
    whole optimizer step (a mean over the step's real tokens): its share of the step's real tokens over that
    weight; 1 with one micro-batch per step, 0 (the term is dropped) for a micro-batch without targets."""
    micro = ctx.micro
    if micro is None or len(micro.examples) == len(micro.step):
        return 1.0
    if micro.weight == 0:
        return 0.0
    real = sum(len(e["input_ids"]) for e in micro.examples) / sum(len(e["input_ids"]) for e in micro.step)
    return real / micro.weight


class LAMOL(Strategy):
    """One generation token per task (``GEN_t``, new rows of the embedding matrix, added before the first
    task). Every optimizer step (real and pseudo examples) gets ``loss + lm_lambda * generation loss``, the
    latter on ``[GEN_t] + prompt + answer + [EOS]`` with every token a target (a second forward pass), averaged
    over the step's real tokens whatever ``train.grad_accum`` is (``generation_share``).

    Before task t, for every earlier task s, ``round(gen_ratio * |D_t|)`` sequences are sampled after
    ``GEN_s`` (top-k, ``temperature``, a generator seeded from the run seed, t and s), parsed at task s's answer
    cue into (prompt, answer) and encoded like real examples of task s (a chat-templated task's end with its
    end-of-turn token, and its cue is the template's generation prompt: ``pseudo.py``); malformed ones (no EOS,
    no cue, empty prompt or answer, a generation token inside) are dropped and counted. Kept ones join task t's training
    set. Each task's latest samples, kept or not, are written to ``lamol_pseudo_<task>.jsonl`` in the run
    directory. ``gen_ratio = 0`` turns LAMOL off: no tokens, no generation loss, no sampling: naive exactly.
    """

    name = "lamol"
    Config = LAMOLConfig
    supports = Supports(
        pack=Refused("its loss hook runs the model again on the batch's rows, with a generation token in front"),
        encoder_decoder=Refused("it generates whole examples (prompt and answer) as one sequence, which a decoder "
                                "does not read"),
        fsdp=Refused("its generation tokens are new rows of the embedding matrix, added before the first task to a "
                     "model FSDP has already sharded; use distributed=ddp",
                     option="gen_ratio", when=lambda cfg: cfg.gen_ratio > 0),  # gen_ratio = 0 is naive
        per_task_options=("lm_lambda",),  # read by ``loss`` at every step
    )

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.first_gen_id: int | None = None  # id of GEN_0 (then GEN_t = first_gen_id + t); None: not added
        self.pseudo: list[Encoded] = []  # the current task's pseudo-examples (of every earlier task)
        self.stats: dict[str, dict[str, int]] = {}  # task -> counts of its latest generation, by outcome
        self.files: dict[str, str] = {}  # artifacts, kept for resume
        self.costs: dict[str, Any] = {}
        self._gen_ids: torch.Tensor | None = None

    def _grow_vocabulary(self, ctx: Context) -> None:
        """One row per task for the generation tokens in the input (and an untied output) embedding matrix,
        each set to the mean of the old rows: deterministic, and no draw from any RNG stream."""
        with seeded_rng(ctx.seed_for(INIT_SALT, task=0), ctx.device):  # HF's own init of the rows, overwritten
            ctx.model.resize_token_embeddings(self.first_gen_id + len(ctx.task_names), mean_resizing=False)
        with torch.no_grad():
            for weight in self._tables(ctx).values():
                weight[self.first_gen_id :] = weight[: self.first_gen_id].mean(0)

    @staticmethod
    def _tables(ctx: Context) -> dict[int, torch.Tensor]:
        """The embedding matrices, a tied input/output pair once."""
        modules = (ctx.model.get_input_embeddings(), ctx.model.get_output_embeddings())
        return {id(m.weight): m.weight for m in modules if m is not None}

    def gen_ids(self, ctx: Context) -> torch.Tensor:
        if self._gen_ids is None:
            self._gen_ids = torch.arange(len(ctx.task_names), device=ctx.device) + self.first_gen_id
        return self._gen_ids

    def before_task(self, ctx: Context) -> None:
        if self.cfg.gen_ratio == 0:
            return
        if self.first_gen_id is None:
            self.first_gen_id = ctx.model.get_input_embeddings().num_embeddings
            self._grow_vocabulary(ctx)
        count = round(self.cfg.gen_ratio * len(ctx.train_sets[ctx.task_index]))
        self.pseudo = [e for s in range(ctx.task_index) for e in self._generate(ctx, s, count)]
        ctx.log(lamol_pseudo_examples=len(self.pseudo))

    def _generate(self, ctx: Context, task: int, count: int) -> list[Encoded]:
        real, name = ctx.train_sets[task], ctx.task_names[task]
        cue = answer_cue(real)
        if not cue:
            raise ConfigError(f"strategy=lamol: the prompts of task {name!r} share no ending (answer cue) to split "
                              "generated examples at; give it a template ending in a fixed cue such as '\\nAnswer:'")
        shortest = min(len(prompt_of(e)) for e in real)
        end = end_token(real, ctx.eos_id)  # EOS, or the end-of-turn token of a chat-templated task
        rows = sample_after(ctx, self.first_gen_id + task, count, max(len(e["input_ids"]) for e in real),
                            end, shortest, self.cfg.top_k, self.cfg.temperature,
                            ctx.generator(GEN_SALT + task), self.cfg.gen_batch_size, after_cue(real, end, cue))
        decode = ctx.decode or (lambda ids: " ".join(map(str, ids)))
        kept, outcomes, lines = [], Counter(), []
        for row in rows:
            example, outcome = (None, "gen_token") if max(row) >= self.first_gen_id else parse_sample(
                row, cue, end, min(len(cue) + 1, shortest), task)
            outcomes[outcome] += 1
            line = {"task": name, "generated_before": ctx.task_name, "outcome": outcome}
            if example is None:
                line["text"] = decode([t for t in row if t < self.first_gen_id])
            else:
                kept.append(example)
                prompt = prompt_of(example)
                line |= {"prompt": decode(prompt), "answer": decode(example["input_ids"][len(prompt) : -1])}
            lines.append(json.dumps(line, ensure_ascii=False) + "\n")
        self.stats[name] = {"sampled": len(rows), **dict(sorted(outcomes.items()))}
        self.files[f"lamol_pseudo_{name}.jsonl"] = ctx.artifacts[f"lamol_pseudo_{name}.jsonl"] = "".join(lines)
        return kept

    def train_dataset(self, ctx: Context, examples: list[Encoded]) -> list[Encoded]:
        return examples + self.pseudo if self.pseudo else examples

    def loss(
        self, ctx: Context, batch: dict[str, torch.Tensor], outputs: Any, loss: torch.Tensor
    ) -> torch.Tensor:
        lm_lambda = self.option(ctx, "lm_lambda")
        if self.cfg.gen_ratio == 0 or lm_lambda == 0:
            return loss
        gen = generation_batch(batch, self.gen_ids(ctx))
        logits = ctx.model(input_ids=gen["input_ids"], attention_mask=gen["attention_mask"]).logits
        generation_loss = causal_lm_loss(logits, gen["labels"])
        ctx.log(lamol_generation_loss=generation_loss.detach())
        scale = generation_share(ctx)
        return loss if scale == 0 else loss + lm_lambda * scale * generation_loss

    def after_task(self, ctx: Context) -> None:
        rows = len(ctx.task_names) if self.first_gen_id is not None else 0
        tables = self._tables(ctx)
        self.costs = {"trainable_parameters": sum(p.numel() for p in ctx.model.parameters() if p.requires_grad),
                      "generation_tokens": rows, "extra_parameters": sum(rows * w.shape[1] for w in tables.values()),
                      "pseudo_examples_trained": len(self.pseudo), "pseudo_examples": dict(self.stats)}

    def on_resume(self, ctx: Context) -> None:
        """Grow the vocabulary as the checkpoint's weights expect, and restore the artifacts to write."""
        if self.first_gen_id is not None:
            self._grow_vocabulary(ctx)
        ctx.artifacts.update(self.files)

    def accounting(self) -> dict[str, Any]:
        return dict(self.costs)

    def state_dict(self) -> dict[str, Any]:
        return {"first_gen_id": self.first_gen_id, "pseudo": self.pseudo, "stats": self.stats, "files": self.files,
                "costs": self.costs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.first_gen_id, self.pseudo = state["first_gen_id"], [dict(e) for e in state["pseudo"]]
        self.stats, self.files, self.costs = dict(state["stats"]), dict(state["files"]), dict(state["costs"])
