"""Load any Hugging Face causal LM or encoder-decoder and its tokenizer (hub id or local directory), or build one
from a config.

Built models get a byte-level BPE tokenizer trained on the tasks' own text, so the default run needs no
download. Loading never executes repository code unless ``model.trust_remote_code`` is true.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from cl_runner.config.schema import MIN_TOKENIZER_VOCAB, ModelConfig
from cl_runner.core.checks import WEIGHT_DTYPES
from cl_runner.core.errors import ModelError
from cl_runner.models.kinds import kind_class

log = logging.getLogger(__name__)
EOS = "<|endoftext|>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")
DTYPES = {name: getattr(torch, name) for name in WEIGHT_DTYPES}  # model.dtype -> torch dtype


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists()


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_json_files(directory: Path, key: str) -> None:
    """Name a damaged ``*.json`` file of a model directory (config, tokenizer files): transformers reports it
    as some other problem, or as missing tokenizer files."""
    for file in sorted(directory.glob("*.json")):
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            where = (f"line {exc.lineno}, column {exc.colno}: {exc.msg}" if isinstance(exc, json.JSONDecodeError)
                     else "not UTF-8")
            raise ModelError(f"{key}: {file} is not valid JSON ({where}); the file is damaged") from None


def check_weight_files(directory: Path, key: str) -> None:
    """Open the header of every ``*.safetensors`` file: a truncated or garbage file fails here, with its name
    (a flipped byte inside the tensor data cannot be seen without a checksum)."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"{key}: {file} is damaged or truncated ({_first_line(exc)}); save or download the "
                             "model again") from None


def shape_mismatch(directory: Path, config) -> str:
    """The first tensor of the ``*.safetensors`` files whose shape differs from the one ``config`` gives it."""
    from safetensors import safe_open

    with torch.device("meta"):
        expected = {n: list(t.shape) for n, t in auto_class(config).from_config(config).state_dict().items()}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as weights:
            for name in weights.keys():
                shape = list(weights.get_slice(name).get_shape())
                if name in expected and expected[name] != shape:
                    return f"{name} is {shape} in {file.name} but {expected[name]} by config.json"
    return "see the tensor shapes in config.json"


@contextmanager
def _quiet_load() -> Iterator[None]:
    """Hold what transformers' loader logs (its load report) and pass it on only if the load succeeds, and
    hide its weight-loading bar: a load that fails gets one line of its own instead of 20+."""
    from transformers.utils import logging as hf_logging

    held: list[logging.LogRecord] = []
    logger, bar = logging.getLogger("transformers.modeling_utils"), hf_logging.is_progress_bar_enabled()

    def hold(record: logging.LogRecord) -> bool:
        held.append(record)
        return False

    logger.addFilter(hold)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.removeFilter(hold)
        if bar:
            hf_logging.enable_progress_bar()
    for record in held:
        logger.handle(record)


def train_tokenizer(texts: list[str], vocab_size: int):
    """A GPT-2-style byte-level BPE trained on ``texts``; deterministic for the same texts. It holds at most
    ``vocab_size`` tokens (fewer when the texts offer fewer merges), and never fewer than its 256 byte symbols and
    EOS: a smaller ``vocab_size`` is refused rather than silently raised."""
    if vocab_size < MIN_TOKENIZER_VOCAB:
        raise ModelError(f"model.tokenizer_vocab_size: expected at least {MIN_TOKENIZER_VOCAB} (the trained BPE's 256 "
                         f"byte symbols and EOS), got {vocab_size}")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   unk_token=EOS)


