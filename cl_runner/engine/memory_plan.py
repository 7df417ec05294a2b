"""The memory plan: what one rank will hold while it trains, estimated from the config before anything loads
(weights, gradients, AdamW's two states, the strategy's own state, activations), printed at a run's start and by
``cl-run --plan``; a run whose plan exceeds the device's memory (a GPU's total memory, or the host's available
RAM shared by the ranks on it) is refused in one line naming what would make it fit.

The parameters come from the model's config alone: the model is built on the meta device (shapes, no memory), from
``model.arch`` (its vocabulary at most ``model.tokenizer_vocab_size``) or the pretrained model's config.json (a hub
model's from the local cache only). Under FSDP the weights, gradients, optimizer states and the strategy's parameter
copies are divided among the ranks, plus the blocks FSDP gathers at a time. Activations are the usual transformer
count per token and layer (at full ``train.max_length``: the longest batch; Korthikanti et al., 2022: the block's
input, norms, q/k/v, attention output and the MLP's hidden states; with fused attention, no sequence-squared term),
in the autocast dtype, plus the fp32 logits, their log-softmax and their gradient; with
``train.activation_checkpointing`` one input per block plus one block recomputed at a time. What it leaves out: the
framework itself (Python, torch, the tokenizer: a few hundred MB of host memory), evaluation's batches
(``train.eval_batch_size``) and allocator fragmentation."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from cl_runner.config.schema import Config
from cl_runner.config.task_overrides import strategy_config
from cl_runner.core import dist
from cl_runner.core.errors import ConfigError
from cl_runner.models.load import DTYPES, auto_class, parameter_count
from cl_runner.strategies import build_strategy
from cl_runner.strategies.base import ModelSize, StateNeeds

GIB = 2**30
LOGIT_COPIES = 3  # fp32 logits, the cross-entropy's log-softmax, the logits' gradient


@dataclass
class Shape:
    """The dimensions activations depend on, from the model's config."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int
    gated: bool = False  # a gated MLP (Llama's gate_proj): one more hidden state of the MLP's width


