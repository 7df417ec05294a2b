"""The model a run leaves for users (``save``): a ``save_pretrained`` directory that transformers'
``from_pretrained``, lm-evaluation-harness, vLLM or the Hub load, with its tokenizer (and chat template).

What it holds is the strategy's word (``Strategy.takeaway``): the model itself; or, for LoRA strategies, the frozen
base there and one peft adapter directory per adapter under ``adapters/<name>/`` (``PeftModel.from_pretrained``),
``cl_runner.json`` saying which adapters score which task; or nothing, with the reason, for strategies whose added
modules only cl-runner runs (soft prompts, progressive columns). Under FSDP the whole state dict is gathered from
the shards onto rank 0's CPU (a collective: every rank calls ``save_model``); under DDP the bare module is what
the run scores. Only rank 0 writes, and the directory appears whole or not at all (``write_dir_atomic``)."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch

from cl_runner.core.dist import World, world
from cl_runner.core.files import human_bytes, write_dir_atomic
from cl_runner.strategies.base import Takeaway

log = logging.getLogger(__name__)

MANIFEST = "cl_runner.json"  # beside config.json: the stage, the strategy and each task's adapters
ADAPTERS = "adapters"  # model/adapters/<adapter>/: peft adapter directories


def hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside ``model`` (torch.compile's wrapper; peft's injected layers kept)."""
    from transformers import PreTrainedModel

    model = getattr(model, "_orig_mod", model)
    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), model)


def full_state_dict(model: torch.nn.Module, where: World) -> dict[str, torch.Tensor] | None:
    """The whole state dict of ``model`` on rank 0 (None on the other ranks). Under FSDP the shards are gathered
    onto rank 0's CPU (``get_model_state_dict`` with ``full_state_dict`` and ``cpu_offload``): every rank must
    call it; otherwise the module's own tensors (no copy)."""
    if where.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if where.main else None
    return model.state_dict() if where.main else None


def without_tied(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the second names of tied parameters (GPT-2's ``lm_head.weight`` is ``wte``'s): a gathered
    state dict holds them as separate copies, which ``save_pretrained`` would write twice."""
    first = {name for name, _ in model.named_parameters()}
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - first
    return {key: value for key, value in state.items() if key not in tied}


def is_lora_key(key: str) -> bool:
    return ".lora_" in key


def base_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's tensors of a model with LoRA layers injected: the adapters' dropped, the wrapped layers'
    ``base_layer`` under the layer's own name again."""
    return {key.replace(".base_layer.", "."): value for key, value in state.items() if not is_lora_key(key)}


def adapter_scale(model: torch.nn.Module, name: str) -> float | None:
    """The scale adapter ``name`` is applied with now (alpha / rank, times a merge's weight: peft's
    ``set_scale``), read from its first LoRA layer."""
    from peft.tuners.lora import LoraLayer

    return next((m.scaling[name] for m in model.modules() if isinstance(m, LoraLayer) and name in m.scaling), None)


def write_adapter(model: torch.nn.Module, state: dict[str, torch.Tensor], name: str, directory: Path,
                  base: str | None) -> None:
    """Adapter ``name`` as ``PeftModel.save_pretrained`` writes one: ``adapter_config.json`` (its alpha the scale
    it is applied with now) and ``adapter_model.safetensors`` (keys under ``base_model.model.``)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = copy.deepcopy(model.peft_config[name])
    scale = adapter_scale(model, name)
    if scale is not None and not config.use_rslora:
        config.lora_alpha = scale * config.r  # a merge's weight folded in: the adapter scores as in the run
    config.inference_mode, config.base_model_name_or_path = True, base
    tensors = get_peft_model_state_dict(model, state_dict=state, adapter_name=name)
    directory.mkdir(parents=True)
    config.save_pretrained(str(directory))
    save_file({f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in tensors.items()},
              str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})


def save_stage(parts: Any, stage: str, final: bool) -> dict[str, Any]:
    """The model after ``stage``: ``model/`` when ``final``, else ``models/<stage>/``."""
    stop_ids = sorted({i for task in parts.encoded for i in task.stop_ids})
    directory = parts.run_dir / ("model" if final else f"models/{stage}")
    return save_model(parts, directory, stage, stop_ids)


def save_model(parts: Any, directory: Path, stage: str, stop_ids: list[int]) -> dict[str, Any]:
    """Save ``parts.model`` (a ``RunParts``'s) as it is now to ``directory``; returns what the summary records
    (path, bytes, adapters; or ``refused`` with the reason). Every rank calls it (FSDP gathers); rank 0 writes.
    ``stop_ids``: end-of-turn tokens (chat templates), saved as EOS in ``generation_config.json``."""
    takeaway: Takeaway = parts.strategy.takeaway(parts.ctx)
    where, run_dir = world(), Path(parts.run_dir)
    path = str(directory.relative_to(run_dir)) if directory.is_relative_to(run_dir) else str(directory)
    if takeaway.refused is not None:
        reason = f"strategy {parts.cfg.strategy.name}: {takeaway.refused}"
        if where.main:
            log.warning("save: no model directory after %s (%s)", stage, reason)
        return {"path": None, "refused": reason}
    model = hf_model(parts.model)
    state = full_state_dict(getattr(parts.model, "_orig_mod", parts.model), where)
    if not where.main:
        return {}
    state = without_tied(getattr(parts.model, "_orig_mod", parts.model), state)
    adapters = sorted({a for names in (takeaway.adapters or {}).values() for a in names})

    def fill(tmp: Path) -> None:
        weights = state if takeaway.adapters is None else base_state(state)
        _save_pretrained(model, tmp, weights, stop_ids)
        parts.tokenizer.save_pretrained(str(tmp))
        for name in adapters:
            write_adapter(model, state, name, tmp / ADAPTERS / name, parts.cfg.model.name_or_path)
        manifest = {"stage": stage, "strategy": parts.cfg.strategy.name, "model_class": type(model).__name__,
                    "adapters": takeaway.adapters}  # per task: the adapters to activate (null: the model itself)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    size = write_dir_atomic(directory, fill)
    log.info("saved the model of stage %s to %s (%s)", stage, directory, human_bytes(size))
    return {"path": path, "bytes": size, **({"adapters": takeaway.adapters} if adapters else {})}


def _save_pretrained(model: torch.nn.Module, directory: Path, state: dict[str, torch.Tensor],
                     stop_ids: list[int]) -> None:
    """``model.save_pretrained`` with ``state`` as its weights; the end-of-turn tokens join EOS in its generation
    config (so ``generate`` stops where the run's generation stopped), the model's own config left as it is."""
    from transformers.utils import logging as hf_logging

    own = getattr(model, "generation_config", None)
    if own is not None and stop_ids:
        saved = copy.deepcopy(own)
        eos = saved.eos_token_id
        saved.eos_token_id = list(dict.fromkeys([*(eos if isinstance(eos, list) else [eos] if eos is not None
                                                   else []), *stop_ids]))
        model.generation_config = saved
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Writing model shards" bar would cut into the run's console
    try:
        model.save_pretrained(str(directory), state_dict={k: v.detach().cpu() for k, v in state.items()})
    finally:
        if bar:
            hf_logging.enable_progress_bar()
        if own is not None:
            model.generation_config = own
