"""Typed schemas of every config group, stored in Hydra's ConfigStore.

An unknown key or a wrong type fails when Hydra composes the config. Ranges and contradictions are checked by
``validate`` (each schema's ``errors`` method), which reports every problem at once, each naming its key.
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import MISSING as MISSING_FIELD
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from cl_runner.config.task_formats import chat_errors, format_errors
from cl_runner.config.task_overrides import override_errors, task_configs
from cl_runner.core.checks import SEED_MAX, WEIGHT_DTYPES, arch_errors, parse_threads
from cl_runner.core.checks import check_choice as _choice
from cl_runner.core.checks import check_fraction as _fraction
from cl_runner.core.checks import check_positive as _positive
from cl_runner.core.dist import launch_error
from cl_runner.scoring.answers import answer_errors
from cl_runner.scoring.metrics import LABELS, metric_names, needs
from cl_runner.trackers.schema import LoggerConfig

MIN_TOKENIZER_VOCAB = 257  # a trained byte-level BPE holds the 256 byte symbols and EOS before any merge
TASK_SOURCES = ("facts", "datasets")


# ----------------------------------------------------------------------------------------------- model / device
@dataclass
class ModelConfig:
    name_or_path: str | None = None  # hub id or local directory; null = build `arch` with random init
    tokenizer: str | None = None  # hub id or directory; null = name_or_path, or trained on the task text
    arch: dict[str, Any] = field(default_factory=dict)  # {model_type: gpt2, n_layer: ..} when building
    tokenizer_vocab_size: int = 1024  # size of the BPE trained on the tasks' text (built models only)
    dtype: str = "float32"  # weights dtype at load: float32 | bfloat16 | float16
    revision: str | None = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.name_or_path is not None:
            self.arch = {}  # ignored when a pretrained model loads: metrics.json shows only what is used

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        if self.name_or_path is None and "model_type" not in self.arch:
            errs.append(f"{key}.arch.model_type: required when {key}.name_or_path is null (e.g. gpt2)")
        if self.tokenizer_vocab_size < MIN_TOKENIZER_VOCAB:  # the trainer would silently make it 257
            errs.append(f"{key}.tokenizer_vocab_size: expected at least {MIN_TOKENIZER_VOCAB} (the trained BPE's 256 "
                        f"byte symbols and EOS), got {self.tokenizer_vocab_size}")
        _choice(errs, f"{key}.dtype", self.dtype, WEIGHT_DTYPES)
        return errs

    def arch_errors(self, key: str) -> list[str]:
        """``arch`` against its architecture's config class (imports transformers and torch: see Config.errors)."""
        if self.name_or_path is not None or "model_type" not in self.arch:
            return []
        return arch_errors(self.arch, f"{key}.arch")


def used_config(cfg: DictConfig) -> DictConfig:
    """The composed ``cfg`` as a run saves it (config.yaml), holding only what the run uses: with
    ``model.name_or_path`` set, ``model.arch`` is empty, as ``model=gpt2`` has it (the default ``model=tiny``
    brings one, which a pretrained model ignores). A copy when anything changes; ``cfg`` is left as it is."""
    if OmegaConf.select(cfg, "model.name_or_path") is None or not OmegaConf.select(cfg, "model.arch"):
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.model.arch = {}
    return cfg


