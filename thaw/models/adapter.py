"""The adapter contract: what thaw needs to know about any classification model.

An adapter answers four questions about a model (see timm's own contract):
where the head is and how to replace it, which ordered layer groups it has
from stem to head, how to split a forward pass into features and head, and
which preprocessing its weights expect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from thaw.errors import ThawError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def is_within(name: str, root: str) -> bool:
    """Whether module or parameter `name` is `root` itself or lies inside it (`fc.weight` in `fc`, not in `fc2`)."""
    return name == root or name.startswith(root + ".")


@dataclass(frozen=True)
class Preprocessing:
    """How inputs must be prepared for the weights (resize, then centre crop, then normalise)."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize_size: int = 256
    crop_size: int = 224
    interpolation: str = "bilinear"
    source: str = "ImageNet defaults"


@dataclass(frozen=True)
class LayerGroup:
    """A named, ordered slice of the model: the unit of freezing and of learning rates."""

    name: str
    modules: tuple[str, ...]
    params: tuple[str, ...]


class ModelAdapter:
    """A model plus the answers to the contract. Families build these; users rarely do."""

    def __init__(
        self,
        model: nn.Module,
        *,
        family: str,
        head_name: str,
        groups: list[LayerGroup],
        preprocessing: Preprocessing,
        features_fn: Callable[[torch.Tensor], torch.Tensor],
        head_fn: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self.model = model
        self.family = family
        self.head_name = head_name
        self.groups = groups
        self.preprocessing = preprocessing
        self._features_fn = features_fn
        self._head_fn = head_fn
        check_groups_cover_model(model, groups)

    @property
    def group_names(self) -> list[str]:
        return [group.name for group in self.groups]

    def group(self, name: str) -> LayerGroup:
        for group in self.groups:
            if group.name == name:
                return group
        raise ThawError(f"no layer group named {name!r}; groups are: {', '.join(self.group_names)}")

    def in_head(self, name: str) -> bool:
        """Whether a module or parameter name lies inside the head."""
        return any(is_within(name, root) for root in self.group("head").modules)

    @property
    def num_classes(self) -> int:
        head = self.model.get_submodule(self.head_name)
        return head.out_features if isinstance(head, nn.Linear) else head.out_channels

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Everything before the head: what a frozen-feature cache would store."""
        return self._features_fn(images)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """The head alone, applied to forward_features' output."""
        return self._head_fn(features)


def check_groups_cover_model(model: nn.Module, groups: list[LayerGroup]) -> None:
    """Every parameter in exactly one group: the invariant the optimizer audit relies on."""
    owner: dict[str, str] = {}
    problems: list[str] = []
    for group in groups:
        for name in group.params:
            if name in owner:
                problems.append(f"parameter {name} is in both {owner[name]!r} and {group.name!r}")
            owner[name] = group.name
    missing = [name for name, _ in model.named_parameters() if name not in owner]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        problems.append(f"{len(missing)} parameters are in no layer group ({shown}); add their modules to a group")
    unknown = set(owner) - {name for name, _ in model.named_parameters()}
    if unknown:
        problems.append(f"groups name parameters the model does not have: {', '.join(sorted(unknown)[:5])}")
    if problems:
        raise ThawError("layer groups do not cover the model: " + "; ".join(problems))
