"""The memory plan: what one rank will hold while it trains, estimated from the config before anything loads (weights,
gradients, AdamW's two states, the strategy's own state, activations), printed at a run's start and by ``cl-run
--plan``; a run whose plan exceeds the device's memory (a GPU's total memory, or the host's available RAM shared by
the ranks on it) is refused in one line naming what would make it fit.

The parameters come from the model's config alone: the model is built on the meta device (shapes, no memory), from
``model.arch`` (its vocabulary at most ``model.tokenizer_vocab_size``) or the pretrained model's config.json (a hub
model's from the local cache only). Under FSDP the weights, gradients, optimizer states and the strategy's parameter
copies are divided among the ranks, plus the blocks FSDP gathers at a time.

Activations: what autograd saves for the backward of one micro-batch of ``b`` examples of ``L`` tokens (at full
``train.max_length``, plus the soft-prompt tokens of prompt strategies: the longest batch), in the autocast dtype
(``a`` bytes; ``n``: a dropout's saved noise, ``a`` bytes on CPU, where torch multiplies by a float noise tensor, 1
on CUDA, a bool mask), per token, with ``h`` the hidden width, ``q`` and ``kv`` the query and key/value widths
(heads x head size), ``i`` the MLP's width, ``H`` the heads, ``V`` the vocabulary:

- per block ``6h + 2q + 2kv + m i + H + c`` elements: the two norms' inputs and outputs (an RMSNorm also its
  normalised input), q, k, v and the attention's output, the MLP's hidden states (``m = s + 1``, gated ``s + 3``, with
  ``s`` what the activation function itself saves per element, probed once on a small tensor: 1 for GELU/SiLU, 4 for
  GPT-2's tanh ``gelu_new``), the attention's log-sum-exp (H), the norms' statistics (``c`` = 4 for LayerNorm, 2 for
  RMSNorm);
- plus ``2h`` noise elements per block with a hidden dropout (the two residual branches' dropouts);
- unfused attention (``attn_implementation=eager``, or sdpa with attention dropout on CPU, where torch's sdpa falls
  back to its math path): the probabilities, ``H L`` elements per token instead of the log-sum-exp, and with
  attention dropout also its noise and its output (``H L (a + n)`` bytes): the sequence-squared term;
- once: the final norm (``2h + 2`` elements, RMSNorm ``3h + 1``), the embedding dropout's noise (``h``), the loss's
  fp32 log-softmax (``4 V`` bytes).

Measured with ``torch.autograd.graph.saved_tensors_hooks`` (the bytes autograd keeps, exact and independent of
load), this matches GPT-2 and Llama (GQA, eager or sdpa, dropout or not) within 1-7%
(tests/engine/test_memory_plan.py checks it). The backward's peak adds the logits the loop holds (``a V``) and the
fp32 gradients of the log-softmax and of its input (``8 V``). With ``train.activation_checkpointing`` each block
keeps only its input (``h`` elements) and one block is recomputed at a time, after the loss's gradients are gone.
With ``train.loss_chunk_tokens`` the log-softmax exists for one chunk at a time. A strategy's batched
per-example-gradient pass at a task's end (EWC's Fisher, MAS: ``StateNeeds.gradient_examples``) holds one gradient
of the trained parameters per example and, under ``torch.func.vmap(grad(...))``, more than the eval-mode activations
of those examples with unfused attention (``VMAP_FACTOR`` = 1.25 of them: measured by peak RSS 1.1-1.3x after
training steps in scripts/bench_memory.py, where the pass reuses memory the allocator kept, and 1.7-2.0x for the
pass alone in a fresh process, GPT-2 and Llama at 128 and 256 tokens), while the training's gradients and
activations are gone: the plan's activation row is the larger of the two passes.

What it leaves out: the framework itself (Python, torch, the tokenizer: a few hundred MB of host memory; the
measured figures of scripts/bench_memory.py are the rise from just before the model is built), evaluation's batches
(``train.eval_batch_size``), the rotary tables, allocator slack (on CPU, glibc's heap keeps freed activations it
cannot return: peak RSS measured up to 2x the live peak with activation checkpointing, which frees and reallocates a
block at a time; ``MALLOC_MMAP_THRESHOLD_=65536`` in the environment returns large tensors to the system as they are
freed, and the measured peak then follows the plan), and that a frozen layer (adapters, prompts) saves no input for
its weight's gradient (the plan over-counts those). On CUDA under bf16 autocast, a linear layer's input is also kept
in its bf16 copy (not modelled)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from cl_runner.config.schema import Config
from cl_runner.config.task_overrides import strategy_config
from cl_runner.core import dist
from cl_runner.core.errors import ConfigError
from cl_runner.models.load import DTYPES, auto_class, parameter_count
from cl_runner.strategies import build_strategy
from cl_runner.strategies.base import ModelSize, StateNeeds
from cl_runner.strategies.memory import free_bytes

GIB = 2**30
# dropout rates under the names configs give them (the first one present is used)
HIDDEN_DROPOUT = ("resid_pdrop", "hidden_dropout", "hidden_dropout_prob", "dropout", "dropout_rate")
ATTENTION_DROPOUT = ("attn_pdrop", "attention_dropout", "attention_probs_dropout_prob")
EMBEDDING_DROPOUT = ("embd_pdrop", *HIDDEN_DROPOUT)
# torch.func's vmap(grad) of a batch keeps more than a plain backward of it does with unfused attention (the
# module docstring: 1.1-1.3x within a training process, up to 2x for the pass alone in a fresh one)
VMAP_FACTOR = 1.25


@dataclass
class Shape:
    """The dimensions and choices activations depend on, from the model's config (see the module docstring)."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int = 1
    q_width: int = 0  # heads x head size (0: hidden)
    kv_width: int = 0  # key/value heads x head size (0: hidden)
    gated: bool = False  # a gated MLP (Llama's gate_proj): two more hidden states of the MLP's width
    act_saved: float = 1.0  # elements the MLP's activation function saves per element
    rms_norm: bool = False  # RMSNorm (its normalised input kept too) rather than LayerNorm
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    embedding_dropout: float = 0.0
    attention: str = "sdpa"  # the config's attention implementation (eager: always unfused)


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
    """The activation ``Shape`` of ``model`` (on the meta device) and its transformers ``config``."""
    hidden = config.hidden_size
    layers = config.num_hidden_layers + (getattr(config, "num_decoder_layers", 0) or 0)  # T5: both stacks
    intermediate = (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
                    or getattr(config, "d_ff", None) or 4 * hidden)
    heads = _first(config, ("num_attention_heads", "n_head", "num_heads"), 1)
    head = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    gated = any(name.endswith("gate_proj") for name, _ in model.named_modules())
    rms = any("RMSNorm" in type(module).__name__ for module in model.modules())
    act = _first(config, ("hidden_act", "activation_function", "dense_act_fn"), "gelu")
    return Shape(hidden, layers, intermediate, config.vocab_size, heads, heads * head, kv_heads * head, gated,
                 activation_saved(act), rms, float(_first(config, HIDDEN_DROPOUT, 0.0)),
                 float(_first(config, ATTENTION_DROPOUT, 0.0)), float(_first(config, EMBEDDING_DROPOUT, 0.0)),
                 str(getattr(config, "_attn_implementation", None) or "sdpa"))


