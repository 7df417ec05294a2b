"""The strategy interface: explicit no-op hooks that the run and the loop call by name.

A strategy overrides only the hooks it needs. Hooks never touch files or Hydra; everything they may use is on
the ``Context``. Order within one task::

    before_task -> train_dataset -> validation_tasks
      -> [before_epoch -> train_batches -> [[loss per micro-batch]* -> after_backward -> after_step]*
          -> after_epoch -> (validation)]*
    -> after_task

and every evaluation pass (an epoch's validation, or the scoring of the sequence after a stage) is
``[before_eval(task) -> scoring of that task]* -> after_eval``. ``after_epoch`` runs after the epoch's last
optimizer step, also when the task's step budget (``train.max_steps``) ends the epoch early. On resume in the
middle of an epoch, ``before_epoch`` runs again before the remaining step batches (keep it free of counters).

``train_batches`` sees optimizer-step batches (``batch_size`` examples each; whatever it adds joins that step);
the loop then cuts each into ``train.grad_accum`` micro-batches. So nothing a strategy draws depends on
``grad_accum``; the loop weights each micro-batch's loss by its share of the step's target tokens
(``ctx.micro.weight``), which makes a per-micro-batch mean over target tokens, or a penalty added to every
micro-batch, sum to the step's value. A term normalised by some other count (LAMOL's generation loss, averaged
over every real token) rescales itself from the host-side ``ctx.micro`` to stay invariant.

Numbers a strategy wants to see in ``history.jsonl`` and on the progress bar go through ``ctx.log(name=value)``
(a float or a 0-dim tensor: the loop converts it where it reads the loss, so logging costs no extra device sync).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, make_dataclass
from typing import Any, ClassVar

import torch
from omegaconf import MISSING

from cl_runner.core.errors import ConfigError
from cl_runner.models.kinds import CAUSAL_LM, ModelKind
from cl_runner.models.lm import Encoded
from cl_runner.strategies.support import Supports, refuse_model


@dataclass
class MicroBatch:
    """The micro-batch being trained on, as the ``loss`` hook sees it (host lists: reading them costs no sync)."""

    examples: list[Encoded]  # this micro-batch's encoded examples
    step: list[Encoded]  # every example of its optimizer step (what ``train_batches`` yielded)
    weight: float  # the factor the loop multiplies the returned loss by: its share of the step's target tokens
    pack_length: int | None = None  # train.pack: the row length the examples were packed to (lm.pack); else None


@dataclass
class Context:
    """Everything a hook may look at. The engine owns it; each field says which engine code writes it (modules of
    cl_runner/engine/; assembly.build_parts builds it, once per process). Hooks read it and write only ``extras``
    (through ``log``) and ``artifacts``; the loop's fields change as a task trains."""

    # assembly.build_parts; run._run swaps in its torch.compile wrapper (device.compile, CUDA). Strategies add
    # modules to it in place (adapters, columns), never another model
    model: torch.nn.Module
    device: torch.device  # assembly.build_parts (under torchrun on CUDA: this rank's device)
    # assembly.build_parts: a fresh autocast context (nullcontext on CPU/fp32)
    autocast: Callable[[], AbstractContextManager]
    # assembly.build_parts: encoded examples -> batch on the device
    collate: Callable[[list[Encoded]], dict[str, torch.Tensor]]
    task_names: list[str]  # assembly.build_parts: the sequence's tasks, in order
    train_sets: list[list[Encoded]]  # assembly.build_parts: the encoded training examples of every task
    task_index: int = 0  # sequence.SequenceRun.train_task, before each task (0 while the init row is scored)
    batch_size: int = 1  # assembly.build_parts: train.batch_size (examples per optimizer step)
    seed: int = 0  # assembly.build_parts: the run's seed
    optimizer: torch.optim.Optimizer | None = None  # loop: the current task's optimizer, at the task's start
    step: int = 0  # loop: optimizer steps taken in the current task (a resumed task starts at its saved step)
    epoch: int = 0  # loop: the epoch being trained, counted from 0
    # what ``log`` recorded (name -> float or 0-dim tensor): strategies, through ``log``; the loop turns the values
    # into floats in place where it reads them (loop.read_extras); resume.restore puts a checkpoint's back
    extras: dict[str, Any] = field(default_factory=dict)
    # file name -> text for the run's directory: strategies (LAMOL's pseudo-examples); sequence.SequenceRun
    # writes them there at each task's end (rank 0)
    artifacts: dict[str, str] = field(default_factory=dict)
    eos_id: int | None = None  # assembly.build_parts: the tokenizer's EOS id (ends every target); None when unknown
    # assembly.build_parts: token ids -> text, for artifacts users read
    decode: Callable[[list[int]], str] | None = None
    micro: MicroBatch | None = None  # loop: the micro-batch around its forward pass and ``loss``; None otherwise
    # assembly.build_parts: the model's kind, chosen once on the model as loaded (models/kinds.py): batch layout,
    # forward inputs, generation, label scoring
    kind: ModelKind = CAUSAL_LM
    # sequence.for_task, before each task: the task's own strategy options (tasks.tasks.<i>.strategy_overrides.
    # <strategy>), option -> value; read with ``Strategy.option``, which falls back on ``strategy.cfg``
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def task_name(self) -> str:
        return self.task_names[self.task_index]

    def seed_for(self, salt: int = 0, task: int | None = None) -> int:
        """The seed of one random stream: the run seed, a task (the current one by default) and ``salt``."""
        return derived_seed(self.seed, self.task_index if task is None else task, salt)

    def generator(self, salt: int = 0, task: int | None = None) -> torch.Generator:
        """A torch RNG seeded by ``seed_for``: strategies draw from it, never from the global streams."""
        return torch.Generator().manual_seed(self.seed_for(salt, task))

    def log(self, **values: float | torch.Tensor) -> None:
        """Numbers for ``history.jsonl`` (the epoch record's ``extras``) and the progress bar."""
        self.extras.update(values)