def load_tokenizer(cfg: ModelConfig, texts: list[str]):
    """The configured tokenizer, or one trained on ``texts`` for a model built from ``arch``."""
    source = cfg.tokenizer or cfg.name_or_path
    if source is None:
        return train_tokenizer(texts, cfg.tokenizer_vocab_size)
    from transformers import AutoTokenizer

    key = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
    if _looks_local(source) and not Path(source).expanduser().is_dir():
        raise ModelError(f"{key}: directory not found: {source}")
    if _looks_local(source) and not any((Path(source).expanduser() / f).exists() for f in TOKENIZER_FILES):
        raise ModelError(f"{key}: no tokenizer files in {source} (expected one of {', '.join(TOKENIZER_FILES)}); "
                         "set model.tokenizer")
    if _looks_local(source):
        check_json_files(Path(source).expanduser(), key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(Path(source).expanduser()) if _looks_local(source) else source,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
        )
    except Exception as exc:
        raise ModelError(f"{key}: cannot load a tokenizer from {source!r} ({_first_line(exc)}); set model.tokenizer"
                         ) from None
    if not tokenizer("hello world", add_special_tokens=False)["input_ids"]:
        raise ModelError(f"{key}: the tokenizer of {source!r} encodes text to nothing")
    if tokenizer.eos_token_id is None:
        raise ModelError(f"{key}: the tokenizer of {source!r} has no EOS token; targets need one to end")
    if tokenizer.pad_token_id is None:
        log.info("tokenizer has no pad token: using EOS (%s) for padding (padding is masked)", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def auto_class(config):
    """The transformers Auto class of the model kind ``config`` describes (``kinds.kind_class``):
    ``AutoModelForSeq2SeqLM`` for an encoder-decoder (T5, BART), else ``AutoModelForCausalLM``."""
    import transformers

    return getattr(transformers, kind_class(config).auto_class)


def load_model(cfg: ModelConfig, tokenizer, seed: int) -> torch.nn.Module:
    """The causal LM or encoder-decoder (``auto_class``): ``from_pretrained`` for a hub id or directory,
    ``from_config`` (seeded) for ``arch``."""
    model = _build(cfg, tokenizer, seed) if cfg.name_or_path is None else _load_pretrained(cfg)
    if cfg.name_or_path is not None and model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    return model


def _build(cfg: ModelConfig, tokenizer, seed: int) -> torch.nn.Module:
    from transformers import AutoConfig

    arch = dict(cfg.arch)
    model_type = arch.pop("model_type")
    try:
        config = AutoConfig.for_model(
            model_type,
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **arch,
        )
    except (ValueError, TypeError) as exc:
        raise ModelError(f"model.arch: cannot build a {model_type!r} config: {_first_line(exc)}") from None
    kind_class(config).complete_config(config, tokenizer)  # an encoder-decoder's decoder start token
    torch.manual_seed(seed)
    try:
        return auto_class(config).from_config(config, dtype=DTYPES[cfg.dtype])
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise ModelError(f"model.arch.model_type: {model_type!r} is not a causal LM or encoder-decoder") from None
        raise ModelError(f"model.arch: cannot build the model: {_first_line(exc)}") from None
    except (RuntimeError, TypeError, ZeroDivisionError) as exc:
        raise ModelError(f"model.arch: cannot build the model: {_first_line(exc)}") from None


def _load_pretrained(cfg: ModelConfig) -> torch.nn.Module:
    from safetensors import SafetensorError
    from transformers import AutoConfig

    source = cfg.name_or_path
    local = _looks_local(source)
    path = str(Path(source).expanduser()) if local else source
    if local and not Path(path).is_dir():
        raise ModelError(f"model.name_or_path: directory not found: {source}")
    if local:
        check_json_files(Path(path), "model.name_or_path")
        check_weight_files(Path(path), "model.name_or_path")
    try:
        model_config = AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:
        raise ModelError(
            f"model.name_or_path: cannot read a model config from {source!r} ({_first_line(exc)})"
        ) from None
    try:
        with _quiet_load():
            return auto_class(model_config).from_pretrained(path, config=model_config, dtype=DTYPES[cfg.dtype],
                                                            revision=cfg.revision,
                                                            trust_remote_code=cfg.trust_remote_code)
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise ModelError(
                f"model.name_or_path: {source!r} is a {model_config.model_type!r} model, not a causal LM or "
                "encoder-decoder"
            ) from None
        raise ModelError(f"model.name_or_path: cannot load {source!r} ({_first_line(exc)})") from None
    except (OSError, SafetensorError) as exc:  # a hub model's damaged cache files end here
        raise ModelError(f"model.name_or_path: cannot load weights from {source!r} ({_first_line(exc)})") from None
    except RuntimeError as exc:
        if not local or "mismatch" not in str(exc):
            raise
        raise ModelError(f"model.name_or_path: the weights in {source} do not fit its config.json "
                         f"({shape_mismatch(Path(path), model_config)})") from None


def _storage_key(p: torch.Tensor) -> tuple:
    """Equal for two parameters over the same memory (tied weights held as two ``Parameter`` objects)."""
    if p.device.type == "meta" or type(p.data) is not torch.Tensor:  # no memory; a DTensor (FSDP) shard
        return (id(p),)
    return (p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape))


def _distinct(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """``params`` with each tensor once, also when two parameters share one storage."""
    seen: set[tuple] = set()
    out = []
    for p in params:
        if (key := _storage_key(p)) not in seen:
            seen.add(key)
            out.append(p)
    return out


def parameter_count(model: torch.nn.Module) -> int:
    """Elements of the model's parameters, shared ones counted once."""
    return sum(p.numel() for p in _distinct(model.parameters()))


def trainable_count(model: torch.nn.Module) -> int:
    """Elements of the parameters that require a gradient, shared ones counted once: what an optimizer built
    now (``loop.make_optimizer`` takes exactly these) updates. Count it when the task's optimizer is built: a
    strategy freezes and adds parameters in ``before_task`` (adapters train 2% of the model)."""
    return sum(p.numel() for p in _distinct(p for p in model.parameters() if p.requires_grad))


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """``{"total": n}``; what is trained is counted per task, when its optimizer is built (``trainable_count``)."""
    return {"total": parameter_count(model)}
