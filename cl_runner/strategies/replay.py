"""Experience replay: keep examples of finished tasks in a bounded buffer and mix them into later batches."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from cl_runner.core.checks import check_fraction, check_positive
from cl_runner.models.lm import Encoded
from cl_runner.strategies.base import Context, ModelSize, StateNeeds, Strategy
from cl_runner.strategies.buffer import BufferConfig, ReplayBuffer, buffer_bytes, example_losses

FILL_SALT = 11  # ctx.generator salts: which examples a task leaves in the buffer
MIX_SALT = 12  # ... and which buffer examples join the batches of the next tasks


@dataclass
class ReplayConfig(BufferConfig):
    name: str = "replay"
    replay_ratio: float = 0.25  # fraction of each resulting (mixed) batch drawn from the buffer, in [0, 1)
    replay_batch_size: int | None = None  # buffer examples per batch; overrides replay_ratio when set

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        self.buffer_errors(errs, key)
        check_fraction(errs, f"{key}.replay_ratio", self.replay_ratio, closed_right=False)
        check_positive(errs, f"{key}.replay_batch_size", self.replay_batch_size)
        return errs


class Replay(Strategy):
    """Fills the buffer in ``after_task`` (rules in ``buffer.py``); adds buffer examples to every step batch.

    ``train_batches`` sees optimizer-step batches (the loop cuts them into micro-batches afterwards), so what
    is drawn does not depend on ``train.grad_accum``. For a step batch of ``b`` new examples the expected
    number of buffer examples added is ``x = replay_ratio * b / (1 - replay_ratio)``, so that buffer examples
    make up the fraction ``replay_ratio`` of the resulting batch; when ``replay_batch_size`` is set,
    ``x = replay_batch_size * b / ctx.batch_size``, i.e. ``replay_batch_size`` buffer examples per full step
    (proportionally fewer for an epoch's last, shorter one). Whole examples are added by error diffusion: with
    ``S`` the running sum of ``x``, the k-th step batch gets ``floor(S_k) - floor(S_{k-1})``; over a task the
    totals match the formula to within one example. The examples are drawn uniformly from the buffer
    (``ReplayBuffer.sample``) with a generator seeded per task and saved in ``state_dict``, one draw per step
    batch pulled. Nothing is added while the buffer is empty.
    """

    name = "replay"
    Config = ReplayConfig

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.buffer = ReplayBuffer(cfg.buffer_size, cfg.sampling, cfg.per_task)
        self.owed = 0.0  # running sum of x minus what was already added (error diffusion)
        self.rng: torch.Generator | None = None
        self.rng_task = -1  # task whose MIX_SALT generator ``rng`` is

    def memory_needs(self, size: ModelSize) -> StateNeeds:
        return StateNeeds(local_bytes=buffer_bytes(self.cfg, size))

    def expected_replay(self, ctx: Context, new: int) -> float:
        """``x``: buffer examples owed to a step batch of ``new`` examples (see the class docstring)."""
        if self.cfg.replay_batch_size is not None:
            return self.cfg.replay_batch_size * new / max(ctx.batch_size, 1)
        return self.cfg.replay_ratio * new / (1.0 - self.cfg.replay_ratio)

    def train_batches(self, ctx: Context, batches: Iterable[list[Encoded]]) -> Iterator[list[Encoded]]:
        for batch in batches:
            if len(self.buffer) == 0:
                yield batch
                continue
            if self.rng is None or self.rng_task != ctx.task_index:
                self.rng, self.rng_task = ctx.generator(MIX_SALT), ctx.task_index
            self.owed += self.expected_replay(ctx, len(batch))
            n = math.floor(self.owed)
            self.owed -= n
            yield list(batch) + self.buffer.sample(n, self.rng)

    def after_task(self, ctx: Context) -> None:
        def score(examples: list[Encoded]) -> torch.Tensor:
            return example_losses(ctx, examples, batch_size=max(ctx.batch_size, 1))

        examples = ctx.train_sets[ctx.task_index]
        self.buffer.add_task(ctx.task_index, examples, ctx.generator(FILL_SALT), score)
        ctx.log(buffer_examples=len(self.buffer))

    def accounting(self) -> dict[str, Any]:
        return {"buffer_examples": len(self.buffer), "buffer_tokens": self.buffer.tokens(),
                "buffer_per_task": self.buffer.counts()}

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict(), "owed": self.owed, "rng_task": self.rng_task,
                "rng_state": None if self.rng is None else self.rng.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self.owed, self.rng_task, self.rng = float(state["owed"]), int(state["rng_task"]), None
        if state["rng_state"] is not None:
            self.rng = torch.Generator()
            self.rng.set_state(state["rng_state"])
