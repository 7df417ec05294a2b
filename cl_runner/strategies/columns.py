"""Progressive columns for a causal LM: per-task stacks of low-rank updates on a frozen backbone, each new stack
laterally linked to the earlier ones.

Column ``k`` adds to every linear layer ``m`` of the transformer blocks (attention and MLP projections)
``delta_k^m(x) = (alpha / r) B_k^m A_k^m x + sum_{j<k} g_kj^m * delta_j^m(x)``: its own rank-``r`` update,
plus the earlier columns' updates of the same layer on the same input, each scaled per output unit by a
lateral gate ``g`` (progressive networks' lateral connections, Rusu et al. 2016, at the level of layers).
``B`` and ``g`` start at zero, so a new column starts as the backbone. Only the active column's update is
added; the earlier ones are computed for its laterals (frozen, differentiable with respect to ``x``). A
column never reads later ones, so training column k leaves every earlier task's function exactly as it was.
Cost per forward: the backbone plus, per linear layer, a rank-r product for every column up to the active one.
"""

from __future__ import annotations

import math

import torch

from cl_runner.core.errors import ConfigError


def adapted_layers(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """``{key: (in_features, out_features)}`` of every linear layer (``nn.Linear`` or GPT-2's ``Conv1D``) inside
    the transformer blocks; the key is the module's path with ``-`` for ``.`` (ParameterDict keys)."""
    blocks = transformer_blocks(model)
    prefix = next(name for name, module in model.named_modules() if module is blocks)
    out = {}
    for name, module in blocks.named_modules():
        if isinstance(module, torch.nn.Linear):
            out[f"{prefix}.{name}".replace(".", "-")] = (module.in_features, module.out_features)
        elif type(module).__name__ == "Conv1D":  # transformers' GPT-2 layer: weight is (in, out)
            out[f"{prefix}.{name}".replace(".", "-")] = tuple(module.weight.shape)
    return out


def lora_column(layers: dict[str, tuple[int, int]], rank: int, n_earlier: int) -> torch.nn.ModuleDict:
    """A new column: ``A`` (rank x in) and ``B`` (out x rank) of every adapted layer, and its lateral ``gates``
    (one row of ``out`` per earlier column). A plain ModuleDict: no ``nn.Module`` subclass here, so that importing
    this module (the strategy registry imports them all) does not import torch."""
    nn = torch.nn
    column = nn.ModuleDict({
        "A": nn.ParameterDict({k: nn.Parameter(torch.empty(rank, i)) for k, (i, o) in layers.items()}),
        "B": nn.ParameterDict({k: nn.Parameter(torch.zeros(o, rank)) for k, (i, o) in layers.items()}),
        "gates": nn.ParameterDict({k: nn.Parameter(torch.zeros(n_earlier, o)) for k, (i, o) in layers.items()}
                                  if n_earlier else {}),
    })
    for a in column.A.values():
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear (and LoRA's A)
    return column


def column_delta(column: torch.nn.ModuleDict, key: str, x: torch.Tensor, earlier: list[torch.Tensor],
                 scale: float) -> torch.Tensor:
    """``column``'s update of layer ``key`` for input ``x``, given the earlier columns' updates."""
    out = (x @ column.A[key].T) @ column.B[key].T * scale
    for j, other in enumerate(earlier if column.gates else []):
        out = out + column.gates[key][j] * other
    return out


def transformer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of transformer blocks: the first ModuleList as long as ``config.num_hidden_layers``."""
    n_layers = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return module
    raise ConfigError(f"strategy=progressive: found no list of {n_layers} transformer blocks in "
                      f"{type(model).__name__}")


class ColumnHooks:
    """Forward hooks on the adapted layers that add the active column's update (``active`` None: the bare
    backbone). ``columns`` is a ModuleDict ``str(task) -> column`` (``lora_column``) registered on the model, so
    it is saved, restored and moved with it; ``scale`` is alpha / rank."""

    def __init__(self, model: torch.nn.Module, columns: torch.nn.ModuleDict, scale: float) -> None:
        self.columns, self.active, self.scale = columns, None, scale
        for key in adapted_layers(model):  # the hooks live as long as the model: never removed
            model.get_submodule(key.replace("-", ".")).register_forward_hook(self._hook(key))

    def _hook(self, key: str):
        def run(module: torch.nn.Module, args: tuple, output: torch.Tensor):
            if self.active is None:
                return None
            deltas: list[torch.Tensor] = []
            for task in sorted(int(k) for k in self.columns if int(k) <= self.active):
                deltas.append(column_delta(self.columns[str(task)], key, args[0], deltas, self.scale))
            return output + deltas[-1].to(output.dtype)

        return run
