"""LoRA adapters added to a model in place with peft: create, switch, freeze, count, and the O-LoRA overlap.

The model object stays the same (peft's ``inject_adapter_in_model`` replaces the target layers inside it), so
everything holding a reference to it (the scorer, the context) sees the adapters. Each adapter is named; a
forward pass uses the *active* ones (their outputs add up: ``W x + sum_a B_a A_a x * alpha / rank``), and
which parameters train is set separately, so switching adapters for an evaluation never unfreezes one.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch

from cl_runner.core.checks import close_match
from cl_runner.core.errors import ConfigError
from cl_runner.strategies.seeding import seeded_rng

LORA_PARAM = re.compile(r"\.lora_(?:A|B)\.([^.]+)\.")  # ``...c_attn.lora_A.<adapter>.weight``
# target_modules ``q`` and ``v`` (O-LoRA's, T5's own layer names) on a model whose attention names them otherwise:
# the first of these that the model has. GPT-2's c_attn (Phi's Wqkv, qkv_proj) is one fused q,k,v projection:
# adapting it is the closest to q,v there is, and adapts k too (one LoRA over the fused output, not two).
QV_NAMES = {"q": ("q_proj", "query", "c_attn", "qkv_proj", "Wqkv"),
            "v": ("v_proj", "value", "c_attn", "qkv_proj", "Wqkv")}


def add_lora(model: torch.nn.Module, name: str, cfg: Any, seed: int, device: torch.device) -> None:
    """Inject a new LoRA adapter ``name`` (``cfg``: rank, alpha, dropout, target_modules), seeded init."""
    from peft import LoraConfig
    from peft.functional import inject_adapter_in_model

    targets = resolve_targets(model, cfg.target_modules) or "all-linear"
    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                        bias="none")
    with warnings.catch_warnings(), seeded_rng(seed, device):
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")  # GPT-2's Conv1D: peft flips it itself
        warnings.filterwarnings("ignore", message=".*peft_config.*")  # "multiple adapters": intended here
        try:
            inject_adapter_in_model(config, model, adapter_name=name)
        except ValueError as exc:  # e.g. no module of the model matches target_modules
            raise ConfigError(f"strategy.target_modules: {exc}") from None


def resolve_targets(model: torch.nn.Module, targets: list[str] | None) -> list[str] | None:
    """``target_modules`` as this model names its layers: ``q``/``v`` that match no layer become the model's query
    and value projections (``QV_NAMES``); the rest as given, each once. None stays None (every linear layer)."""
    if not targets:
        return None
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}  # also layers peft already wrapped
    resolved: list[str] = []
    for target in targets:
        if target not in names and target in QV_NAMES:
            target = next((alias for alias in QV_NAMES[target] if alias in names), target)
        if target not in resolved:
            resolved.append(target)
    return resolved


def check_targets(model: torch.nn.Module, targets: list[str] | None) -> None:
    """Raise ``ConfigError`` unless every entry of ``target_modules`` (``q``/``v`` as ``resolve_targets`` reads
    them) names, or ends the name of, a layer LoRA can adapt (peft's rule for a list: the full name or its last
    components)."""
    targets = resolve_targets(model, targets)
    if not targets:
        return
    from transformers.pytorch_utils import Conv1D

    adaptable = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, Conv1D)
    modules = dict(model.named_modules())
    choices = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, adaptable)})
    for target in targets:
        # a layer peft already wrapped (FSDP injects adapters before sharding, so before this check): its base
        matched = [getattr(m, "base_layer", m) for n, m in modules.items() if n == target or n.endswith(f".{target}")]
        if not any(isinstance(m, adaptable) for m in matched):
            what = f"is a {type(matched[0]).__name__}, which LoRA cannot adapt" if matched else "matches no module"
            raise ConfigError(f"strategy.target_modules: {target!r} {what}{close_match(target, choices)} "
                              f"(adaptable layers: {', '.join(choices)})")


def lora_size(model: torch.nn.Module, cfg: Any) -> int:
    """Elements of one adapter (``cfg``: rank, target_modules) on ``model`` (also on the meta device): rank x
    (in + out) per adapted layer, peft's ``all-linear`` (every linear layer but the output head) by default."""
    from transformers.pytorch_utils import Conv1D

    head, targets, n = model.get_output_embeddings(), resolve_targets(model, cfg.target_modules), 0  # q, v too
    for name, module in model.named_modules():
        if module is head or (targets and not any(name == t or name.endswith(f".{t}") for t in targets)):
            continue
        if isinstance(module, torch.nn.Linear):
            n += cfg.rank * (module.in_features + module.out_features)
        elif isinstance(module, Conv1D):  # GPT-2's: weight is (in, out)
            n += cfg.rank * sum(module.weight.shape)
    return n


def lora_parameters(model: torch.nn.Module, name: str | None = None) -> list[tuple[str, torch.nn.Parameter]]:
    """The LoRA parameters of adapter ``name`` (every adapter's when None)."""
    out = []
    for n, p in model.named_parameters():
        match = LORA_PARAM.search(n)
        if match and (name is None or match.group(1) == name):
            out.append((n, p))
    return out


def train_only(model: torch.nn.Module, name: str | None) -> None:
    """``requires_grad`` on adapter ``name``'s parameters only (nothing trains when None)."""
    for n, p in model.named_parameters():
        match = LORA_PARAM.search(n)
        p.requires_grad_(match is not None and match.group(1) == name)


def activate(model: torch.nn.Module, names: list[str]) -> None:
    """Make ``names`` the adapters of the forward pass ([] = the base model), leaving requires_grad as it was."""
    from peft.functional import set_adapter

    flags = [(p, p.requires_grad) for p in model.parameters()]
    set_adapter(model, names)  # also flips requires_grad of the adapters it touches: undone below
    for p, flag in flags:
        p.requires_grad_(flag)


def lora_a_pairs(model: torch.nn.Module, old: list[str], new: str) -> list[tuple[torch.Tensor, torch.nn.Parameter]]:
    """Per adapted layer: the old adapters' ``A`` matrices stacked (detached) and the new adapter's ``A``."""
    from peft.tuners.lora import LoraLayer

    pairs = []
    for module in model.modules():
        if isinstance(module, LoraLayer) and new in module.lora_A and old:
            stacked = torch.cat([module.lora_A[a].weight.detach() for a in old], dim=0)  # (r * len(old), in)
            pairs.append((stacked, module.lora_A[new].weight))
    return pairs


def subspace_overlap(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """O-LoRA's orthogonality loss: ``sum_layers sum_jk |A_old A_new^T|_jk`` (0 when the row spaces are
    orthogonal), in float32."""
    total = torch.zeros((), device=pairs[0][1].device)
    for old, new in pairs:
        total = total + (old.float() @ new.float().T).abs().sum()
    return total


def count(params: list[tuple[str, torch.nn.Parameter]]) -> int:
    return sum(p.numel() for _, p in params)