def derived_seed(seed: int, task: int, salt: int) -> int:
    """The one formula every seeded stream of a run uses (data order, buffer draws, new modules' init)."""
    return seed * 1_000_003 + task * 7919 + salt


@dataclass(frozen=True)
class Takeaway:
    """What the model a run leaves for users is (``Strategy.takeaway``; engine/takeaway.py writes it): the model
    itself (the default); the frozen base plus the peft LoRA adapters each task is scored with (``adapters``: per
    task name, the adapters active when it is scored, [] for the base alone); or nothing, with the reason
    (``refused``: modules of cl-runner's own that no Hugging Face class loads)."""

    adapters: dict[str, list[str]] | None = None
    refused: str | None = None


@dataclass
class ModelSize:
    """The model a memory plan is made for, before anything loads (engine/memory_plan.py): ``model`` is built on
    the meta device (shapes only, no memory); ``parameters`` counts shared ones once."""

    model: torch.nn.Module
    parameters: int
    param_bytes: int  # bytes per weight element (model.dtype)
    tasks: int
    max_length: int
    vocab: int


@dataclass
class StateNeeds:
    """What a strategy adds to one rank's memory beyond the model, its gradients and its optimizer (``Strategy.
    memory_needs``). ``sharded_bytes``: copies of parameters (anchors, teachers, stored gradients), divided
    among the ranks under FSDP as the weights are; ``local_bytes``: what every rank holds whole (buffers);
    ``trainable``: the parameters the optimizer updates (None: all of the model's); ``gradient_examples``: the
    examples of one batched per-example-gradient pass at a task's end (EWC's Fisher, MAS: their activations
    and one gradient per example at once; 0: none); ``extra_tokens``: tokens each training example gains
    (soft prompts put in front of it)."""

    sharded_bytes: int = 0
    local_bytes: int = 0
    trainable: int | None = None
    gradient_examples: int = 0
    extra_tokens: int = 0

    def __add__(self, other: StateNeeds) -> StateNeeds:
        both = [t for t in (self.trainable, other.trainable) if t is not None]
        return StateNeeds(self.sharded_bytes + other.sharded_bytes, self.local_bytes + other.local_bytes,
                          max(both) if both else None, max(self.gradient_examples, other.gradient_examples),
                          self.extra_tokens + other.extra_tokens)


@dataclass
class StrategyConfig:
    """The options every strategy has; a strategy's own config subclasses it (beside the strategy's class)."""

    name: str = MISSING  # the strategy's registered name (conf/strategy/<name>.yaml)
    _target_: str | None = None  # module.Class of a Strategy defined outside cl-runner (else found by name)

    def errors(self, key: str) -> list[str]:
        """Every problem with the values, each naming its key (``key`` is the config path, e.g. ``strategy``)."""
        return []


def no_options(name: str) -> type[StrategyConfig]:
    """The ``Config`` of a strategy that has no options of its own (only its name)."""
    return make_dataclass(f"{name.title().replace('_', '')}Config", [("name", str, field(default=name))],
                          bases=(StrategyConfig,), namespace={"__module__": __name__})


