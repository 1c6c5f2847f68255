"""LoRA adapters through the `peft` library, inside thaw's adapter contract.

PEFT injects low-rank layers in place (`inject_adapter_in_model`), so the
model keeps its own forward and names; thaw then moves every parameter into
the layer group of the module it belongs to, so plans, reports and the
optimizer audit treat adapter weights like any other group's. The new head
is never a target: it trains in full. Which modules to adapt arrives here as
module names: resolving the user's selectors is the plan layer's job
(plan/lora_targets.py), as models never import the plan layer.

Default targets: for Hugging Face encoders, PEFT's own per-architecture list
(BERT: query, value); for vision, every Linear and ungrouped Conv2d outside
the head. Depthwise convolutions are left out: PEFT's Conv2d LoRA is for
ordinary convolutions.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from thaw.errors import ThawError
from thaw.models.adapter import LayerGroup, ModelAdapter, check_groups_cover_model

ADAPTERS_SELECTOR = "adapters"
MAX_LORA_RANK = 4096  # wider than the layers of the encoders and vision models thaw adapts: no more capacity, only memory


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ()  # selectors; empty: the family's default

    def __post_init__(self) -> None:
        rank_ok = isinstance(self.rank, int) and not isinstance(self.rank, bool) and 1 <= self.rank <= MAX_LORA_RANK
        numbers_ok = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (self.alpha, self.dropout))
        if not (rank_ok and numbers_ok and self.alpha > 0 and 0 <= self.dropout < 1):
            raise ThawError(
                f"LoRA needs a whole rank from 1 to {MAX_LORA_RANK}, a finite alpha > 0 and 0 <= dropout < 1; "
                f"got rank {self.rank!r}, alpha {self.alpha!r}, dropout {self.dropout!r}"
            )


def _peft():
    try:
        import peft
    except ImportError:
        raise ThawError("the lora strategy needs PEFT: pip install 'thaw[peft]'") from None
    return peft


def adaptable(module: nn.Module) -> bool:
    """Whether PEFT's LoRA can adapt this module: a Linear, or an ordinary (not grouped) Conv2d."""
    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    return isinstance(module, nn.Linear)


def default_targets(adapter: ModelAdapter) -> list[str]:
    """Module names LoRA adapts when the user names none."""
    config = getattr(getattr(adapter.model, "encoder", None), "config", None)
    if config is not None and adapter.family.startswith("hf-text"):
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as by_type

        suffixes = by_type.get(config.model_type)
        if suffixes:
            return [n for n, m in adapter.model.named_modules() if n.rsplit(".", 1)[-1] in suffixes and isinstance(m, nn.Linear)]
    return [n for n, m in adapter.model.named_modules() if n and adaptable(m) and not adapter.in_head(n)]


def add_lora(adapter: ModelAdapter, spec: LoraSpec, targets: list[str] | None = None) -> ModelAdapter:
    """Inject LoRA layers into the modules named by `targets` (None: the family's default) and regroup.

    Selectors in `spec.targets` are the plan layer's to resolve (`lora_targets`); pass its result here.
    The model holds exactly the base weights now, so their digests are kept (`adapter.lora_base`): the adapter
    file then saves every tensor training changed, whatever the plan trained.
    """
    peft = _peft()
    if targets is None:
        if spec.targets:
            raise ThawError(
                f"add_lora got LoRA targets as selectors ({', '.join(spec.targets)}); "
                "resolve them first: add_lora(adapter, spec, lora_targets(adapter, spec)), lora_targets from the plan layer"
            )
        targets = default_targets(adapter)
    if not targets:
        raise ThawError(f"found no Linear or Conv2d layer to adapt in {type(adapter.model).__name__}; name targets (LoraSpec.targets, lora.targets in a plan, --lora-targets)")
    in_head = [target for target in targets if adapter.in_head(target)]
    if in_head:  # the new head trains in full; wrapped, its weight would move under another name and escape head checks
        raise ThawError(f"LoRA targets inside the head ({', '.join(in_head)}): the new head trains in full; leave it out of the targets")
    before = {id(p): n for n, p in adapter.model.named_parameters()}
    owner = {n: g.name for g in adapter.groups for n in g.params}
    config = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=list(targets))
    peft.inject_adapter_in_model(config, adapter.model)
    adapter.groups = _regroup(adapter.model, adapter.groups, before, owner)
    check_groups_cover_model(adapter.model, adapter.groups)
    adapter.lora_targets = list(targets)
    adapter.lora_base = base_digests(adapter.model)
    return adapter


def tensor_digest(tensor: torch.Tensor) -> str | None:
    """A fingerprint of a tensor's dtype, shape and bytes (None on the meta device, which holds no values)."""
    if tensor.is_meta:
        return None
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    digest = hashlib.sha1(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(memoryview(data))
    return digest.hexdigest()


def base_digests(model: nn.Module) -> dict[str, str | None]:
    """Every base tensor of the state dict (under its post-injection name), digested instead of copied:
    a copy would double the memory of a large model."""
    added = set(adapter_param_names(model))
    return {name: tensor_digest(tensor) for name, tensor in model.state_dict().items() if name not in added}


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