@dataclass
class DeviceConfig:
    type: str = "auto"  # auto (cuda when present, else cpu) | cpu | cuda | mps
    precision: str = "auto"  # auto (bf16 on cuda when supported, else fp16; fp32 elsewhere) | fp32 | bf16 | fp16
    compile: bool = False  # torch.compile the model (CUDA)
    tf32: bool = True  # allow TF32 matmuls on Ampere+ GPUs
    threads: str = "auto"  # CPU threads: auto (cl_runner/engine/threads.py) | a positive integer

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        _choice(errs, f"{key}.type", self.type, ("auto", "cpu", "cuda", "mps"))
        try:
            parse_threads(self.threads)
        except ValueError as exc:
            errs.append(f"{key}.threads: {exc}")
        _choice(errs, f"{key}.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        if self.type == "cpu" and self.precision == "fp16":
            errs.append(f"{key}.precision: fp16 needs a GPU (device.type=cpu); use fp32 or bf16")
        return errs


@dataclass
class DistributedConfig:
    kind: str = "none"  # none (one process) | ddp (replicated weights) | fsdp (sharded, fully_shard)
    timeout_s: float = 1800.0  # a collective that waits longer fails the job (a rank died or hangs)
    find_unused_parameters: bool = False  # ddp: parameters that get no gradient in some steps (slower when true)
    wrap: str = "block"  # fsdp: block = one FSDP unit per transformer block plus the root; model = the root only
    reshard_after_forward: bool = True  # fsdp: free gathered weights after forward (less memory, one more gather)
    param_dtype: str | None = None  # fsdp: dtype of gathered weights in forward/backward (bfloat16 | float16);
    #                                 null = the weights' own dtype (autocast still follows device.precision)
    reduce_dtype: str | None = None  # fsdp: dtype of the gradient reduce-scatter; null = the gradients' dtype
    cpu_offload: bool = False  # fsdp: keep sharded weights, gradients and optimizer state in host memory
    nproc_per_node: int | None = None  # cl-run starts this many processes itself (one node); null: started by
    #                                    torchrun or srun (engine/launch.py)

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        _choice(errs, f"{key}.kind", self.kind, ("none", "ddp", "fsdp"))
        if self.nproc_per_node is not None:
            _positive(errs, f"{key}.nproc_per_node", self.nproc_per_node)
            if self.kind == "none" and self.nproc_per_node > 1:
                errs.append(f"{key}.nproc_per_node: {self.nproc_per_node} processes need distributed=ddp or "
                            "distributed=fsdp (distributed.kind is none)")
        _choice(errs, f"{key}.wrap", self.wrap, ("block", "model"))
        for name in ("param_dtype", "reduce_dtype"):
            value = getattr(self, name)
            if value is not None:
                _choice(errs, f"{key}.{name}", value, ("float32", "bfloat16", "float16"))
        if not self.timeout_s > 0:
            errs.append(f"{key}.timeout_s: expected a positive number of seconds, got {self.timeout_s}")
        return errs


# ----------------------------------------------------------------------------------------------- tasks
@dataclass
class TaskConfig:
    name: str = MISSING
    source: str = "datasets"  # facts (bundled, generated from the seed) | datasets (datasets.load_dataset)
    metric: str = "exact_match"  # a registered task metric, e.g. label_accuracy, rouge_l (docs/metrics.md)
    # --- source: facts
    relation: str | None = None  # which fictional relation (see cl_runner/tasks/facts.py)
    num_subjects: int = 64
    # --- source: datasets
    path: str | None = None  # hub id, a builder (json, csv, parquet, text) + data_files, or trace (<data_dir>/<subset>)
    subset: str | None = None  # dataset configuration name
    data_files: Any = None  # a path, a list, or {split: path}; relative paths resolve from the launch dir
    data_dir: str | None = None
    revision: str | None = None
    train_split: str = "train"
    validation_split: str | None = None  # null: carve validation_fraction off the training split
    test_split: str = "test"
    validation_fraction: float = 0.1
    input_column: str | None = "input"  # null for plain-text (perplexity) tasks without a prompt
    target_column: str = "target"
    verbalizer: dict[str, str] | None = None  # label value -> answer text; also defines the label set
    labels: list[str] | None = None  # explicit label set (label_accuracy) when there is no verbalizer
    template: str = "{input}\nAnswer:"  # prompt; {input} and any column name, e.g. {question}
    target_template: str = " {target}"
    stop: str = "\n"  # generation stops at EOS or this string
    max_new_tokens: int | None = None  # generation metrics: this task's budget; null = eval.max_new_tokens
    normalizer: str | None = None  # exact_match: default | olora | squad | exact; null = eval.normalizer
    answer_pattern: str | None = None  # generation metrics: answer extraction regex or name; null = eval's
    eval_batch_size: int | None = None  # examples per evaluation batch for this task; null = train.eval_batch_size
    max_train_examples: int | None = None  # subsample (seeded) when set
    max_eval_examples: int | None = None
    max_train_per_class: int | None = None  # at most this many training rows per target_column value (seeded)
    max_eval_per_class: int | None = None  # the same for validation and test; applied before the max_*_examples caps
    epochs: int | None = None  # this task's epochs; null = train.epochs (train.max_steps still wins when set)
    # {strategy name: {option: value}} for this task only, e.g. {adapters: {orthogonal_lambda: 5}}; given to that
    # strategy before the task trains (ctx.options); only the options its class declares per task (supports)
    strategy_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    # --- instruction data and chat models (docs/tasks.md, "Chat models and instruction data")
    format: str = "columns"  # columns (template + columns) | messages (chat `messages` rows) | alpaca (instruction,
    #                          input, output rows): how a row becomes a prompt and a target (cl_runner/tasks/formats.py)
    chat_template: bool | None = None  # format examples with the tokenizer's chat template; null = tasks.chat_template
    system_prompt: str | None = None  # chat_template: a system turn first; null = tasks.system_prompt

    def errors(self, key: str) -> list[str]:
        errs: list[str] = format_errors(self, key)
        _choice(errs, f"{key}.source", self.source, TASK_SOURCES)
        _choice(errs, f"{key}.metric", self.metric, metric_names())
        errs += answer_errors(key, self.normalizer, self.answer_pattern)
        if self.source == "datasets" and not self.path:
            errs.append(f"{key}.path: required for source=datasets (a hub id, or json/csv/parquet + data_files)")
        if self.source == "facts" and not self.relation:
            errs.append(f"{key}.relation: required for source=facts")
        _positive(errs, f"{key}.num_subjects", self.num_subjects)
        _fraction(errs, f"{key}.validation_fraction", self.validation_fraction, closed_right=False)
        _positive(errs, f"{key}.max_train_examples", self.max_train_examples)
        _positive(errs, f"{key}.max_eval_examples", self.max_eval_examples)
        _positive(errs, f"{key}.max_new_tokens", self.max_new_tokens)
        _positive(errs, f"{key}.eval_batch_size", self.eval_batch_size)
        _positive(errs, f"{key}.max_train_per_class", self.max_train_per_class)
        _positive(errs, f"{key}.max_eval_per_class", self.max_eval_per_class)
        _positive(errs, f"{key}.epochs", self.epochs)
        errs += override_errors(self.strategy_overrides, f"{key}.strategy_overrides", per_task=True)
        if self.source == "datasets" and needs(self.metric) == LABELS and not (self.verbalizer or self.labels):
            errs.append(f"{key}.labels: {self.metric} needs a label set (labels or verbalizer)")
        return errs


@dataclass
class MonitorConfig(TaskConfig):
    """A monitor (``tasks.monitor.<name>``): scored at every stage, never trained (docs/monitors.md). Any task
    config, or an lm-evaluation-harness task named by ``lm_eval`` (then the task keys above are not used)."""

    name: str | None = None  # null: the key under tasks.monitor (the name must equal it when set)
    lm_eval: str | None = None  # an lm-evaluation-harness task (mmlu, hellaswag, ...); needs the lm_eval package
    limit: float | None = None  # lm_eval: at most this many examples per (sub)task, a fraction when < 1; null = all
    num_fewshot: int | None = None  # lm_eval: few-shot examples in each prompt; null = the task's own default
    include_path: str | None = None  # lm_eval: a folder of own task YAMLs (relative: from the launch directory)
    score_key: str | None = None  # lm_eval: the result reported, e.g. "acc_norm,none"; null = the task's first metric

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        if self.name is not None and self.name != key.rsplit(".", 1)[-1]:
            errs.append(f"{key}.name: a monitor's name is its key under tasks.monitor; drop name or use that key")
        lm_keys = ("limit", "num_fewshot", "include_path", "score_key")
        set_keys = [f.name for f in fields(TaskConfig) if f.name != "name" and getattr(self, f.name) != _default(f)]
        errs += [f"{key}.{k}: a monitor is never trained; drop it" for k in set_keys
                 if k in ("epochs", "strategy_overrides")]
        if self.lm_eval is None:
            errs += [f"{key}.{k}: only for lm_eval monitors ({key}.lm_eval is null)" for k in lm_keys
                     if getattr(self, k) is not None]
            return errs + super().errors(key)
        errs += [f"{key}.{k}: not used by an lm_eval monitor (the harness task defines it); drop it"
                 for k in set_keys if k not in ("epochs", "strategy_overrides", "eval_batch_size")]
        if importlib.util.find_spec("lm_eval") is None:
            errs.append(f"{key}.lm_eval: needs the lm_eval package, which is not installed "
                        "(pip install 'cl-runner[lm_eval]')")
        _positive(errs, f"{key}.limit", self.limit)
        _positive(errs, f"{key}.num_fewshot", self.num_fewshot, allow_zero=True)
        return errs


def _default(f: Any) -> Any:
    return f.default_factory() if f.default_factory is not MISSING_FIELD else f.default


@dataclass
class TasksConfig:
    name: str = MISSING
    tasks: list[TaskConfig] = field(default_factory=list)
    # Tasks scored at every stage and never trained: {name: task config or {lm_eval: task, ...}} (docs/monitors.md).
    # A dict, so that several +tasks/monitor=... files and +tasks.monitor.NAME=... entries add up; its entries are
    # typed as MonitorConfig by ``validate`` (Hydra cannot take a whole dict into a typed dict from an override).
    monitor: dict[str, Any] = field(default_factory=dict)
    # Compose time only: the definitions a sequence file takes from conf/tasks/catalogue/, which its `tasks` list
    # points at ('${..catalogue.dbpedia}'; Hydra cannot build a list from files, it can build a dict). Emptied once
    # validated, so the validated config (metrics.json) holds each task once, in `tasks`.
    catalogue: dict[str, TaskConfig] = field(default_factory=dict)
    # {strategy name: {option: value}} for the whole sequence, applied before the strategy is built when that
    # strategy runs (a published method's settings; beats strategy.*): cl_runner/config/task_overrides.py
    strategy_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    chat_template: bool = False  # the default of every task's chat_template (a monitor sets its own)
    system_prompt: str | None = None  # the default of every task's system_prompt (with chat_template)

    def __post_init__(self) -> None:
        self.catalogue = {}

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        if not self.tasks:
            errs.append(f"{key}.tasks: expected at least one task")
        names = [t.name for t in self.tasks]
        for dup in sorted({n for n in names if names.count(n) > 1}):
            errs.append(f"{key}.tasks: task name {dup!r} is used twice")
        for i, task in enumerate(self.tasks):
            errs += task.errors(f"{key}.tasks.{i}")
        for name, monitor in self.monitor.items():
            errs += monitor.errors(f"{key}.monitor.{name}")
            if name in names:
                errs.append(f"{key}.monitor.{name}: {name!r} is a task of the sequence (trained); name the monitor "
                            "otherwise")
        errs += override_errors(self.strategy_overrides, f"{key}.strategy_overrides", per_task=False)
        return errs + chat_errors(self, key)


# ----------------------------------------------------------------------------------------------- train / eval
@dataclass
class TrainConfig:
    epochs: int = 40  # per task
    max_steps: int | None = None  # optimizer steps per task; overrides epochs when set
    max_examples: int | None = None  # per task: train on a seeded sample of this many (a task's max_train_examples
    #                                  wins where set); null = all
    batch_size: int = 8  # examples per optimizer step (= micro-batch x grad_accum)
    grad_accum: int = 1  # micro-batches per optimizer step
    log_every: int = 10  # read the loss from the device (progress bar, finiteness check) every N optimizer steps
    loss_chunk_tokens: int | None = None  # training loss over about this many positions at a time (null: all)
    group_by_length: bool = False  # step batches of similar lengths (sorted within windows of 50 batches)
    pack: bool = False  # training micro-batches: short examples concatenated into rows of max_length, kept apart
    activation_checkpointing: bool = False  # recompute each transformer block in backward: less activation memory
    lr: float = 3e-3
    warmup_ratio: float = 0.1  # fraction of each task's steps with linear warmup, then linear decay to 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0  # null disables clipping
    eval_batch_size: int = 64
    max_length: int = 256  # prompt + target tokens; longer prompts are cut in the middle, never the target
    keep_best: bool = True  # validate during the task, restore the best validated epoch's weights at its end
    validate_every: int = 5  # keep_best: validate every N epochs and after the last (only a task > N epochs long)
    max_validation_examples: int | None = None  # keep_best: validate on this many examples per task (seeded)
    eval_batch_tokens: int | None = 8192  # padded tokens per evaluation batch (eval_batch_size caps the examples)

    def validates(self, epoch: int, last_epoch: int) -> bool:
        """Whether the task is validated after ``epoch`` (1-based) of ``last_epoch``: with keep_best, every
        ``validate_every``-th epoch and the last, but only when that makes two or more to choose between (a task of
        ``validate_every`` epochs or fewer, e.g. epochs=1, keeps its last weights, which one validation could only
        confirm)."""
        chooses = last_epoch > self.validate_every  # validated epochs: ceil(last_epoch / validate_every) >= 2
        return self.keep_best and chooses and (epoch % self.validate_every == 0 or epoch == last_epoch)

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        for name in ("epochs", "batch_size", "grad_accum", "lr", "eval_batch_size", "max_length", "max_steps",
                     "max_examples", "validate_every", "max_validation_examples", "eval_batch_tokens"):
            _positive(errs, f"{key}.{name}", getattr(self, name))
        _fraction(errs, f"{key}.warmup_ratio", self.warmup_ratio, closed_right=False)
        _positive(errs, f"{key}.log_every", self.log_every)
        _positive(errs, f"{key}.loss_chunk_tokens", self.loss_chunk_tokens)
        _positive(errs, f"{key}.weight_decay", self.weight_decay, allow_zero=True)
        _positive(errs, f"{key}.max_grad_norm", self.max_grad_norm)
        if self.batch_size > 0 and self.grad_accum > 0 and self.batch_size % self.grad_accum:
            errs.append(f"{key}.batch_size: must be a multiple of {key}.grad_accum ({self.grad_accum})")
        return errs


@dataclass
class EvalConfig:
    length_normalize: bool = False  # label scoring: mean log-prob per token instead of the sum
    lowercase: bool = True  # exact match: compare case-insensitively
    strip_punctuation: bool = True  # exact match: drop trailing . , ; : ! ? and surrounding quotes
    normalizer: str = "default"  # exact match: default (the two above) | olora | squad | exact; a task's wins
    answer_pattern: str | None = None  # generation metrics: regex (or name) whose first group is the answer
    max_new_tokens: int | None = None  # generation budget; null = longest target of the task + 2
    full_every: int = 1  # score every task after every N-th task (and the last); other stages: what metrics need
    max_examples: int | None = None  # per task and split: a seeded sample of this many (a task's max_eval_examples
    #                                  wins where set); null = all
    save_predictions: str = "final"  # per-example predictions/<stage>/<task>.jsonl: final | every (stage) | none

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        _choice(errs, f"{key}.save_predictions", self.save_predictions, ("final", "every", "none"))
        errs += answer_errors(key, self.normalizer, self.answer_pattern)
        _positive(errs, f"{key}.max_new_tokens", self.max_new_tokens)
        _positive(errs, f"{key}.full_every", self.full_every)
        _positive(errs, f"{key}.max_examples", self.max_examples)
        return errs


@dataclass
class CheckpointConfig:
    enabled: bool = True  # checkpoint at the end of every task and within tasks (needed for resume)
    every_n_steps: int | None = None  # null = automatic: often enough to lose little, rarely enough to cost <2%
    keep_last: int = 1  # newest checkpoints kept (2: the older is a fallback if the newest is damaged)
    # auto: within a task only when it is long (every_n_steps set, or an estimated >= 30 min: checkpoint_policy.py);
    # true: also within short tasks; false: only at task ends (and on a stop signal), a resume restarts the task
    mid_task: Any = "auto"

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        _positive(errs, f"{key}.every_n_steps", self.every_n_steps)
        _positive(errs, f"{key}.keep_last", self.keep_last)
        if self.mid_task not in (True, False, "auto"):
            errs.append(f"{key}.mid_task: expected auto, true or false, got {self.mid_task!r}")
        return errs


@dataclass
class SaveConfig:
    final_model: bool = True  # model/: the final model as a save_pretrained directory (tokenizer, chat template;
    #                           adapter strategies: the base and a peft adapter directory per adapter)
    every_task: bool = False  # also models/after_<task>/ after every task but the last (one model copy each)


# ----------------------------------------------------------------------------------------------- root
@dataclass
class Config:
    model: ModelConfig = MISSING
    strategy: Any = MISSING  # the chosen strategy's own Config (cl_runner/strategies/registry.py)
    tasks: TasksConfig = MISSING
    device: DeviceConfig = MISSING
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    save: SaveConfig = field(default_factory=SaveConfig)  # the model a user takes away (engine/takeaway.py)
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # experiment trackers (conf/logger/)
    seed: int = 0
    experiment_name: str = "cl"  # free text, recorded in metrics.json
    paper: dict[str, Any] = field(default_factory=dict)  # published numbers to compare with (cl-report --paper;
    #                                                       conf/experiment/olora_*.yaml); no effect on the run
    debug: bool = False  # show Python tracebacks instead of one-line errors

    def errors(self) -> list[str]:
        errs = self.model.errors("model") + self.device.errors("device") + self.tasks.errors("tasks")
        errs += self.train.errors("train") + self.eval.errors("eval") + self.strategy.errors("strategy")
        errs += self.checkpoint.errors("checkpoint") + self.distributed.errors("distributed")
        # what the strategy's class says it cannot run with (cl_runner/strategies/support.py), for every task's
        # options (the strategy's, with the task's overrides)
        from cl_runner.strategies.registry import strategy_class
        from cl_runner.strategies.support import support_errors

        strategy = strategy_class(self.strategy.name, self.strategy._target_)
        configs = [self.strategy] if errs else task_configs(self.strategy, self.tasks)
        errs += support_errors(strategy, configs, pack=self.train.pack, distributed=self.distributed.kind)
        errs += self.logger.errors("logger")
        if not 0 <= self.seed <= SEED_MAX:
            errs.append(f"seed: expected a non-negative integer, at most {SEED_MAX}, got {self.seed}")
        launch = launch_error(self.distributed.kind, self.distributed.nproc_per_node)
        if launch:
            errs.append(launch)
        if self.distributed.kind == "fsdp" and self.device.precision == "fp16":
            errs.append("device.precision: fp16 is not supported with distributed=fsdp (its gradient scaler is not "
                        "sharded); use bf16")
        if not errs:  # last: its import costs seconds that a plain error need not wait for (the run pays it anyway)
            errs += self.model.arch_errors("model")
        if not errs:  # what an encoder-decoder model cannot run with: the model's limits, then the strategy's
            from cl_runner.models.seq2seq import config_errors, config_is_encoder_decoder

            if config_is_encoder_decoder(self.model):
                errs += config_errors(self) + support_errors(strategy, configs, encoder_decoder=True)
        return errs


def as_dict(obj: Any) -> Any:
    """A schema object as plain JSON-able data."""
    if is_dataclass(obj):
        return {f.name: as_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, list | tuple):
        return [as_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: as_dict(v) for k, v in obj.items()}
    return obj