@dataclass
class MemoryPlan:
    """Bytes per rank, by what holds them; ``available``: the device memory this rank may use (None: unknown)."""

    rows: dict[str, int]
    world_size: int
    sharded: bool
    device: str
    available: int | None = None
    ranks_per_device: int = 1  # ranks sharing ``available`` (several CPU processes on one host)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    def text(self) -> str:
        """One compact block for the console."""
        parts = " · ".join(f"{name} {_gib(b)}" for name, b in self.rows.items())
        where = f"{self.world_size} rank(s), {'fsdp-sharded' if self.sharded else 'replicated'}"
        room = ("" if self.available is None else
                f" of {_gib(self.available)} {self.device} memory available"
                f"{f' for {self.ranks_per_device} ranks' if self.ranks_per_device > 1 else ''}")
        return "\n".join([f"memory plan per rank ({where}): {_gib(self.total)}{room}", f"  {parts}",
                          *(f"  {note}" for note in self.notes)])

    def fits(self) -> bool:
        return self.available is None or self.total * self.ranks_per_device <= self.available


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def build_meta(cfg: Config) -> tuple[torch.nn.Module, object]:
    """The configured model on the meta device and its transformers config (no weights read, no memory)."""
    from transformers import AutoConfig

    model_cfg = cfg.model
    if model_cfg.name_or_path is None:
        arch = dict(model_cfg.arch)
        # the trained tokenizer's EOS (its first token) is also its BOS and padding, as models/load.py builds it
        config = AutoConfig.for_model(arch.pop("model_type"), **{"vocab_size": model_cfg.tokenizer_vocab_size,
                                      "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, **arch})
    else:
        source = model_cfg.name_or_path
        path = os.path.expanduser(source) if os.path.isdir(os.path.expanduser(source)) else source
        # a hub model's config only from the local cache: the plan never waits on the network (the loader
        # downloads it; a first run without a cached config has no plan)
        config = AutoConfig.from_pretrained(path, revision=model_cfg.revision, local_files_only=True,
                                            trust_remote_code=model_cfg.trust_remote_code)
    with torch.device("meta"):
        model = auto_class(config).from_config(config, dtype=DTYPES[model_cfg.dtype])
    return model, config


def shape_of(model: torch.nn.Module, config) -> Shape:
    hidden = config.hidden_size
    layers = config.num_hidden_layers + (getattr(config, "num_decoder_layers", 0) or 0)  # T5: both stacks
    intermediate = (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
                    or getattr(config, "d_ff", None) or 4 * hidden)
    gated = any(name.endswith("gate_proj") for name, _ in model.named_modules())
    return Shape(hidden, layers, intermediate, config.vocab_size, gated)


def activation_bytes(shape: Shape, tokens: int, act_bytes: int, checkpointed: bool,
                     chunk_tokens: int | None = None) -> int:
    """Activations kept for the backward of one micro-batch of ``tokens`` tokens (see the module docstring)."""
    per_layer = 9 * shape.hidden + (3 if shape.gated else 2) * shape.intermediate  # elements per token
    blocks = (shape.layers * shape.hidden + per_layer) if checkpointed else shape.layers * per_layer
    embeddings = 2 * shape.hidden  # the embedding's output and the final norm's
    logits = tokens * shape.vocab * 4
    loss = (2 * logits + min(tokens, chunk_tokens) * shape.vocab * 4) if chunk_tokens else LOGIT_COPIES * logits
    return tokens * (blocks + embeddings) * act_bytes + loss


def planned_world_size(cfg: Config) -> int:
    """The number of ranks the run will have: the launcher's (torchrun, srun), else the configured number of
    processes where the config has one, else 1."""
    launched = dist.launch_env()
    if launched:
        return launched["size"]
    return int(getattr(cfg.distributed, "nproc_per_node", None) or 1) if cfg.distributed.kind != "none" else 1


def plan(cfg: Config, world_size: int | None = None, device: torch.device | None = None,
         precision: str = "fp32") -> MemoryPlan:
    """The memory plan of ``cfg`` for one rank of ``world_size`` on ``device`` (None: the host's CPU)."""
    world_size = world_size or planned_world_size(cfg)
    model, config = build_meta(cfg)
    parameters = parameter_count(model)
    param_bytes = DTYPES[cfg.model.dtype].itemsize
    shape = shape_of(model, config)
    tasks = len(cfg.tasks.tasks)
    size = ModelSize(model, parameters, param_bytes, tasks, cfg.train.max_length, shape.vocab)
    needs: StateNeeds = build_strategy(strategy_config(cfg.strategy, cfg.tasks.strategy_overrides)).memory_needs(size)
    trainable = parameters if needs.trainable is None else needs.trainable
    sharded = cfg.distributed.kind == "fsdp" and world_size > 1
    share = world_size if sharded else 1
    rows = {
        "weights": math.ceil(parameters * param_bytes / share),
        "gradients": math.ceil(trainable * param_bytes / share),
        "optimizer": math.ceil(2 * trainable * param_bytes / share),  # AdamW: exp_avg, exp_avg_sq
        "strategy": math.ceil(needs.sharded_bytes / share) + needs.local_bytes,
    }
    if sharded:  # the unsharded block(s) FSDP gathers for the forward and backward: the current and the next
        from cl_runner.engine.parallel import transformer_blocks

        blocks = transformer_blocks(model) if cfg.distributed.wrap == "block" else [model]
        largest = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=parameters)
        rows["weights"] += min(2 * largest, parameters) * param_bytes
    micro = math.ceil(cfg.train.batch_size / world_size / cfg.train.grad_accum)
    act_bytes = 2 if precision in ("bf16", "fp16") else 4
    rows["activations"] = activation_bytes(shape, micro * cfg.train.max_length, act_bytes,
                                           cfg.train.activation_checkpointing, cfg.train.loss_chunk_tokens)
    device = device or torch.device("cpu")
    available, ranks = device_memory(device, world_size)
    notes = [f"{parameters:,} parameters ({trainable:,} trained), micro-batch {micro} x {cfg.train.max_length} "
             f"tokens, {precision}"]
    return MemoryPlan(rows, world_size, sharded, device.type, available, ranks, notes)


def device_memory(device: torch.device, world_size: int) -> tuple[int | None, int]:
    """(bytes this rank may use, ranks sharing them): a GPU's total memory (one rank per GPU), or the host's
    available RAM shared by this node's ranks; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device.index or 0).total_memory, 1
    if device.type != "cpu":
        return None, 1
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return host_available(), max(ranks, 1)


def host_available() -> int | None:
    """The host's available RAM (Linux's MemAvailable: free plus what the kernel can reclaim), None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def refusal(memory: MemoryPlan, cfg: Config) -> str:
    """The one-line refusal of a plan that does not fit, naming the settings that would shrink it."""
    levers = []
    if cfg.distributed.kind != "fsdp":
        levers.append("distributed=fsdp (weights, gradients and optimizer states divided among the ranks)")
    if not cfg.train.activation_checkpointing:
        levers.append("train.activation_checkpointing=true")
    levers.append(f"a smaller micro-batch (train.grad_accum={cfg.train.grad_accum * 2})")
    if memory.rows["gradients"] >= memory.rows["weights"] / 4:
        levers.append("an adapter strategy (strategy=adapters: only the adapters train)")
    if cfg.distributed.kind == "fsdp" and not cfg.distributed.cpu_offload and memory.device == "cuda":
        levers.append("distributed.cpu_offload=true")
    need = memory.total * memory.ranks_per_device
    return (f"memory plan: the run needs about {_gib(need)}"
            f"{f' ({memory.ranks_per_device} ranks x {_gib(memory.total)})' if memory.ranks_per_device > 1 else ''}"
            f" but the {memory.device} has {_gib(memory.available or 0)} available "
            f"({', '.join(f'{k} {_gib(v)}' for k, v in memory.rows.items())}); to fit: {'; '.join(levers)}")