class Strategy:
    """Plain sequential fine-tuning: every hook is a no-op. Subclasses override what they need.

    A strategy class names itself (``name``), its options (``Config``, a ``StrategyConfig`` dataclass defined
    next to it) and what it can run with (``supports``: ``support.py``); the registry (``registry.py``) finds it
    from the first two. ``cfg`` is the run's options; the current task's own values of the options it may vary
    per task are on the context (``option``).
    """

    name: ClassVar[str] = "naive"
    Config: ClassVar[type[StrategyConfig]] = StrategyConfig
    # what this strategy cannot run with (train.pack, encoder-decoder models, each distributed kind), each with
    # its reason, and the options a task may set per task; checked before anything loads (support.py)
    supports: ClassVar[Supports] = Supports()

    def __init__(self, cfg: Any = None) -> None:
        self.cfg = cfg if cfg is not None else self.Config(name=self.name)

    def option(self, ctx: Context, name: str) -> Any:
        """Option ``name`` for the current task: the task's own value (``ctx.options``) where it sets one, else
        the run's (``self.cfg``). Only for the options ``supports.per_task_options`` declares."""
        if name not in self.supports.per_task_options:
            raise KeyError(f"{type(self).__name__}.option({name!r}): not in its supports.per_task_options")
        return ctx.options.get(name, getattr(self.cfg, name))

    def check(self, ctx: Context) -> None:
        """Once the model is built, before any evaluation or training (also on resume): raise ``ConfigError``
        (one line naming the option) for an option that cannot apply to ``ctx.model``, e.g. a parameter or
        module name that matches nothing. Only look: change nothing. An override calls ``super().check(ctx)``
        first: it refuses a model the strategy does not support (``supports``) when the config check could not
        tell the model's kind."""
        refuse_model(type(self), self.cfg, ctx.kind)

    def memory_needs(self, size: ModelSize) -> StateNeeds:
        """What this strategy will hold during the run, estimated before the model loads (the memory plan):
        nothing by default. Count the largest it gets over ``size.tasks`` tasks."""
        return StateNeeds()

    def before_shard(self, ctx: Context) -> None:
        """Under FSDP only, once, before the model is sharded (``ctx.model`` whole, nothing evaluated or trained
        yet): add every module the run would add later (an adapter per task), so that FSDP shards them with the
        rest; the hooks that add them later find them there. Whatever is added must leave the model's function
        unchanged until its task starts (a LoRA adapter with B = 0, inactive)."""

    def before_task(self, ctx: Context) -> None:
        """Called before training task ``ctx.task_index`` (snapshot a teacher, add an adapter...)."""

    def before_epoch(self, ctx: Context) -> None:
        """At the start of epoch ``ctx.epoch`` (and again when a task resumes in the middle of it)."""

    def after_epoch(self, ctx: Context) -> None:
        """After the epoch's last optimizer step, before its validation (close a meta-batch, for instance)."""

    def train_dataset(self, ctx: Context, examples: list[Encoded]) -> list[Encoded]:
        """The examples to train on for this task (joint training returns all tasks seen so far)."""
        return examples

    def validation_tasks(self, ctx: Context) -> list[int]:
        """Indices of the tasks whose validation score picks the best epoch."""
        return [ctx.task_index]

    def train_batches(self, ctx: Context, batches: Iterable[list[Encoded]]) -> Iterator[list[Encoded]]:
        """The optimizer-step batches (lists of ``ctx.batch_size`` encoded examples, the last of an epoch maybe
        fewer) actually trained on; replay adds its buffer examples here. The loop splits each into micro-batches.
        Draw lazily, for one batch at a time as the loop asks for it: a checkpoint taken after a step must hold
        the state of exactly the batches trained on."""
        yield from batches

    def loss(
        self, ctx: Context, batch: dict[str, torch.Tensor], outputs: Any, loss: torch.Tensor
    ) -> torch.Tensor:
        """The loss to minimise for one micro-batch (``loss``: its mean over target tokens); return
        ``loss + penalty``, never modify in place. The loop multiplies the result by ``ctx.micro.weight``."""
        return loss

    def after_backward(self, ctx: Context) -> None:
        """Gradients of one optimizer step are complete (unscaled, before clipping): gradient surgery here."""

    def after_step(self, ctx: Context) -> None:
        """After each optimizer step (meta-updates, buffer bookkeeping)."""

    def after_task(self, ctx: Context) -> None:
        """After training task ``ctx.task_index`` (best weights restored): estimate a Fisher, fill a buffer..."""

    def before_eval(self, ctx: Context, task_index: int) -> None:
        """Before scoring task ``task_index`` (select that task's adapter, for instance)."""

    def after_eval(self, ctx: Context) -> None:
        """After an evaluation pass (validation or stage scoring): put back what training needs."""

    def accounting(self) -> dict[str, Any]:
        """Costs to report in metrics.json: extra parameters kept, buffer sizes, ..."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume this strategy exactly."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""

    def on_resume(self, ctx: Context) -> None:
        """After ``load_state_dict`` on resume, before the checkpoint's weights are loaded into ``ctx.model``:
        re-create any modules the strategy had added to the model (adapters), so the weights fit."""

    def takeaway(self, ctx: Context) -> Takeaway:
        """What the saved model is (``save.final_model``): the model as it is, unless the strategy added modules
        (LoRA adapters: which ones score which task; prompts or columns: refused, with the reason)."""
        return Takeaway()


def not_made_before_sharding(name: str) -> ConfigError:
    """The error of a strategy that must add a module to a model FSDP has already sharded: the runner did not
    call ``before_shard`` before ``fully_shard``."""
    return ConfigError(f"distributed.kind: strategy {name} cannot run with distributed=fsdp here: it adds modules "
                       "during the run, which must be made before the model is sharded (Strategy.before_shard), "
                       "and this runner did not call it; use distributed=ddp")


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
