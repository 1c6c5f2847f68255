"""LoRA adapters through the `peft` library, inside thaw's adapter contract.

PEFT injects low-rank layers in place (`inject_adapter_in_model`), so the
model keeps its own forward and names; thaw then moves every parameter into
the layer group of the module it belongs to, so plans, reports and the
optimizer audit treat adapter weights like any other group's. The new head
is never a target: it trains in full.

Default targets: for Hugging Face encoders, PEFT's own per-architecture list
(BERT: query, value); for vision, every Linear and ungrouped Conv2d outside
the head. Depthwise convolutions are left out: PEFT's Conv2d LoRA is for
ordinary convolutions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from thaw.errors import ThawError
from thaw.models.adapter import LayerGroup, ModelAdapter, check_groups_cover_model

ADAPTERS_SELECTOR = "adapters"


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ()  # selectors; empty: the family's default

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ThawError(f"LoRA needs rank >= 1, alpha > 0 and 0 <= dropout < 1; got rank {self.rank}, alpha {self.alpha}, dropout {self.dropout}")


def _peft():
    try:
        import peft
    except ImportError:
        raise ThawError("the lora strategy needs PEFT: pip install 'thaw[peft]'") from None
    return peft


def _adaptable(module: nn.Module) -> bool:
    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    return isinstance(module, nn.Linear)


def _in_head(adapter: ModelAdapter, name: str) -> bool:
    return any(name == h or name.startswith(h + ".") for h in adapter.group("head").modules)


def default_targets(adapter: ModelAdapter) -> list[str]:
    """Module names LoRA adapts when the user names none."""
    config = getattr(getattr(adapter.model, "encoder", None), "config", None)
    if config is not None and adapter.family.startswith("hf-text"):
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as by_type

        suffixes = by_type.get(config.model_type)
        if suffixes:
            return [n for n, m in adapter.model.named_modules() if n.rsplit(".", 1)[-1] in suffixes and isinstance(m, nn.Linear)]
    return [n for n, m in adapter.model.named_modules() if n and _adaptable(m) and not _in_head(adapter, n)]


def targets_from_selectors(adapter: ModelAdapter, selectors: tuple[str, ...]) -> list[str]:
    """Linear/Conv2d modules all of whose parameters the selectors choose (the head excluded)."""
    from thaw.plan.selectors import resolve

    chosen = set(resolve(adapter, list(selectors)))
    targets = [
        name for name, module in adapter.model.named_modules()
        if name and _adaptable(module) and not _in_head(adapter, name)
        and all(f"{name}.{p}" in chosen for p, _ in module.named_parameters(recurse=False))
    ]
    if not targets:
        raise ThawError(f"LoRA targets {', '.join(selectors)} select no Linear or Conv2d layer outside the head; name layers like 'layer4' or 'encoder*'")
    return targets


def add_lora(adapter: ModelAdapter, spec: LoraSpec) -> ModelAdapter:
    """Inject LoRA layers into `adapter.model` (in place) and regroup its parameters."""
    peft = _peft()
    targets = targets_from_selectors(adapter, spec.targets) if spec.targets else default_targets(adapter)
    if not targets:
        raise ThawError(f"found no Linear or Conv2d layer to adapt in {type(adapter.model).__name__}; name targets with --lora-targets")
    before = {id(p): n for n, p in adapter.model.named_parameters()}
    owner = {n: g.name for g in adapter.groups for n in g.params}
    config = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets)
    peft.inject_adapter_in_model(config, adapter.model)
    adapter.groups = _regroup(adapter.model, adapter.groups, before, owner)
    check_groups_cover_model(adapter.model, adapter.groups)
    adapter.lora_targets = targets
    return adapter


def _regroup(model: nn.Module, groups: list[LayerGroup], before: dict[int, str], owner: dict[str, str]) -> list[LayerGroup]:
    """Old parameters keep their group under their new names; adapter weights join their base layer's group."""
    members: dict[str, list[str]] = {g.name: [] for g in groups}
    tuner = _tuner_layers(model)
    for name, param in model.named_parameters():
        if id(param) in before:
            members[owner[before[id(param)]]].append(name)
            continue
        layer = next(module for layer_name, module in tuner.items() if name.startswith(layer_name + "."))
        base_weight = id(next(layer.get_base_layer().parameters()))
        members[owner[before[base_weight]]].append(name)
    return [LayerGroup(g.name, g.modules, tuple(members[g.name])) for g in groups]


def _tuner_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}


def adapter_param_names(model: nn.Module) -> list[str]:
    """Every LoRA weight: the parameters of tuner layers outside their base layer."""
    names = []
    for layer_name, layer in _tuner_layers(model).items():
        base = {id(p) for p in layer.get_base_layer().parameters()}
        names += [f"{layer_name}.{n}" for n, p in layer.named_parameters() if id(p) not in base]
    return names


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA layer into its base weights and put the plain layer back; returns how many."""
    layers = _tuner_layers(model)
    for name, layer in layers.items():
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    return len(layers)