def check(cfg: Config, device: torch.device, precision: str) -> MemoryPlan | None:
    """The run's plan (None when it cannot be made: the model's config unreadable, which loading reports); raise
    ConfigError when it does not fit. Under several processes every rank decides alike (the largest need)."""
    world = dist.world()
    try:
        memory: MemoryPlan | None = plan(cfg, world.size if world.distributed else None, device, precision)
    except Exception:  # noqa: BLE001 - an estimate only: the model's own loading reports a bad config
        memory = None
    over = 0.0 if memory is None or memory.fits() else 1.0
    if world.distributed:  # every rank takes part, also one without a plan: none may wait for the others
        over = dist.all_reduce_max([over])[0]
    if over:
        raise ConfigError(refusal(memory, cfg) if memory is not None and not memory.fits() else
                          "memory plan: the run does not fit another rank's memory (its own line says by how much)")
    return memory


def print_plans(jobs: list) -> int:
    """``cl-run ... --plan``: print every job's plan (preflight's jobs), nothing loaded; returns 0, or raises
    ConfigError (the refusal's line) when a job cannot fit."""
    from cl_runner.engine.runtime import resolve_device

    for job in jobs:
        device, precision = resolve_device(job.config.device)
        try:
            memory = plan(job.config, device=device, precision=precision)
        except OSError as exc:  # a hub model's config not in the local cache
            raise ConfigError(f"memory plan: cannot read the model's config ({' '.join(str(exc).split())[:200]})"
                              ) from None
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(("" if len(jobs) == 1 else f"{job.key}\n") + memory.text())
        if not memory.fits():
            raise ConfigError(refusal(memory, job.config))
    return 0
