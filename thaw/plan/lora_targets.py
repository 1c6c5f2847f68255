"""Where LoRA goes: the user's target selectors resolved to the module names `add_lora` adapts."""

from __future__ import annotations

from thaw.errors import ThawError
from thaw.models.adapter import ModelAdapter
from thaw.models.lora import LoraSpec, adaptable, default_targets
from thaw.plan.selectors import resolve


def lora_targets(adapter: ModelAdapter, spec: LoraSpec) -> list[str]:
    """The modules to adapt: those `spec.targets` select, or the family's default when it names none."""
    return targets_from_selectors(adapter, spec.targets) if spec.targets else default_targets(adapter)


def targets_from_selectors(adapter: ModelAdapter, selectors: tuple[str, ...]) -> list[str]:
    """Linear/Conv2d modules all of whose parameters the selectors choose (the head excluded)."""
    chosen = set(resolve(adapter, list(selectors)))
    targets = [
        name for name, module in adapter.model.named_modules()
        if name and adaptable(module) and not adapter.in_head(name)
        and all(f"{name}.{p}" in chosen for p, _ in module.named_parameters(recurse=False))
    ]
    if not targets:
        raise ThawError(
            f"LoRA targets {', '.join(selectors)} select no Linear or Conv2d layer outside the head; "
            "name layers like 'layer4' or 'encoder*'"
        )
    return targets
