"""Typed schemas of every config group, stored in Hydra's ConfigStore.

An unknown key or a wrong type fails when Hydra composes the config. Ranges and contradictions are checked by
``validate`` (each schema's ``errors`` method), which reports every problem at once, each naming its key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from cl_runner.errors import ConfigError

METRICS = ("exact_match", "label_accuracy", "perplexity")
TASK_SOURCES = ("facts", "datasets")


def _choice(errors: list[str], key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        errors.append(f"{key}: expected one of {', '.join(allowed)}, got {value!r}")


def _positive(errors: list[str], key: str, value: Any, allow_zero: bool = False) -> None:
    if value is None:
        return
    if (value < 0) if allow_zero else (value <= 0):
        errors.append(f"{key}: expected a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")


def _fraction(errors: list[str], key: str, value: Any, closed_right: bool = True) -> None:
    if value is not None and not (0 <= value <= 1 if closed_right else 0 <= value < 1):
        errors.append(f"{key}: expected a value in [0, 1{']' if closed_right else ')'}, got {value!r}")


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

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        if self.name_or_path is None and "model_type" not in self.arch:
            errs.append(f"{key}.arch.model_type: required when {key}.name_or_path is null (e.g. gpt2)")
        _positive(errs, f"{key}.tokenizer_vocab_size", self.tokenizer_vocab_size)
        _choice(errs, f"{key}.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        return errs


@dataclass
class DeviceConfig:
    type: str = "auto"  # auto (cuda when present, else cpu) | cpu | cuda | mps
    precision: str = "auto"  # auto (bf16 on cuda when supported, else fp16; fp32 elsewhere) | fp32 | bf16 | fp16
    compile: bool = False  # torch.compile the model (CUDA)
    tf32: bool = True  # allow TF32 matmuls on Ampere+ GPUs

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        _choice(errs, f"{key}.type", self.type, ("auto", "cpu", "cuda", "mps"))
        _choice(errs, f"{key}.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        if self.type == "cpu" and self.precision == "fp16":
            errs.append(f"{key}.precision: fp16 needs a GPU (device.type=cpu); use fp32 or bf16")
        return errs


# ----------------------------------------------------------------------------------------------- tasks
@dataclass
class TaskConfig:
    name: str = MISSING
    source: str = "datasets"  # facts (bundled, generated from the seed) | datasets (datasets.load_dataset)
    metric: str = "exact_match"  # exact_match | label_accuracy | perplexity
    # --- source: facts
    relation: str | None = None  # which fictional relation (see cl_runner/tasks/facts.py)
    num_subjects: int = 64
    # --- source: datasets
    path: str | None = None  # hub id, or a builder name (json, csv, parquet, text) with data_files
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
    max_train_examples: int | None = None  # subsample (seeded) when set
    max_eval_examples: int | None = None
    max_train_per_class: int | None = None  # at most this many training rows per target_column value (seeded)
    max_eval_per_class: int | None = None  # the same for validation and test; applied before the max_*_examples caps

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        _choice(errs, f"{key}.source", self.source, TASK_SOURCES)
        _choice(errs, f"{key}.metric", self.metric, METRICS)
        if self.source == "datasets" and not self.path:
            errs.append(f"{key}.path: required for source=datasets (a hub id, or json/csv/parquet + data_files)")
        if self.source == "facts" and not self.relation:
            errs.append(f"{key}.relation: required for source=facts")
        _positive(errs, f"{key}.num_subjects", self.num_subjects)
        _fraction(errs, f"{key}.validation_fraction", self.validation_fraction, closed_right=False)
        _positive(errs, f"{key}.max_train_examples", self.max_train_examples)
        _positive(errs, f"{key}.max_eval_examples", self.max_eval_examples)
        _positive(errs, f"{key}.max_train_per_class", self.max_train_per_class)
        _positive(errs, f"{key}.max_eval_per_class", self.max_eval_per_class)
        if self.metric == "label_accuracy" and self.source == "datasets" and not (self.verbalizer or self.labels):
            errs.append(f"{key}.labels: label_accuracy needs a label set (labels or verbalizer)")
        return errs


@dataclass
class TasksConfig:
    name: str = MISSING
    tasks: list[TaskConfig] = field(default_factory=list)

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        if not self.tasks:
            errs.append(f"{key}.tasks: expected at least one task")
        names = [t.name for t in self.tasks]
        for dup in sorted({n for n in names if names.count(n) > 1}):
            errs.append(f"{key}.tasks: task name {dup!r} is used twice")
        for i, task in enumerate(self.tasks):
            errs += task.errors(f"{key}.tasks.{i}")
        return errs


# ----------------------------------------------------------------------------------------------- train / eval
@dataclass
class TrainConfig:
    epochs: int = 40  # per task
    max_steps: int | None = None  # optimizer steps per task; overrides epochs when set
    batch_size: int = 8  # examples per optimizer step (= micro-batch x grad_accum)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3
    warmup_ratio: float = 0.1  # fraction of each task's steps with linear warmup, then linear decay to 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0  # null disables clipping
    eval_batch_size: int = 64
    max_length: int = 256  # prompt + target tokens; longer prompts are cut in the middle, never the target
    keep_best: bool = True  # validate every epoch, restore the best epoch's weights at the end of the task

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        for name in ("epochs", "batch_size", "grad_accum", "lr", "eval_batch_size", "max_length", "max_steps"):
            _positive(errs, f"{key}.{name}", getattr(self, name))
        _fraction(errs, f"{key}.warmup_ratio", self.warmup_ratio, closed_right=False)
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
    max_new_tokens: int | None = None  # generation budget; null = longest target of the task + 2

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        _positive(errs, f"{key}.max_new_tokens", self.max_new_tokens)
        return errs


@dataclass
class CheckpointConfig:
    enabled: bool = True  # checkpoint at the end of every task and within tasks (needed for resume)
    every_n_steps: int | None = None  # null = automatic: often enough to lose little, rarely enough to cost <2%
    keep_last: int = 2  # newest checkpoints kept (the previous one is the fallback if the newest is damaged)

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        _positive(errs, f"{key}.every_n_steps", self.every_n_steps)
        _positive(errs, f"{key}.keep_last", self.keep_last)
        return errs


# ----------------------------------------------------------------------------------------------- strategies
@dataclass
class StrategyConfig:
    name: str = MISSING

    def errors(self, key: str) -> list[str]:
        return []


@dataclass
class NaiveConfig(StrategyConfig):
    name: str = "naive"


@dataclass
class JointConfig(StrategyConfig):
    name: str = "joint"


@dataclass
class ReplayConfig(StrategyConfig):
    name: str = "replay"
    buffer_size: int = 200  # examples kept in total, over all tasks
    sampling: str = "reservoir"  # reservoir | random | importance | hardest
    per_task: bool = False  # equal share of the buffer per task seen
    replay_ratio: float = 0.25  # fraction of each training batch drawn from the buffer
    replay_batch_size: int | None = None  # buffer examples per batch; overrides replay_ratio when set

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        _positive(errs, f"{key}.buffer_size", self.buffer_size)
        _choice(errs, f"{key}.sampling", self.sampling, ("reservoir", "random", "importance", "hardest"))
        _fraction(errs, f"{key}.replay_ratio", self.replay_ratio, closed_right=False)
        _positive(errs, f"{key}.replay_batch_size", self.replay_batch_size)
        return errs


@dataclass
class EWCConfig(StrategyConfig):
    name: str = "ewc"
    ewc_lambda: float = 1.0e5  # penalty weight: ewc_lambda/2 * sum F (theta - theta*)^2
    fisher: str = "empirical"  # empirical (labels from the data) | sampled (labels sampled from the model)
    fisher_samples: int = 256  # examples of the finished task used to estimate the Fisher
    fisher_batch_size: int = 16  # examples per batched per-example-gradient chunk (bounds memory)
    online: bool = False  # one running Fisher (online EWC) instead of one per task
    gamma: float = 1.0  # online EWC decay of the old Fisher
    ewc_params: str | None = None  # regex on parameter names; null = all trainable parameters
    state_dtype: str = "float32"  # dtype of the stored Fisher and anchor: float32 | bfloat16

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        _positive(errs, f"{key}.ewc_lambda", self.ewc_lambda, allow_zero=True)
        _choice(errs, f"{key}.fisher", self.fisher, ("empirical", "sampled"))
        _positive(errs, f"{key}.fisher_samples", self.fisher_samples)
        _positive(errs, f"{key}.fisher_batch_size", self.fisher_batch_size)
        _fraction(errs, f"{key}.gamma", self.gamma)
        _choice(errs, f"{key}.state_dtype", self.state_dtype, ("float32", "bfloat16"))
        if self.ewc_params is not None:
            try:
                re.compile(self.ewc_params)
            except re.error as exc:
                errs.append(f"{key}.ewc_params: not a valid regular expression ({exc})")
        return errs


@dataclass
class L2Config(StrategyConfig):
    name: str = "l2"
    l2_lambda: float = 1.0  # penalty weight: l2_lambda/2 * sum (theta - theta*)^2
    ewc_params: str | None = None
    state_dtype: str = "float32"

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        _positive(errs, f"{key}.l2_lambda", self.l2_lambda, allow_zero=True)
        _choice(errs, f"{key}.state_dtype", self.state_dtype, ("float32", "bfloat16"))
        return errs


@dataclass
class LwFConfig(StrategyConfig):
    name: str = "lwf"
    alpha: float = 1.0  # weight of the distillation term
    temperature: float = 2.0

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        _positive(errs, f"{key}.alpha", self.alpha, allow_zero=True)
        _positive(errs, f"{key}.temperature", self.temperature)
        return errs


@dataclass
class EWCReplayConfig(EWCConfig, ReplayConfig):
    name: str = "ewc_replay"

    def errors(self, key: str) -> list[str]:
        return EWCConfig.errors(self, key) + ReplayConfig.errors(self, key)


@dataclass
class SharedLoRAConfig(StrategyConfig):
    name: str = "shared_lora"
    rank: int = 8  # LoRA rank r
    alpha: float = 16.0  # LoRA scaling: the update is B A x * alpha / rank
    dropout: float = 0.0  # dropout on the LoRA input
    target_modules: list[str] | None = None  # module names (or suffixes) to adapt; null = every linear but the head

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        _positive(errs, f"{key}.rank", self.rank)
        _positive(errs, f"{key}.alpha", self.alpha)
        _fraction(errs, f"{key}.dropout", self.dropout, closed_right=False)
        if self.target_modules is not None and not self.target_modules:
            errs.append(f"{key}.target_modules: expected null or a non-empty list of module names")
        return errs


@dataclass
class AdaptersConfig(SharedLoRAConfig):
    name: str = "adapters"
    merge: bool = False  # evaluate the merged model (every adapter at once, no task identity)
    orthogonal_lambda: float = 0.0  # O-LoRA: weight of sum |A_old A_new^T| (0 = off)

    def errors(self, key: str) -> list[str]:
        errs = SharedLoRAConfig.errors(self, key)
        _positive(errs, f"{key}.orthogonal_lambda", self.orthogonal_lambda, allow_zero=True)
        return errs


@dataclass
class ProgressiveConfig(StrategyConfig):
    name: str = "progressive"
    rank: int = 8  # rank r of a column's update of each linear layer
    alpha: float = 16.0  # scaling of the updates: B A x * alpha / rank
    backbone_first_task: bool = False  # true: the LM itself is the first task's column (fine-tuned, then frozen)
    lateral: bool = True  # a new column gets gated input from the earlier columns' updates

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        _positive(errs, f"{key}.rank", self.rank)
        _positive(errs, f"{key}.alpha", self.alpha)
        return errs


@dataclass
class MERConfig(ReplayConfig):
    name: str = "mer"
    inner_steps: int = 5  # optimizer steps (micro-batches) per meta-batch
    beta: float = 0.5  # within-batch Reptile rate: theta_0 + beta (theta - theta_0)
    gamma: float = 1.0  # across-batch Reptile rate, every meta_batches meta-batches
    meta_batches: int = 1  # meta-batches per across-batch update

    def errors(self, key: str) -> list[str]:
        errs = ReplayConfig.errors(self, key)
        _positive(errs, f"{key}.inner_steps", self.inner_steps)
        _positive(errs, f"{key}.meta_batches", self.meta_batches)
        for name in ("beta", "gamma"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                errs.append(f"{key}.{name}: expected a value in (0, 1], got {value!r}")
        return errs


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
        _positive(errs, f"{key}.gen_ratio", self.gen_ratio, allow_zero=True)
        _positive(errs, f"{key}.lm_lambda", self.lm_lambda, allow_zero=True)
        for name in ("top_k", "temperature", "gen_batch_size"):
            _positive(errs, f"{key}.{name}", getattr(self, name))
        return errs


STRATEGY_SCHEMAS: dict[str, type[StrategyConfig]] = {
    "naive": NaiveConfig,
    "joint": JointConfig,
    "replay": ReplayConfig,
    "ewc": EWCConfig,
    "l2": L2Config,
    "lwf": LwFConfig,
    "ewc_replay": EWCReplayConfig,
    "adapters": AdaptersConfig,
    "shared_lora": SharedLoRAConfig,
    "progressive": ProgressiveConfig,
    "mer": MERConfig,
    "lamol": LAMOLConfig,
}


# ----------------------------------------------------------------------------------------------- root
@dataclass
class Config:
    model: ModelConfig = MISSING
    strategy: Any = MISSING  # one of STRATEGY_SCHEMAS, chosen by the strategy group file
    tasks: TasksConfig = MISSING
    device: DeviceConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    seed: int = 0
    experiment_name: str = "cl"  # free text, recorded in metrics.json
    resume: str | None = None  # a run directory to continue (cl-run resume=PATH); its saved config is used
    debug: bool = False  # show Python tracebacks instead of one-line errors

    def errors(self) -> list[str]:
        errs = self.model.errors("model") + self.device.errors("device") + self.tasks.errors("tasks")
        errs += self.train.errors("train") + self.eval.errors("eval") + self.strategy.errors("strategy")
        errs += self.checkpoint.errors("checkpoint")
        if self.seed < 0:
            errs.append(f"seed: expected a non-negative integer, got {self.seed}")
        return errs


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for name, schema in STRATEGY_SCHEMAS.items():
        cs.store(group="schema/strategy", name=name, node=schema, package="strategy")


def _unknown_keys(node: Any, schema: type, prefix: str) -> list[str]:
    """Keys a ``+key=value`` override added that the schema does not define (Hydra lets ``+`` bypass it)."""
    if not isinstance(node, DictConfig):
        return []
    known = {f.name: f for f in fields(schema)}
    out = []
    for key in node.keys():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in known:
            out.append(path)
            continue
        sub = known[key].type
        sub = globals().get(sub, None) if isinstance(sub, str) else sub
        if isinstance(sub, type) and is_dataclass(sub) and key != "strategy":
            out += _unknown_keys(node[key], sub, path)
    return out


def validate(cfg: DictConfig) -> Config:
    """Turn a composed config into typed objects and check every range; raise one ConfigError listing all."""
    strategy_name = OmegaConf.select(cfg, "strategy.name")
    if strategy_name not in STRATEGY_SCHEMAS:
        raise ConfigError(f"strategy.name: expected one of {', '.join(STRATEGY_SCHEMAS)}, got {strategy_name!r}")
    unknown = _unknown_keys(cfg, Config, "") + _unknown_keys(cfg.strategy, STRATEGY_SCHEMAS[strategy_name], "strategy")
    if unknown:
        hint = "unknown key (see the README's configuration reference)"
        raise ConfigError("; ".join(f"{key}: {hint}" for key in unknown))
    config = OmegaConf.to_object(cfg)
    if not isinstance(config.strategy, StrategyConfig):
        schema = STRATEGY_SCHEMAS[strategy_name]
        config.strategy = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), cfg.strategy))
    errors = config.errors()
    if errors:
        raise ConfigError("; ".join(errors))
    return config


def as_dict(obj: Any) -> Any:
    """A schema object as plain JSON-able data."""
    if is_dataclass(obj):
        return {f.name: as_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, list | tuple):
        return [as_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: as_dict(v) for k, v in obj.items()}
    return obj