def _first(config, names: tuple[str, ...], default: Any) -> Any:
    """The first of ``names`` that ``config`` sets (not None), else ``default``."""
    return next((v for v in (getattr(config, n, None) for n in names) if v is not None), default)


def activation_saved(name: str) -> float:
    """Elements transformers' activation function ``name`` saves for its backward per element of its input
    (its input, and whatever intermediates it computes in Python), measured on a small tensor; 1 if unknown."""
    from transformers.activations import ACT2FN

    if not isinstance(name, str) or name not in ACT2FN:
        return 1.0
    x, kept = torch.zeros(64, requires_grad=True), {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept[t.untyped_storage().data_ptr()] = t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ACT2FN[name](x)
    return sum(kept.values()) / x.numel()


def saved_bytes(shape: Shape, batch: int, length: int, act_bytes: int, *, training: bool = True,
                device_type: str = "cpu", checkpointed: bool = False) -> int:
    """The bytes autograd saves in the forward and loss of ``batch`` examples of ``length`` tokens (the module
    docstring's terms; ``checkpointed``: each block's input only)."""
    h, heads = shape.hidden, shape.heads
    noise = act_bytes if device_type == "cpu" else 1  # CPU: a float noise tensor; CUDA: a bool mask
    hidden_drop, attn_drop = (training and shape.hidden_dropout > 0), (training and shape.attention_dropout > 0)
    mlp = shape.act_saved + (3 if shape.gated else 1)
    block = ((6 * h + 2 * (shape.q_width or h) + 2 * (shape.kv_width or h) + mlp * shape.intermediate + heads
              + (2 if shape.rms_norm else 4)) * act_bytes + (2 * h * noise if hidden_drop else 0))
    if shape.attention == "eager" or (attn_drop and device_type == "cpu"):  # unfused: the probabilities
        block += heads * (length - 1) * act_bytes + (heads * length * (act_bytes + noise) if attn_drop else 0)
    final = ((3 * h + 1) if shape.rms_norm else (2 * h + 2)) * act_bytes
    once = final + (h * noise if training and shape.embedding_dropout > 0 else 0) + 4 * shape.vocab
    blocks = shape.layers * h * act_bytes if checkpointed else shape.layers * block
    return int(batch * length * (blocks + once))


def activation_bytes(shape: Shape, batch: int, length: int, act_bytes: int, checkpointed: bool = False,
                     chunk_tokens: int | None = None, *, training: bool = True, device_type: str = "cpu") -> int:
    """The peak of activations in the backward of one micro-batch (see the module docstring): what the forward
    saved, the logits the loop holds and the fp32 gradients of the log-softmax and of its input; with
    ``checkpointed`` the larger of those gradients and the one block recomputed at a time (later, without them)."""
    tokens, vocab = batch * length, shape.vocab
    saved = saved_bytes(shape, batch, length, act_bytes, training=training, device_type=device_type,
                        checkpointed=checkpointed)
    held = tokens * vocab * act_bytes  # the logits, held by the loop until the step ends
    gradients = tokens * vocab * 8  # the log-softmax's and its input's fp32 gradients, at the loss's backward
    if chunk_tokens:  # the log-softmax (and its gradients) of one chunk at a time; the logits' gradient in full
        chunk = min(tokens, chunk_tokens) * vocab * 4
        return saved - tokens * vocab * 4 + held + 2 * tokens * vocab * act_bytes + 3 * chunk
    if checkpointed:  # later, with the log-softmax gone: one block recomputed at a time
        kwargs = {"training": training, "device_type": device_type}
        block = (saved_bytes(replace(shape, layers=1), batch, length, act_bytes, **kwargs)
                 - saved_bytes(replace(shape, layers=0), batch, length, act_bytes, **kwargs))
        return saved + held + max(gradients, block - tokens * vocab * 4)
    return saved + held + gradients


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
    device = device or torch.device("cpu")
    length = cfg.train.max_length + needs.extra_tokens
    rows["activations"] = activation_bytes(shape, micro, length, act_bytes, cfg.train.activation_checkpointing,
                                           cfg.train.loss_chunk_tokens, device_type=device.type)
    notes = [f"{parameters:,} parameters ({trainable:,} trained), micro-batch {micro} x {length} tokens, {precision}"]
    if needs.gradient_examples and not sharded:  # FSDP runs the pass one example at a time (fisher.py)
        examples = needs.gradient_examples
        vmapped = activation_bytes(replace(shape, attention="eager"), examples, cfg.train.max_length, act_bytes,
                                   training=False, device_type=device.type)
        task_end = (int(VMAP_FACTOR * vmapped) + examples * trainable * param_bytes
                    - rows["gradients"])  # training's gradients are gone by then
        if task_end > rows["activations"]:
            rows["activations"] = task_end
            notes.append(f"activations: the task-end pass of {examples} per-example gradients (larger than a "
                         "training step's)")
    available, ranks = device_memory(device, world_size)
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
    """The host's available RAM (MemAvailable: free plus what the kernel can reclaim), as the strategies' own
    memory checks read it; None where it cannot be told."""
    return free_bytes("cpu")


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
