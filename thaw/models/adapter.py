"""The adapter contract: what thaw needs to know about any classification model.

An adapter answers four questions about a model (see timm's own contract):
where the head is and how to replace it, which ordered layer groups it has
from stem to head, how to split a forward pass into features and head, and
which preprocessing its weights expect.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torchvision.transforms import InterpolationMode

from thaw.errors import ThawError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = tuple(mode.value for mode in InterpolationMode)


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


def _channel_numbers(value: object, above_zero: bool) -> bool:
    """One finite number per colour channel, or one for all three (images load as RGB)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)) or len(value) not in (1, 3):
        return False
    finite = all(isinstance(item, numbers.Real) and not isinstance(item, bool) and math.isfinite(item) for item in value)
    return finite and (not above_zero or all(item > 0 for item in value))


def check_image_preprocessing(preprocessing: object) -> None:
    """A Preprocessing given by hand (thaw.adapt, a ModelAdapter) is held to what a run's thaw.json is: 'abc' as the
    mean was a ValueError deep in a transform, and a std of 0 a NaN loss blamed on the lr."""
    if not isinstance(preprocessing, Preprocessing):
        raise ThawError(f"preprocessing must be a thaw.Preprocessing(mean=..., std=..., ...), got {preprocessing!r}")
    p, problems = preprocessing, []
    if not _channel_numbers(p.mean, above_zero=False):
        problems.append(f"mean must be 1 or 3 finite numbers (one per colour channel), got {p.mean!r}")
    if not _channel_numbers(p.std, above_zero=True):
        problems.append(f"std must be 1 or 3 finite numbers above 0 (inputs are divided by them), got {p.std!r}")
    for name in ("resize_size", "crop_size"):
        size = getattr(p, name)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            problems.append(f"{name} must be a whole number of pixels above 0, got {size!r}")
    if p.interpolation not in INTERPOLATIONS:
        problems.append(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {p.interpolation!r}")
    if problems:
        raise ThawError("preprocessing: " + "; ".join(problems))


def check_adapter(value: object, call: str) -> None:
    """`call` takes a ModelAdapter: a bare nn.Module or a name was an AttributeError (no group_names) deep inside."""
    if not isinstance(value, ModelAdapter):
        hint = "wrap the model with thaw.adapt(model)" if isinstance(value, nn.Module) else "thaw.build_model or thaw.adapt gives one"
        raise ThawError(f"{call} takes a ModelAdapter, got a {type(value).__name__}; {hint}")


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


def check_tied_within_groups(model: nn.Module, groups: list[LayerGroup]) -> None:
    """A weight shared by two modules (tied) trains and freezes with the group of the name registered first: where
    the other module lies in another group, or in none, a stage that froze that module changed it without a word.
    For groups thaw's structural rule or adapt(groups=...) made, whose modules cover every layer with parameters
    (timm's and Hugging Face's groups name only the modules that own each tensor: an encoder-decoder's shared
    embedding would read as a module in no group)."""
    owner = {name: group.name for group in groups for name in group.params}
    canonical = {id(param): name for name, param in model.named_parameters()}
    for alias, param in model.named_parameters(remove_duplicate=False):
        first = canonical[id(param)]
        if alias == first:
            continue
        holder = next((group.name for group in groups if any(is_within(alias, root) for root in group.modules)), None)
        if holder != owner[first]:
            where = f"group {holder!r}" if holder else "no group"
            raise ThawError(
                f"{alias} is the same tensor as {first} (tied weights): it would train and freeze with group "
                f"{owner[first]!r}, while its module lies in {where}; put both modules in one group "
                "(adapt(model, groups={...})) or untie them"
            )


def check_float32(model: nn.Module) -> None:
    """A model whose weights are another float type (model.double(), model.to(torch.bfloat16)) met float32 images in
    torch's own words, deep in the first caching pass: "Input type (float) and bias type (double) should be the same".
    thaw trains and scores float32 weights (bf16 runs through autocast, --precision), so it is refused up front."""
    other = next(
        ((name, tensor.dtype) for name, tensor in [*model.named_parameters(), *model.named_buffers()]
         if tensor.is_floating_point() and tensor.dtype != torch.float32),
        None,
    )
    if other is not None:
        name, dtype = other
        raise ThawError(
            f"the model's weights are {str(dtype).removeprefix('torch.')} ({name}, first of them); thaw trains and scores "
            "float32 weights, in bf16 through autocast (precision, --precision): pass model.float()"
        )
